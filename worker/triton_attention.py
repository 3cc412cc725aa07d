"""Paged attention, Triton path (CUDA; also runs on CPU tensors under TRITON_INTERPRET=1 for tests).

Same contract as worker.attention (the torch reference): the KV cache of one layer is two tensors
[num_blocks, block_size, kv_heads, head_dim]; a step's flat batch holds decodes first, then prefill
chunks; each sequence's query tokens are the last q_len positions of its context.

Three kernels:
- _write_kv_kernel: scatter this step's k, v into their cache slots (slot < 0 = padding, skipped).
- _unified_attention_kernel: one launch for the whole mixed batch. A program owns one tile of query
  tokens of one sequence and one KV head, with all the query heads of that KV head packed into the
  rows of its tile (GQA packing: the KV tile is loaded once and used by `group` query heads). It
  walks the sequence's block table one physical block per iteration with an online softmax in fp32.
- _merge_splits_kernel: flash-decoding. With num_kv_splits > 1 a third grid axis cuts each
  program's context into slices; each slice writes a normalised partial output and its log-sum-exp,
  and the merge kernel combines them. This gives small batches of long decodes enough programs to
  fill the GPU.

Tile-to-sequence mapping needs no host work: sequence i owns the program ids starting at
query_start_loc[i] // BLOCK_Q + i (an upper bound of the tiles of sequences before it), so the grid
is cdiv(T, BLOCK_Q) + B programs wide and each program binary-searches query_start_loc for its
sequence; the spare programs at the end of each sequence's range exit at once. Nothing is read back
from the device, so the launch is CUDA-graph friendly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from worker.attention import AttentionMetadata

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # the module must import cleanly on machines without triton
    _TRITON_IMPORT_ERROR = exc


def triton_available() -> bool:
    """True when triton can be imported (kernels still need CUDA or TRITON_INTERPRET=1 to run)."""
    return _TRITON_IMPORT_ERROR is None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _write_kv_kernel(
        k_ptr,
        v_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_ptr,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_cb,  # k_cache and v_cache share strides (checked by the wrapper)
        stride_cs,
        stride_ch,
        KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HEADS_PAD: tl.constexpr,
        DIM_PAD: tl.constexpr,
    ):
        # Grid: (T,). One program copies all kv heads of one token; a [heads, head_dim] tile is a
        # few hundred elements, enough work per program for a memory-bound copy.
        token = tl.program_id(0)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot < 0:
            return
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        h = tl.arange(0, HEADS_PAD)[:, None]
        d = tl.arange(0, DIM_PAD)[None, :]
        mask = (h < KV_HEADS) & (d < HEAD_DIM)
        dst = block * stride_cb + offset * stride_cs + h * stride_ch + d
        k = tl.load(k_ptr + token.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + token.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
        # tl.store casts to the cache dtype if k, v come in another one.
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)

    @triton.jit
    def _unified_attention_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        out_ptr,  # [T, heads, head_dim] when NUM_SPLITS == 1, else fp32 [T, heads, NUM_SPLITS, head_dim]
        lse_ptr,  # fp32 [T, heads, NUM_SPLITS] (log2 domain); unused when NUM_SPLITS == 1
        query_start_ptr,
        seq_lens_ptr,
        block_tables_ptr,
        num_seqs,
        qk_scale,  # softmax scale * log2(e): the kernel works with exp2
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_os,  # split stride of the partial output (0 when NUM_SPLITS == 1)
        stride_lt,
        stride_lh,
        stride_cb,
        stride_cs,
        stride_ch,
        stride_bt,
        GROUP: tl.constexpr,  # query heads per KV head
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,  # head_dim rounded up to a power of two >= 16
        BLOCK_SIZE: tl.constexpr,  # KV tile = one physical cache block
        BLOCK_M: tl.constexpr,  # rows of the tile: BLOCK_Q tokens x GROUP heads, padded to a power of two
        BLOCK_Q: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        DOT_FP32: tl.constexpr,  # run both matmuls on fp32 operands at full (ieee, not tf32) precision
    ):
        # Grid: (cdiv(T, BLOCK_Q) + num_seqs, kv_heads, NUM_SPLITS).
        pid = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        # Binary search for the last sequence whose first tile id is <= pid.
        lo = 0
        hi = num_seqs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            first = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
            go_right = first <= pid
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid - 1)
        seq = lo

        q_begin = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_begin
        q_tile = pid - (q_begin // BLOCK_Q + seq)
        if q_tile * BLOCK_Q >= q_len:
            return  # spare program at the end of this sequence's id range
        seq_len = tl.load(seq_lens_ptr + seq)
        cached_before = seq_len - q_len  # context already in the cache before this step's tokens

        # Row r of the tile is query token r // GROUP of the tile, query head kv_head*GROUP + r % GROUP.
        rows = tl.arange(0, BLOCK_M)
        tok = q_tile * BLOCK_Q + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
        q_pos = cached_before + tok  # absolute position of each row's query token
        dims = tl.arange(0, DIM_PAD)
        dim_ok = dims < HEAD_DIM

        q_rows = (q_begin + tok).to(tl.int64) * stride_qt + head * stride_qh
        q = tl.load(
            q_ptr + q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
        )
        if DOT_FP32:
            q = q.to(tl.float32)

        # Causal: the last query token of this tile sees keys up to its own position, so no key
        # beyond it is read. Then this split's share of those KV tiles.
        last_tok = tl.minimum((q_tile + 1) * BLOCK_Q, q_len)
        kv_len = cached_before + last_tok
        num_tiles = tl.cdiv(kv_len, BLOCK_SIZE)
        tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

        # Online softmax state. m starts finite so a row whose keys are all masked so far gives
        # exp2(-inf - m) = 0 rather than exp2(-inf + inf) = nan.
        m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)

        slots = tl.arange(0, BLOCK_SIZE)
        table_row = block_tables_ptr + seq * stride_bt
        for t in range(tile_lo, tile_hi):
            block = tl.load(table_row + t).to(tl.int64)
            key_pos = t * BLOCK_SIZE + slots
            key_ok = key_pos < kv_len
            kv_off = block * stride_cb + slots[:, None] * stride_cs + kv_head * stride_ch + dims[None, :]
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            # Masked loads: slots past the context may hold anything (even nan) in a fresh cache.
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)

            if DOT_FP32:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale
            visible = (key_pos[None, :] <= q_pos[:, None]) & key_ok[None, :]
            s = tl.where(visible, s, float("-inf"))

            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            # p is rounded to the cache dtype for the second matmul (as the reference does), also
            # when that matmul then runs in fp32.
            p_low = p.to(v.dtype)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(
                    p_low.to(tl.float32), v.to(tl.float32), input_precision="ieee"
                )
            else:
                acc = acc * alpha[:, None] + tl.dot(p_low, v)
            m = m_new

        # A split with no visible key for a row (empty slice, or keys all past that row's position)
        # leaves l_sum == 0: it writes zeros and lse = -inf, which the merge weighs as nothing.
        has_keys = l_sum > 0.0
        out = acc / tl.where(has_keys, l_sum, 1.0)[:, None]
        o_rows = (q_begin + tok).to(tl.int64) * stride_ot + head * stride_oh + split * stride_os
        o_mask = row_ok[:, None] & dim_ok[None, :]
        if NUM_SPLITS == 1:
            tl.store(out_ptr + o_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            tl.store(out_ptr + o_rows[:, None] + dims[None, :], out, mask=o_mask)
            lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l_sum, 1.0)), float("-inf"))
            lse_off = (q_begin + tok).to(tl.int64) * stride_lt + head * stride_lh + split
            tl.store(lse_ptr + lse_off, lse, mask=row_ok)

    @triton.jit
    def _merge_splits_kernel(
        partial_ptr,  # fp32 [T, heads, NUM_SPLITS, head_dim], contiguous
        lse_ptr,  # fp32 [T, heads, NUM_SPLITS], contiguous, log2 domain
        out_ptr,
        stride_ot,
        stride_oh,
        heads,
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        # Grid: (T, heads). out = sum_s 2^(lse_s - max) * o_s / sum_s 2^(lse_s - max).
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        splits = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, DIM_PAD)
        split_ok = splits < NUM_SPLITS
        base = token * heads + head
        lse = tl.load(lse_ptr + base * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, axis=0))  # every token sees itself, so some lse is finite
        part = tl.load(
            partial_ptr + (base * NUM_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :],
            mask=split_ok[:, None] & (dims[None, :] < HEAD_DIM),
            other=0.0,
        )
        out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(
            out_ptr + token * stride_ot + head * stride_oh + dims,
            out.to(out_ptr.dtype.element_ty),
            mask=dims < HEAD_DIM,
        )


def _require_triton() -> None:
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"triton is not available: {_TRITON_IMPORT_ERROR}")


def write_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter k, v [T, kv_heads, head_dim] into the paged cache at slot_mapping [T]; slots < 0 are skipped
    (padding)."""
    _require_triton()
    num_tokens, kv_heads, head_dim = k.shape
    block_size = k_cache.shape[1]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert k.stride(2) == 1 and v.stride(2) == 1
    if num_tokens == 0:
        return
    grid: Any = (num_tokens,)
    _write_kv_kernel[grid](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        HEADS_PAD=_next_pow2(kv_heads),
        DIM_PAD=_next_pow2(head_dim),
    )


