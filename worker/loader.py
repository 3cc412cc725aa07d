"""Build a model from a local Hugging Face directory of safetensors files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from worker.cpu_linear import PackedLinear, pack_linears, packing_applies
from worker.file_embedding import FileEmbedding
from worker.model_config import ModelConfig
from worker.models.llama import LlamaForCausalLM, Rotary
from worker.safetensors_file import SafetensorsFile


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: str, max_positions: int) -> LlamaForCausalLM:
    files = sorted(Path(cfg.path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {cfg.path!r}")
    with torch.device("meta"), _no_random_init():
        model = LlamaForCausalLM(cfg, max_positions)
    # Materialize in the target dtype (copy_ converts the checkpoint's dtype): never a full fp32 copy.
    model = model.to(dtype).to_empty(device=device)
    model.rotary = Rotary(cfg, max_positions).to(device)  # computed buffers, not weights: rebuild off meta
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    embedding: tuple[Path, str] | None = None  # where the checkpoint keeps the embedding table
    for file in files:
        with SafetensorsFile.open(file) as checkpoint:
            for name in checkpoint.names():
                target, shard = _target_name(model, name)
                if target is None:
                    continue
                if target not in params:
                    raise ValueError(f"model: unexpected weight {name!r} in {file.name}")
                tensor = checkpoint.read(name)
                if target == "embed_tokens.weight":
                    embedding = (file, name)
                param = params[target]
                if shard is None:
                    param.data.copy_(tensor)
                else:
                    fused, index = shard
                    sizes = model.shard_sizes(fused)
                    start = sum(sizes[:index])
                    param.data[start : start + sizes[index]].copy_(tensor)
                del tensor  # before the next one is read: one checkpoint tensor in memory at a time
                loaded.add(f"{target}#{shard[1] if shard else ''}")
    expected = {f"{n}#" for n in params if "qkv_proj" not in n and "gate_up_proj" not in n}
    for n in params:
        if "qkv_proj" in n:
            expected |= {f"{n}#{i}" for i in range(3)}
        elif "gate_up_proj" in n:
            expected |= {f"{n}#{i}" for i in range(2)}
    del params  # packing frees each plain weight as it replaces it: nothing else may hold them
    missing = expected - loaded
    if missing:
        raise ValueError(f"model: weights missing from checkpoint: {sorted(missing)[:5]}")
    model = model.to(dtype).eval()  # casts the rotary tables like transformers does
    if packing_applies(dtype, device):
        pack_linears(model)
        if model.lm_head is None:  # tied: logits get a packed copy, lookups read the checkpoint's table
            model.lm_head = PackedLinear(model.embed_tokens.weight, None)
            table = FileEmbedding.from_safetensors(*embedding, dtype) if embedding else None
            if table is not None and table.shape == tuple(model.embed_tokens.weight.shape):
                model.embed_tokens = table  # type: ignore[assignment]
    return model


@contextmanager
def _no_random_init() -> Iterator[None]:
    """Skip nn.Linear's and nn.Embedding's random init while the model is built: every weight
    comes from the checkpoint, and on meta tensors that init runs through torch._refs, which
    imports torch._dynamo and triton (~144 MiB resident in a CPU worker that uses neither). The
    rotary tables are computed on the CPU for the same reason (worker.models.llama)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved  # type: ignore[method-assign]


def _target_name(model: LlamaForCausalLM, name: str) -> tuple[str | None, tuple[str, int] | None]:
    """Map a checkpoint tensor name to (parameter name, (fused name, shard index) or None)."""
    if "rotary_emb" in name:
        return None, None
    if name == "lm_head.weight":
        return (None, None) if model.lm_head is None else ("lm_head.weight", None)
    name = name.removeprefix("model.")
    for frag, (fused, index) in model.fused_weights.items():
        if f".{frag}." in name:
            return name.replace(frag, fused), (fused, index)
    return name, None
