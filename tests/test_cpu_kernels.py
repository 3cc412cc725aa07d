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
    with pytest.raises(RuntimeError, match="in q.s dtype or int8"):
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


# -- the fused per-layer ops, against the torch code they replace (worker.models.llama) -------------


def _bf16(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def _assert_nearly_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal but for a rare last-bit difference (one fp32 sum or exp in another order)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    same = (got == want).float().mean().item()
    assert same >= 0.99, f"only {same:.2%} identical"
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 32, 300])  # 300 x 576 rows run on both threads
def test_rms_norm_and_residual_add_match_torch(kernels, rows):
    from worker.models.llama import RMSNorm

    norm = RMSNorm(576, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(_bf16(576, seed=1, scale=0.5) + 1)
    h, delta = _bf16(rows, 576, seed=2, scale=3), _bf16(rows, 576, seed=3)
    _assert_nearly_equal(kernels.rms_norm(h, norm.weight, norm.eps), norm(h))
    residual = h.clone()
    normed = kernels.add_rms_norm(residual, delta, norm.weight, norm.eps)
    assert torch.equal(residual, h + delta)  # written in place, rounded as torch's add
    _assert_nearly_equal(normed, norm(h + delta))


@pytest.mark.parametrize("rows,intermediate", [(1, 1536), (32, 1536), (64, 1544), (5, 7)])
def test_silu_mul_matches_torch(kernels, rows, intermediate):
    gate_up = _bf16(rows, 2 * intermediate, seed=rows, scale=4)
    gate, up = gate_up.split(intermediate, dim=-1)
    _assert_nearly_equal(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 128)])
def test_rope_and_cache_equal_the_torch_path(kernels, heads, kv_heads, head_dim):
    from worker.attention import write_kv
    from worker.models.llama import apply_rotary

    tokens, num_blocks, block_size = 11, 8, 4
    qkv = _bf16(tokens, (heads + 2 * kv_heads) * head_dim, seed=heads, scale=2)
    angles = torch.rand(tokens, head_dim // 2, generator=torch.Generator().manual_seed(0)) * 6
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).bfloat16()
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).bfloat16()
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(1))[:tokens]
    shape = (num_blocks, block_size, kv_heads, head_dim)

    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q_ref, k_ref = apply_rotary(
        q.reshape(tokens, heads, head_dim),
        k.reshape(tokens, kv_heads, head_dim),
        (cos.unsqueeze(1), sin.unsqueeze(1)),
    )
    k_cache_ref, v_cache_ref = torch.zeros(shape).bfloat16(), torch.zeros(shape).bfloat16()
    write_kv(k_ref, v.reshape(tokens, kv_heads, head_dim), k_cache_ref, v_cache_ref, slots)

    fused, k_cache, v_cache = qkv.clone(), torch.zeros(shape).bfloat16(), torch.zeros(shape).bfloat16()
    kernels.rope_and_cache(fused, cos, sin, slots, k_cache, v_cache, heads, kv_heads)
    assert torch.equal(fused[:, : heads * head_dim].view(tokens, heads, head_dim), q_ref)
    assert torch.equal(k_cache, k_cache_ref) and torch.equal(v_cache, v_cache_ref)
    with pytest.raises(RuntimeError, match="slot"):
        kernels.rope_and_cache(fused, cos, sin, slots + 1000, k_cache, v_cache, heads, kv_heads)


def test_bf16_model_with_fused_ops_agrees_with_the_torch_path(tmp_path, monkeypatch):
    """Same tiny model, same prompts: the fused ops change nothing but rare last bits, so the
    first token of every prompt and its logprob agree with the torch path's."""
    from tiny_models import build_tiny_llama

    from pagemesh import LLM, SamplingParams

    path = build_tiny_llama(tmp_path / "m")
    prompts = [{"prompt_token_ids": [1, *range(5 + i, 60 + 7 * i)]} for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=1)

    def first_tokens() -> list[tuple[int, float]]:
        llm = LLM(str(path), dtype="bfloat16", skip_tokenizer_init=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [
            (o.outputs[0].token_ids[0], next(iter(o.outputs[0].logprobs[0].values())).logprob) for o in outs
        ]

    fused = first_tokens()
    cpu_kernels.load.cache_clear()
    monkeypatch.setenv("PAGEMESH_CPU_KERNELS", "0")
    try:
        plain = first_tokens()
    finally:
        cpu_kernels.load.cache_clear()
    assert [t for t, _ in fused] == [t for t, _ in plain]
    for (_, a), (_, b) in zip(fused, plain, strict=True):
        assert abs(a - b) < 0.05


def test_runner_uses_the_kernels_in_bf16_only(tmp_path):
    """bf16 on CPU runs every kernel (a build that silently fell back would lose the fast path);
    fp32, the mode that matches transformers token for token, runs none."""
    from tiny_models import build_tiny_llama

    from worker.model_runner import ModelRunner

    path = str(build_tiny_llama(tmp_path / "m"))
    bf16 = ModelRunner(path, dtype="bfloat16", kv_cache_memory=1 << 20)
    assert bf16.cpu_kernels == "decode attention, fused layer ops"
    assert bf16.model.layers[0].self_attn.ops is not None
    fp32 = ModelRunner(path, dtype="float32", kv_cache_memory=1 << 20)
    assert fp32.cpu_kernels == "" and fp32.model.layers[0].self_attn.ops is None