def unified_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_kv_splits: int = 1,
) -> torch.Tensor:
    """q [T, heads, head_dim] (decodes first, then prefill chunks) over the paged cache, which already
    holds this step's k, v. Returns [T, heads, head_dim] in q's dtype. num_kv_splits > 1 cuts each
    context into that many slices (flash-decoding) and merges them; the result is the same."""
    _require_triton()
    num_tokens, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = meta.seq_lens.shape[0]
    assert heads % kv_heads == 0, "query heads must be a multiple of kv heads"
    assert block_size % 16 == 0, "block_size must be a multiple of 16 (it is the tl.dot N dimension)"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and q.stride(2) == 1
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and the KV cache must share a dtype"
    assert num_kv_splits >= 1
    group = heads // kv_heads
    out = torch.empty((num_tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out

    # Rows per program: 16 (the tl.dot minimum) for decode-only batches, where a sequence has one
    # query token; 64 when prefill chunks are present, so a chunk's KV tiles are reused across more
    # query tokens. Always at least one whole group of query heads.
    decode_only = meta.num_decodes == num_seqs
    block_m = max(16 if decode_only else 64, _next_pow2(group))
    block_q = block_m // group
    grid: Any = (triton.cdiv(num_tokens, block_q) + num_seqs, kv_heads, num_kv_splits)

    if num_kv_splits == 1:
        target, lse = out, out  # lse unused
        stride_ot, stride_oh, stride_os = out.stride(0), out.stride(1), 0
        stride_lt = stride_lh = 0
    else:
        target = torch.empty(
            (num_tokens, heads, num_kv_splits, head_dim), dtype=torch.float32, device=q.device
        )
        lse = torch.empty((num_tokens, heads, num_kv_splits), dtype=torch.float32, device=q.device)
        stride_ot, stride_oh, stride_os = target.stride(0), target.stride(1), target.stride(2)
        stride_lt, stride_lh = lse.stride(0), lse.stride(1)

    dim_pad = max(16, _next_pow2(head_dim))
    # Matmul operands: fp16/bf16 go to the tensor cores as they are. fp32 runs at ieee precision,
    # since the default tf32 would lose ~1e-3 against the torch path. CPU tensors mean Triton's
    # interpreter, whose tl.dot multiplies the raw uint16 bit patterns of bf16 (triton-lang/triton
    # #11584, not supported there): bf16 operands are upcast there, with p still rounded to bf16.
    _unified_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        target,
        lse,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        num_seqs,
        scale * 1.4426950408889634,  # log2(e)
        q.stride(0),
        q.stride(1),
        stride_ot,
        stride_oh,
        stride_os,
        stride_lt,
        stride_lh,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        NUM_SPLITS=num_kv_splits,
        DOT_FP32=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type == "cpu"),
    )
    if num_kv_splits > 1:
        merge_grid: Any = (num_tokens, heads)
        _merge_splits_kernel[merge_grid](
            target,
            lse,
            out,
            out.stride(0),
            out.stride(1),
            heads,
            HEAD_DIM=head_dim,
            DIM_PAD=_next_pow2(head_dim),
            NUM_SPLITS=num_kv_splits,
            SPLITS_PAD=_next_pow2(num_kv_splits),
        )
    return out
