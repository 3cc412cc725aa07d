"""Triton paged-attention kernels against the torch reference path (worker.attention).

Runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported), so shapes stay small; on a CUDA machine the same tests can run with the variable unset
and tensors moved to the GPU.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from worker.attention import AttentionMetadata, paged_attention, write_kv  # noqa: E402
from worker.triton_attention import (  # noqa: E402
    triton_available,
    unified_attention_triton,
    write_kv_triton,
)

# (q_len, context_len) per sequence; decodes (q_len 1) first, as the runner lays a step out.
MIXED = [
    (1, 1),  # first decode step of a one-token prompt
    (1, 17),  # just past one block of 16
    (1, 64),  # exactly fills blocks
    (1, 97),
    (20, 20),  # fresh prefill, no cached prefix
    (13, 70),  # chunk after a cached prefix, starts mid-block
    (33, 33),  # fresh prefill crossing block boundaries
]


def make_metadata(
    shape: list[tuple[int, int]], block_size: int, num_blocks: int, gen: torch.Generator
) -> AttentionMetadata:
    """Metadata for sequences given as (q_len, context_len), with block ids drawn from a shuffled
    pool so that block tables are non-contiguous and out of order."""
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, starts = [], [], [0]
    for q_len, ctx in shape:
        n = -(-ctx // block_size)
        blocks, pool = pool[:n], pool[n:]
        tables.append(blocks)
        slots += [
            blocks[pos // block_size] * block_size + pos % block_size for pos in range(ctx - q_len, ctx)
        ]
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    seq_lens = [ctx for _, ctx in shape]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        num_decodes=sum(1 for q_len, _ in shape if q_len == 1),
        query_start_host=starts,
        seq_lens_host=seq_lens,
    )


def run_case(
    shape: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_kv_splits: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fills a random cache (the cached prefixes), writes this step's k, v with both write paths,
    and returns (triton output, reference output)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-ctx // block_size) for _, ctx in shape) + 3
    meta = make_metadata(shape, block_size, num_blocks, gen)
    num_tokens = meta.query_start_host[-1]
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    q = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)

    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv(k, v, k_ref, v_ref, meta.slot_mapping)
    write_kv_triton(k, v, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)

    scale = head_dim**-0.5
    ref = paged_attention(q, k, v, k_ref, v_ref, meta, scale)
    out = unified_attention_triton(q, k_cache, v_cache, meta, scale, num_kv_splits=num_kv_splits)
    assert out.shape == q.shape and out.dtype == dtype
    return out, ref


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    if dtype == torch.float32:
        assert err < 1e-4, err
    else:  # bf16: both sides round to bf16 (8 mantissa bits) at different points
        assert err < 2e-2 * max(1.0, ref.float().abs().max().item()), err


def test_triton_available() -> None:
    assert triton_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)], ids=["gqa1", "gqa3", "gqa8"])
@pytest.mark.parametrize("num_kv_splits", [1, 3], ids=["nosplit", "split3"])
def test_mixed_batch(
    dtype: torch.dtype, block_size: int, heads: int, kv_heads: int, num_kv_splits: int
) -> None:
    head_dim = 32 if dtype == torch.float32 else 64
    out, ref = run_case(MIXED, heads, kv_heads, head_dim, block_size, dtype, num_kv_splits)
    assert_close(out, ref, dtype)


def test_bf16_against_fp32_truth() -> None:
    """The bf16 kernel is no further from exact (fp32) attention than the bf16 torch path is."""
    out, ref = run_case(MIXED, 6, 2, 64, 16, torch.bfloat16, 2)
    truth, _ = run_case(MIXED, 6, 2, 64, 16, torch.float32, 1)  # same seed: the same inputs, upcast
    err_kernel = (out.float() - truth).abs().max().item()
    err_ref = (ref.float() - truth).abs().max().item()
    assert err_kernel <= 2 * err_ref + 1e-3, (err_kernel, err_ref)


def test_fp16() -> None:
    out, ref = run_case(MIXED[2:6], 6, 2, 32, 16, torch.float16, 1)
    assert (out.float() - ref.float()).abs().max().item() < 5e-3


def test_split_kv_matches_single_pass() -> None:
    """Flash-decoding on long decodes at batch 2: several splits (including more splits than KV
    tiles for the short sequence, so some slices are empty) give the single-pass result."""
    shape = [(1, 100), (1, 9), (5, 90)]
    single, ref = run_case(shape, 6, 2, 32, 16, torch.float32, 1)
    for splits in (2, 5, 8):
        split, _ = run_case(shape, 6, 2, 32, 16, torch.float32, splits)
        assert (split - single).abs().max().item() < 1e-5
    assert_close(single, ref, torch.float32)
    # Batch of one long decode: the case split-KV exists for.
    out, ref = run_case([(1, 100)], 8, 1, 64, 16, torch.bfloat16, 4)
    assert_close(out, ref, torch.bfloat16)


def test_decode_only_and_prefill_only_batches() -> None:
    out, ref = run_case([(1, 5), (1, 40), (1, 81)], 8, 1, 32, 16, torch.float32, 1)
    assert_close(out, ref, torch.float32)
    out, ref = run_case([(17, 17), (16, 48)], 6, 2, 32, 32, torch.float32, 1)
    assert_close(out, ref, torch.float32)


def test_write_kv_skips_padding_slots() -> None:
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, kv_heads, head_dim = 4, 16, 3, 32
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    # Non-contiguous k, v: slices of a fused [T, 2 * kv_heads, head_dim] projection output.
    kv = torch.randn(6, 2 * kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    k, v = kv[:, :kv_heads], kv[:, kv_heads:]
    slots = torch.tensor([5, -1, 40, 63, -1, 17], dtype=torch.int64)
    write_kv_triton(k, v, k_cache, v_cache, slots)
    keep = slots >= 0
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    write_kv(k[keep], v[keep], k_ref, v_ref, slots[keep])
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_rejects_block_size_not_multiple_of_16() -> None:
    gen = torch.Generator().manual_seed(2)
    meta = make_metadata([(1, 5)], 8, 2, gen)
    cache = torch.zeros(2, 8, 1, 32)
    with pytest.raises(AssertionError, match="multiple of 16"):
        unified_attention_triton(torch.zeros(1, 1, 32), cache, cache, meta, 1.0)


def test_kernels_compile_for_cuda() -> None:
    """The interpreter is not the compiler: lower the kernels ahead of time for sm_90 (no GPU needed)
    so that what only the real compiler checks (loop-carried types, dot shapes, casts, early return)
    is covered. Runs in a subprocess: with TRITON_INTERPRET=1 in this process, triton's own jit
    helpers (tl.cdiv, tl.sum, ...) are interpreter objects that the compiler cannot lower."""
    pytest.importorskip("triton.backends.nvidia", reason="triton has no CUDA backend")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, __file__, "--compile-for-cuda"], env=env, cwd=root, capture_output=True, text=True
    )
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 6, proc.stdout


def compile_for_cuda() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from worker import triton_attention as ta

    try:
        triton.knobs.nvidia.ptxas  # noqa: B018 - raises when the bundled ptxas is missing
    except Exception as exc:
        print(f"no ptxas to compile for CUDA: {exc}")
        return 77

    def compile_kernel(fn: Any, types: dict[str, str], consts: dict[str, object]) -> None:
        signature = {
            name: "constexpr" if name in consts else types.get(name, "i32")  # strides, counts: i32
            for name in fn.arg_names
        }
        constexprs = {(fn.arg_names.index(name),): value for name, value in consts.items()}
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)
        )
        assert "cubin" in kernel.asm
        print("compiled", fn.__name__, consts)

    ints = {"query_start_ptr": "*i32", "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32", "qk_scale": "fp32"}
    for dt, splits, group in (("bf16", 1, 3), ("bf16", 4, 8), ("fp16", 1, 1), ("fp32", 2, 3)):
        block_m = 64 if group == 1 else 16
        types = {
            "q_ptr": f"*{dt}",
            "k_cache_ptr": f"*{dt}",
            "v_cache_ptr": f"*{dt}",
            "lse_ptr": "*fp32",
            **ints,
        }
        types["out_ptr"] = f"*{dt}" if splits == 1 else "*fp32"
        consts: dict[str, object] = dict(GROUP=group, HEAD_DIM=64, DIM_PAD=64, BLOCK_SIZE=16, BLOCK_M=block_m)
        consts.update(BLOCK_Q=block_m // group, NUM_SPLITS=splits, DOT_FP32=dt == "fp32")
        compile_kernel(ta._unified_attention_kernel, types, consts)
    kv = {name: "*bf16" for name in ("k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr")}
    compile_kernel(
        ta._write_kv_kernel,
        {**kv, "slot_ptr": "*i64"},
        dict(KV_HEADS=3, HEAD_DIM=64, BLOCK_SIZE=16, HEADS_PAD=4, DIM_PAD=64),
    )
    compile_kernel(
        ta._merge_splits_kernel,
        {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"},
        dict(HEAD_DIM=64, DIM_PAD=64, NUM_SPLITS=4, SPLITS_PAD=4),
    )
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--compile-for-cuda"]:
    sys.exit(compile_for_cuda())
