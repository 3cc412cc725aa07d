"""Packed oneDNN linears (worker.cpu_linear): exactly F.linear's values in bf16, used only there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fresh_python import run_python
from safetensors.torch import load_file
from tiny_models import build_tiny_llama

from pagemesh import LLM, SamplingParams
from worker import loader
from worker.cpu_linear import PackedLinear, packing_applies
from worker.file_embedding import FileEmbedding

pytestmark = pytest.mark.skipif(
    not packing_applies(torch.bfloat16, "cpu"), reason="this CPU has no oneDNN bf16 support"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (3072, 576), (576, 1536), (33, 17)])
def test_packed_linear_equals_f_linear_in_bf16(out_features, in_features, bias):
    gen = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16() if bias else None
    layer = PackedLinear(weight, b)
    for tokens in (1, 3, 32, 300):
        x = torch.randn(tokens, in_features, generator=gen).bfloat16()
        assert torch.equal(layer(x), F.linear(x, weight, b)), tokens


def test_only_cpu_bf16_is_packed():
    assert not packing_applies(torch.float32, "cpu")
    assert not packing_applies(torch.bfloat16, "cuda")


@pytest.mark.parametrize("tie,attention_bias", [(True, False), (False, True)])
def test_packed_model_generates_the_unpacked_tokens(tmp_path, monkeypatch, tie, attention_bias):
    path = build_tiny_llama(tmp_path / "m", tie=tie, attention_bias=attention_bias)
    prompts = [{"prompt_token_ids": [1, *range(5 + i, 40 + 3 * i)]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)

    packed = LLM(str(path), dtype="bfloat16", skip_tokenizer_init=True)
    layers = [m for m in packed.runner.model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the output projection
    assert all((m.bias is not None) == (attention_bias and i % 4 < 2) for i, m in enumerate(layers[:-1]))
    embedding = packed.runner.model.embed_tokens
    # Tied: the packed copy serves the logits and lookups read the checkpoint's table from the file.
    assert isinstance(embedding, FileEmbedding) == tie
    if tie:
        assert not list(embedding.parameters())
        ids = torch.tensor([[0, 7, 7, 511], [3, 2, 1, 0]])  # the tiny model's vocabulary is 512
        rows = embedding(ids)
        # Nothing maps the checkpoint: a mapping's fault-around would make the table resident.
        assert str(path / "model.safetensors") not in Path("/proc/self/maps").read_text()
        table = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
        assert table.shape[0] == 512
        assert torch.equal(rows, table[ids].bfloat16())
        assert embedding(ids[0, :0]).shape == (0, table.shape[1])
        for bad in (-1, table.shape[0]):
            with pytest.raises(IndexError, match="out of range"):
                embedding(torch.tensor([0, bad]))
        with monkeypatch.context() as m:  # the Python loop used where the C++ kernels cannot be built
            m.setattr(embedding, "kernels", None)
            assert torch.equal(embedding(ids), table[ids].bfloat16())
            with pytest.raises(IndexError, match="out of range"):
                embedding(torch.tensor([table.shape[0]]))
    ours = packed.generate(prompts, params, use_tqdm=False)

    monkeypatch.setattr(loader, "packing_applies", lambda dtype, device: False)
    plain = LLM(str(path), dtype="bfloat16", skip_tokenizer_init=True)
    assert not any(isinstance(m, PackedLinear) for m in plain.runner.model.modules())
    theirs = plain.generate(prompts, params, use_tqdm=False)
    for a, b in zip(ours, theirs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


SHAPES = """
import os, sys, torch
from worker.cpu_linear import PackedLinear
from worker.model_runner import ModelRunner

runner = ModelRunner(sys.argv[1], dtype="bfloat16", kv_cache_memory=1 << 20, max_model_len=256)
gate_up = next(m for m in runner.model.modules() if isinstance(m, PackedLinear) and m.packed.shape[0] == 3072)
gate_up(torch.randn(1, 512).bfloat16())
before = status("VmRSS:")
for m in range(1, 201):  # a step's token count changes nearly every step under real traffic
    gate_up(torch.randn(m, 512).bfloat16())
caps = os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], os.environ["LRU_CACHE_CAPACITY"]
print(status("VmRSS:") - before, *caps)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_onednn_keeps_a_bounded_number_of_shapes(tmp_path):
    # Each cached oneDNN primitive holds ~M x N x 2 bytes; with torch's and oneDNN's default
    # capacities (1024 each) these 200 shapes kept 162 MiB, with 32 each 63 (worker.cpu_memory).
    path = build_tiny_llama(tmp_path / "m", vocab=1024, hidden=512, intermediate=1536, heads=8, kv_heads=8)
    caches = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    out = run_python(SHAPES, str(path), drop_env=caches).split()
    assert out[1:] == ["32", "32"]
    assert int(out[0]) < 100 << 20, int(out[0]) >> 20
