"""What the worker needs from a Hugging Face config.json, read without importing transformers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

LLAMA_FAMILY = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


@dataclass(slots=True)
class ModelConfig:
    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q, k, v projections
    o_proj_bias: bool  # Llama's attention_bias covers o_proj too; Qwen2's q/k/v biases do not
    eos_token_ids: list[int]
    config_dtype: str
    sliding_window: int | None = None  # attention window, when the model uses one (not implemented)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"model: no config.json in {str(path)!r}; expected a local Hugging Face model directory"
            )
        cfg = json.loads(config_file.read_text())
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in LLAMA_FAMILY:
            raise ValueError(
                f"model: architecture {arch!r} is not supported yet (supported: {sorted(LLAMA_FAMILY)})"
            )
        # transformers 5 moved rope settings into rope_parameters; older configs keep them at the top.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = cfg["num_attention_heads"]
        return cls(
            path=str(path),
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            o_proj_bias=arch == "LlamaForCausalLM" and bool(cfg.get("attention_bias", False)),
            eos_token_ids=_eos_ids(path, cfg),
            config_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        )


def _eos_ids(path: Path, cfg: dict) -> list[int]:
    eos = cfg.get("eos_token_id")
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id", eos)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """vLLM's --dtype: 'auto' picks bf16 where the hardware runs it fast, else fp32 on CPU."""
    names = {
        "float32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "half": torch.float16,
    }
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    if dtype not in names:
        raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]
