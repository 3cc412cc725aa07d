"""Paged attention, torch path (CPU, and the reference the Triton kernels are tested against).

The KV cache of one layer is two tensors [num_blocks, block_size, kv_heads, head_dim]. New K/V
are scattered into it through a slot mapping (slot = block_id * block_size + offset); attention
reads each sequence's context through its row of the block table.

A step's flat batch puts decodes (one query token each) first, then prefill chunks. Decodes run
as one batched matmul over the gathered, padded contexts: one query token through
scaled_dot_product_attention in bf16 is very slow on CPU. Prefill chunks run one sequence at a
time through SDPA, with a causal mask offset by the context already cached.
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
            rows = torch.arange(ctx - n, ctx).unsqueeze(1)
            mask = torch.arange(ctx).unsqueeze(0) <= rows
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
    num_seqs, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    seq_lens = meta.seq_lens[:num_seqs]
    max_len = max(meta.seq_lens_host[:num_seqs])
    num_blocks = -(-max_len // block_size)
    table = meta.block_tables[:num_seqs, :num_blocks]
    # [B, L, kv_heads, head_dim] with L = num_blocks * block_size; padding is masked below.
    keys = k_cache[table].flatten(1, 2)
    values = v_cache[table].flatten(1, 2)
    qg = q.view(num_seqs, kv_heads, group, head_dim)
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).float() * scale  # [B, kvh, g, L]
    pad = torch.arange(keys.shape[1]).unsqueeze(0) >= seq_lens.unsqueeze(1)  # [B, L]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3))  # [B, kvh, g, head_dim]
    return out.reshape(num_seqs, heads, head_dim)
