"""The int8 KV cache (`--kv-cache-dtype int8`) in torch: the format of worker/csrc/kv_int8.h.

Each (token, KV head) row of the cache is head_dim int8 values followed by their fp16 scale (2
bytes), so one int8 tensor [num_blocks, block_size, kv_heads, head_dim + 2] per K and V holds both
and block ids address it as they do a bf16 cache. Symmetric per row: x ~= q * scale, scale =
max|x| / 127 (the values are rounded with the exact scale; the stored one is its fp16, 2^-11
relative). About half the bytes of bf16 per token (66 against 128 for head_dim 64): 1.94x the
tokens in the same memory, and half the bytes a decode step reads. The C++ kernels write and
read it on the hot path; these functions are the torch path (writes without the fused kernel,
prefill contexts, the reference in tests).
"""

from __future__ import annotations

import torch

SCALE_BYTES = 2


def row_bytes(head_dim: int) -> int:
    return head_dim + SCALE_BYTES


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] floats -> [..., head_dim + 2] int8 rows with their scales."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # A true division, as the C++ kernel's: `127.0 / amax` would be amax.reciprocal() * 127 in torch,
    # rounded twice, and a rare value would land on the other side of a .5.
    inv = torch.where(amax > 0, torch.tensor(127.0).div(amax), torch.zeros_like(amax))
    q = torch.round(xf * inv).clamp_(-127, 127).to(torch.int8)
    scale = (amax / 127.0).half().view(torch.int8)  # the fp16 scale's 2 bytes
    return torch.cat((q, scale), dim=-1)


def dequantize(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., head_dim + 2] int8 rows -> [..., head_dim] in dtype."""
    head_dim = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., head_dim:].contiguous().view(torch.float16).float()
    return (rows[..., :head_dim].float() * scale).to(dtype)
