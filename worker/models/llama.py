"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): one flat varlen forward over paged KV.

Numerics follow Hugging Face transformers step by step (RMSNorm in fp32, RoPE tables in fp32 cast
to the model dtype) so greedy tokens match it exactly in float32. q/k/v and gate/up projections
are fused into one matmul each: fewer, larger GEMMs are what a CPU (and a GPU) runs fast.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from worker.attention import AttentionMetadata
from worker.attention_backend import TORCH_BACKEND, AttentionBackend
from worker.model_config import ModelConfig


class RMSNorm(nn.Module):
    ops: ModuleType | None = None  # worker.cpu_kernels' fused ops where they apply (use_cpu_ops)

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def add_and_norm(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream's step: (h + delta, norm(h + delta)). The fused op writes the sum
        into h, which only the residual stream holds."""
        if self.ops is not None:
            return h, self.ops.add_rms_norm(h, delta, self.weight, self.eps)
        h = h + delta
        return h, self(h)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor for the config's RoPE variant."""
    dim = cfg.head_dim
    # On the CPU even inside a meta-device context: computed tables, not weights (and meta-tensor
    # arithmetic would import torch._dynamo, see worker.loader).
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"rope_scaling type {kind!r} is not supported yet")


class Rotary(nn.Module):
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        inv_freq, attn_scale = rope_inv_freq(cfg)
        freqs = torch.arange(max_positions, dtype=torch.float32, device="cpu")[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * attn_scale, persistent=False)
        self.register_buffer("sin", emb.sin() * attn_scale, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows of the step's positions, [T, 1, head_dim]: looked up once per step,
        not once per layer."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    # The paged-attention functions this layer calls; the runner picks them for the whole model
    # (LlamaForCausalLM.set_attention_backend).
    backend: AttentionBackend = TORCH_BACKEND
    ops: ModuleType | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        k_cache, v_cache = kv_cache
        if self.ops is not None:  # RoPE on q, k in place and k, v into the cache: one pass
            cos, sin = cos_sin
            self.ops.rope_and_cache(
                qkv, cos.squeeze(1), sin.squeeze(1), meta.slot_mapping, k_cache, v_cache,
                self.num_heads, self.num_kv_heads,
            )  # fmt: skip
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.ops is None:
            q, k = apply_rotary(q, k, cos_sin)
            self.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = self.backend.attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.view(tokens, self.q_size))


class MLP(nn.Module):
    ops: ModuleType | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, normed, next_norm, cos_sin, kv_cache, meta):  # type: ignore[no-untyped-def]
        """h: the residual stream; normed: input_layernorm(h), computed by the layer before (its
        residual add and this norm are one pass). Returns h and next_norm(h) after this layer."""
        h, normed = self.post_attention_layernorm.add_and_norm(
            h, self.self_attn(normed, cos_sin, kv_cache, meta)
        )
        return next_norm.add_and_norm(h, self.mlp(normed))


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard index)
    fused_weights = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg, max_positions)
        # None when tied; on CPU in bf16 the loader then puts a packed copy here (worker.cpu_linear).
        self.lm_head: nn.Module | None = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    def use_cpu_ops(self, ops: ModuleType | None) -> None:
        """Route norms, RoPE + cache writes and SiLU through worker.cpu_kernels' fused ops (bf16 on
        CPU with the torch attention backend), or back to torch with None."""
        for module in self.modules():
            if isinstance(module, RMSNorm | Attention | MLP):
                module.ops = ops

    def shard_sizes(self, fused: str) -> list[int]:
        c = self.cfg
        if fused == "qkv_proj":
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [c.intermediate_size, c.intermediate_size]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        cos_sin = self.rotary(positions, h.dtype)
        layers = cast(list[DecoderLayer], list(self.layers))
        normed = layers[0].input_layernorm(h)
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [self.norm]
        for layer, kv_cache, next_norm in zip(layers, kv_caches, next_norms, strict=True):
            h, normed = layer(h, normed, next_norm, cos_sin, kv_cache, meta)
        return normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied embeddings
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
