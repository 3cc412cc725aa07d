"""The CPU decode-attention kernel (worker.cpu_kernels) against attention computed in float64 on
gathered contexts, over the shapes its fast and generic paths split on."""

from __future__ import annotations

import pytest
import torch

from worker import cpu_kernels


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.load()
    assert module is not None, "the CPU kernel must build here (a C++ compiler and ninja are installed)"
    return module


def reference(q, k_cache, v_cache, tables, lens, scale):
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, n in enumerate(lens.tolist()):
        blocks = tables[i, : -(-n // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(heads // kv_heads, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", q[i].double(), k) * scale
        out[i] = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [
        (9, 3, 64, 16),  # SmolLM2: groups of 3, the vectorized paths
        (8, 8, 128, 16),  # MHA, a wide head
        (4, 1, 32, 8),  # MQA, small blocks
        (12, 1, 16, 32),  # a group of 12: the generic weighted-sum path
        (6, 2, 40, 16),  # a head size that no vector path covers
    ],
)
def test_decode_attention_matches_float64(kernels, dtype, heads, kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim)
    num_blocks, seqs = 128, 7
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 2, block_size, block_size + 1, 3 * block_size - 1, 70, 5], dtype=torch.int32)
    width = -(-int(lens.max()) // block_size) + 1  # one spare column: padding the kernel must not read
    # Blocks of a sequence lie anywhere in the pool, and padding points at block 0 as the runner's does.
    tables = torch.randperm(num_blocks, generator=gen)[: seqs * width].view(seqs, width).to(torch.int32)
    q = torch.randn(seqs, heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    out = kernels.decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    expected = reference(q, k_cache, v_cache, tables, lens, scale)
    # float32: sums in another order; half precision: the output's own rounding
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


def test_decode_attention_rejects_what_it_cannot_read(kernels):
    q = torch.randn(2, 4, 16)
    cache = torch.randn(8, 16, 2, 16)
    tables = torch.zeros(2, 1, dtype=torch.int32)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernels.decode_attention(q.bfloat16(), cache, cache, tables, lens, 0.25)
    with pytest.raises(RuntimeError, match="int32"):
        kernels.decode_attention(q, cache, cache, tables.long(), lens, 0.25)
    with pytest.raises(RuntimeError, match="head shapes"):
        kernels.decode_attention(torch.randn(2, 3, 16), cache, cache, tables, lens, 0.25)


def test_off_switch_falls_back_to_the_torch_path(monkeypatch):
    cpu_kernels.load.cache_clear()
    monkeypatch.setenv("PAGEMESH_CPU_KERNELS", "0")
    try:
        assert cpu_kernels.load() is None
    finally:
        cpu_kernels.load.cache_clear()
