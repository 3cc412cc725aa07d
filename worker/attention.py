"""Paged attention, torch path (CPU, and the reference the Triton kernels are tested against).

The KV cache of one layer is two tensors [num_blocks, block_size, kv_heads, head_dim]. New K/V
are scattered into it through a slot mapping (slot = block_id * block_size + offset); attention
reads each sequence's context through its row of the block table.

A step's flat batch puts decodes (one query token each) first, then prefill chunks. Decodes run
as one batched fp32 SDPA over the gathered, padded contexts (one query token through SDPA in bf16
is very slow on CPU). Prefill chunks run one sequence at a time through SDPA, with a causal mask
offset by the context already cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_context(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached entries, [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_table_row[:num_blocks]].flatten(0, 1)[:length]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, heads, head_dim]; k, v [T, kv_heads, head_dim] are this step's new entries, already
    written to the cache. Returns [T, heads, head_dim]."""
    out = torch.empty_like(q)
    num_decodes = meta.num_decodes
    if num_decodes:
        out[:num_decodes] = _decode_attention(q[:num_decodes], k_cache, v_cache, meta, scale)
    starts, lens = meta.query_start_host, meta.seq_lens_host
    for i in range(num_decodes, len(lens)):
        lo, hi, ctx = starts[i], starts[i + 1], lens[i]
        n = hi - lo
        if ctx == n:  # nothing cached before this chunk: attend to the fresh k, v directly
            kc, vc = k[lo:hi], v[lo:hi]
            mask = None
        else:
            kc = gather_context(k_cache, meta.block_tables[i], ctx)
            vc = gather_context(v_cache, meta.block_tables[i], ctx)
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


# SDPA's CPU kernel is fast in bf16 once several query rows share the KV (a group of >= 2 heads
# folded into the query axis); with a single row (MHA) bf16 is slower than fp32. Measured on the
# SmolLM2 shapes at batch 32: group 3 takes 0.66 ms in bf16, 0.96 ms in fp32.
DECODE_BF16_MIN_GROUP = 2


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """All decodes at once. The query heads sharing a KV head are folded into SDPA's query-length
    axis ([B, kv_heads, group, D] against [B, kv_heads, L, D]), so no K/V is repeated per head.
    The math runs in fp32 unless bf16 is the faster of the two (see DECODE_BF16_MIN_GROUP)."""
    num_seqs, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    compute = q.dtype if q.dtype == torch.bfloat16 and group >= DECODE_BF16_MIN_GROUP else torch.float32
    max_len = max(meta.seq_lens_host[:num_seqs])
    num_blocks = -(-max_len // block_size)
    length = num_blocks * block_size
    ids = meta.block_tables[:num_seqs, :num_blocks].flatten()
    keys = k_cache.index_select(0, ids).view(num_seqs, length, kv_heads, head_dim).transpose(1, 2).to(compute)
    values = (
        v_cache.index_select(0, ids).view(num_seqs, length, kv_heads, head_dim).transpose(1, 2).to(compute)
    )
    visible = torch.arange(length, device=q.device).unsqueeze(0) < meta.seq_lens[:num_seqs].unsqueeze(1)
    qg = q.view(num_seqs, kv_heads, group, head_dim).to(compute)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=visible[:, None, None, :], scale=scale)
    return out.reshape(num_seqs, heads, head_dim).to(q.dtype)
