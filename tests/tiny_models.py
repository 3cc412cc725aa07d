"""Tiny random-weight Llama-family models, built with transformers configs, for fast exact tests."""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_llama(
    path: Path,
    *,
    tie: bool = True,
    kv_heads: int = 2,
    seed: int = 0,
    vocab: int = 512,
    layers: int = 2,
    max_positions: int = 512,
    rope_scaling: dict | None = None,
    attention_bias: bool = False,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=attention_bias,
        **({"rope_scaling": rope_scaling} if rope_scaling else {}),
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return path


def hf_greedy(
    path: Path, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype = torch.float32, model=None
) -> list[list[int]]:
    """Reference: transformers greedy generate, one prompt at a time (no padding effects).
    EOS is suppressed for exactly new_tokens tokens, like SamplingParams(min_tokens=max_tokens)."""
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    outs = []
    for ids in prompts:
        with torch.inference_mode():
            gen = model.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
        outs.append(gen[0, len(ids) :].tolist())
    return outs


def random_prompts(
    count: int, vocab: int, seed: int = 1, min_len: int = 3, max_len: int = 90
) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(min_len, max_len, count).round().int().tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def build_tiny(path: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A tiny random model of another Llama-family architecture (qwen2: q/k/v biases; mistral)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        sliding_window=None,
    )
    model_cls(config_cls(**(settings | overrides))).eval().save_pretrained(path)
    return path
