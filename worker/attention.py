"""Paged attention, torch path (CPU, and the reference the Triton kernels are tested against).

The KV cache of one layer is two tensors [num_blocks, block_size, kv_heads, head_dim] (in the
model's dtype, or int8 rows of head_dim + 2 bytes with their scale: worker.kv_quant). New K/V are
scattered into it through a slot mapping (slot = block_id * block_size + offset); attention reads
each sequence's context through its row of the block table.

A step's flat batch puts decodes (one query token each) first, then prefill chunks. Decodes run
all at once: through a `decode_kernel` when the runner passes one (worker.cpu_kernels' C++ kernel,
over the paged cache in place; see attention_backend.with_decode_kernel), else over contexts
gathered from the cache (SDPA with one query token is slow on CPU, in bf16 very slow). Prefill
chunks run one sequence at a time through SDPA, with a causal mask offset by the context already
cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker import kv_quant

# (q [B, heads, D], k_cache, v_cache, block_tables [B, W] int32, seq_lens [B] int32, scale) -> [B, heads, D]
DecodeKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [B+1] int32: offsets of each sequence's tokens in the batch
    seq_lens: torch.Tensor  # [B] int32: context length after this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    query_start_host: list[int]  # query_start_loc on the host, for the per-sequence prefill loop
    seq_lens_host: list[int]
    num_kv_splits: int = 1  # split-KV slices per sequence (Triton path only; see attention_backend)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter k, v [T, kv_heads, head_dim] into the paged cache at slot_mapping [T]."""
    if k_cache.dtype == torch.int8:
        k, v = kv_quant.quantize(k), kv_quant.quantize(v)
    kv_heads, row = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv_heads, row).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, row).index_copy_(0, slot_mapping, v)


def gather_context(
    cache: torch.Tensor, block_table_row: torch.Tensor, length: int, dtype: torch.dtype
) -> torch.Tensor:
    """One sequence's first `length` cached entries, [length, kv_heads, head_dim] in dtype."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return _in_dtype(cache[block_table_row[:num_blocks]].flatten(0, 1)[:length], dtype)


def _in_dtype(entries: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return kv_quant.dequantize(entries, dtype) if entries.dtype == torch.int8 else entries


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    decode_kernel: DecodeKernel | None = None,
) -> torch.Tensor:
    """q [T, heads, head_dim]; k, v [T, kv_heads, head_dim] are this step's new entries, already
    written to the cache. Returns [T, heads, head_dim]."""
    out = torch.empty_like(q)
    num_decodes = meta.num_decodes
    if num_decodes and decode_kernel is not None:
        q_decode = q[:num_decodes].contiguous()
        out[:num_decodes] = decode_kernel(q_decode, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
    elif num_decodes:
        out[:num_decodes] = _decode_attention(q[:num_decodes], k_cache, v_cache, meta, scale)
    starts, lens = meta.query_start_host, meta.seq_lens_host
    for i in range(num_decodes, len(lens)):
        lo, hi, ctx = starts[i], starts[i + 1], lens[i]
        n = hi - lo
        if ctx == n:  # nothing cached before this chunk: attend to the fresh k, v directly
            kc, vc = k[lo:hi], v[lo:hi]
            mask = None
        else:
            kc = gather_context(k_cache, meta.block_tables[i], ctx, q.dtype)
            vc = gather_context(v_cache, meta.block_tables[i], ctx, q.dtype)
            rows = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)
            mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= rows
        o = F.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1).unsqueeze(0),
            kc.transpose(0, 1).unsqueeze(0),
            vc.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[lo:hi] = o.squeeze(0).transpose(0, 1)
    return out


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """All decodes at once, over contexts gathered from the cache and padded to the longest.

    The query heads sharing a KV head are one group of rows against that head's keys, so no K/V
    is repeated per head. Half precision (on the CPU only where the C++ kernel cannot be built)
    runs two batched matmuls over (kv head, sequence) pairs, with the scores rounded to the model
    dtype as Hugging Face's eager attention does and the softmax in fp32. float32, the mode that
    matches transformers token for token, runs SDPA's flash kernel on strided views."""
    num_seqs, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    max_len = max(meta.seq_lens_host[:num_seqs])
    num_blocks = -(-max_len // block_size)
    length = num_blocks * block_size
    ids = meta.block_tables[:num_seqs, :num_blocks].flatten()
    hidden = torch.arange(length, device=q.device).unsqueeze(0) >= meta.seq_lens[:num_seqs].unsqueeze(1)

    keys = _in_dtype(k_cache.index_select(0, ids), q.dtype).view(num_seqs, length, kv_heads, head_dim)
    values = _in_dtype(v_cache.index_select(0, ids), q.dtype).view(num_seqs, length, kv_heads, head_dim)
    if q.dtype == torch.float32:  # [B, kv_heads, group, D] against [B, kv_heads, L, D] views
        qg = q.view(num_seqs, kv_heads, group, head_dim)
        visible = ~hidden[:, None, None, :]
        out = F.scaled_dot_product_attention(
            qg, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible, scale=scale
        )
        return out.reshape(num_seqs, heads, head_dim)
    # [kv_heads, B, ...]: each (head, sequence) context one contiguous matrix, so neither matmul copies
    keys, values = keys.permute(2, 0, 1, 3).contiguous(), values.permute(2, 0, 1, 3).contiguous()
    qg = q.view(num_seqs, kv_heads, group, head_dim).transpose(0, 1)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float()  # [kv_heads, B, group, L]
    scores.mul_(scale).masked_fill_(hidden[None, :, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), values)
    return out.transpose(0, 1).reshape(num_seqs, heads, head_dim)
