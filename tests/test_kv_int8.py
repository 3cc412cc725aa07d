"""The int8 KV cache (`--kv-cache-dtype int8`): its row format, the C++ kernels and the torch path
that read and write it, and a model served with it."""

from __future__ import annotations

import pytest
import torch
from test_cpu_kernels import reference
from tiny_models import build_tiny_llama

from pagemesh import LLM, SamplingParams
from worker import cpu_kernels, kv_quant
from worker.attention import AttentionMetadata, paged_attention, write_kv


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.load()
    assert module is not None, "the CPU kernels must build here"
    return module


def test_rows_hold_values_within_half_a_step_and_their_scale():
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(0)) * 4
    x[0, 0] = 0  # an all-zero row: scale 0, values 0
    rows = kv_quant.quantize(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 3, 66)
    scale = rows[..., 64:].contiguous().view(torch.float16).float().squeeze(-1)
    torch.testing.assert_close(scale, x.abs().amax(-1) / 127, rtol=2**-11, atol=0)
    assert rows[..., :64].abs().max() == 127  # every nonzero row spans the whole int8 range
    # half a step, plus up to 127 steps times the fp16 scale's rounding (2^-11 relative)
    error = (kv_quant.dequantize(rows, torch.float32) - x).abs()
    assert (error <= scale.unsqueeze(-1) * (0.5 + 127 * 2**-11)).all()
    assert torch.equal(kv_quant.dequantize(rows, torch.float32)[0, 0], torch.zeros(64))


def _int8_caches(kv_heads, head_dim, block_size, num_blocks=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return kv_quant.quantize(torch.randn(shape, generator=gen)), kv_quant.quantize(
        torch.randn(shape, generator=gen)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [
        (9, 3, 64, 16),  # SmolLM2: the vectorized paths
        (4, 1, 32, 8),  # MQA
        (12, 1, 16, 32),  # a group of 12: the generic weighted-sum path
        (6, 2, 40, 16),  # a head size no vector path covers
    ],
)
def test_decode_kernel_reads_int8_rows_as_their_values(kernels, dtype, heads, kv_heads, head_dim, block_size):
    """Against float64 attention over the dequantized cache: the kernel adds no error of its own
    beyond fp32 sums and the output's rounding."""
    k_cache, v_cache = _int8_caches(kv_heads, head_dim, block_size, seed=heads)
    gen = torch.Generator().manual_seed(1)
    lens = torch.tensor([1, block_size, block_size + 1, 3 * block_size - 1, 70], dtype=torch.int32)
    width = -(-int(lens.max()) // block_size) + 1
    tables = torch.randperm(64, generator=gen)[: 5 * width].view(5, width).to(torch.int32)
    q = torch.randn(5, heads, head_dim, generator=gen).to(dtype)
    out = kernels.decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    assert out.dtype == dtype
    k_values, v_values = (
        kv_quant.dequantize(k_cache, torch.float64),
        kv_quant.dequantize(v_cache, torch.float64),
    )
    expected = reference(q, k_values, v_values, tables, lens, head_dim**-0.5)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


def test_torch_path_writes_and_reads_int8_like_the_kernels(kernels):
    """write_kv quantizes; paged_attention's own decode and its prefill over a cached context
    dequantize: both agree with the C++ decode kernel on the same cache."""
    heads, kv_heads, head_dim, block_size = 4, 2, 32, 8
    k_cache, v_cache = (
        torch.zeros(16, block_size, kv_heads, head_dim + 2, dtype=torch.int8) for _ in range(2)
    )
    gen = torch.Generator().manual_seed(2)
    context = 21  # tokens already cached for one sequence, then one decode token
    k = torch.randn(context, kv_heads, head_dim, generator=gen).bfloat16()
    v = torch.randn(context, kv_heads, head_dim, generator=gen).bfloat16()
    table = torch.tensor([[5, 2, 9, 0]], dtype=torch.int32)
    slots = torch.tensor(
        [int(table[0, t // block_size]) * block_size + t % block_size for t in range(context)]
    )
    write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim + 2)[slots], kv_quant.quantize(k))

    q = torch.randn(1, heads, head_dim, generator=gen).bfloat16()
    meta = AttentionMetadata(
        slot_mapping=slots[-1:],
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.tensor([context], dtype=torch.int32),
        block_tables=table,
        num_decodes=1,
        query_start_host=[0, 1],
        seq_lens_host=[context],
    )
    scale = head_dim**-0.5
    torch_decode = paged_attention(q, k[-1:], v[-1:], k_cache, v_cache, meta, scale)
    kernel_decode = paged_attention(
        q, k[-1:], v[-1:], k_cache, v_cache, meta, scale, kernels.decode_attention
    )
    torch.testing.assert_close(torch_decode.float(), kernel_decode.float(), atol=1e-2, rtol=1e-2)

    # The same last token as a one-token prefill chunk after 20 cached ones: the prefill path.
    prefill = AttentionMetadata(**{**{f: getattr(meta, f) for f in meta.__slots__}, "num_decodes": 0})
    torch.testing.assert_close(
        paged_attention(q, k[-1:], v[-1:], k_cache, v_cache, prefill, scale).float(),
        kernel_decode.float(),
        atol=1e-2,
        rtol=1e-2,
    )


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 1, 128)])
def test_fused_rope_and_cache_writes_the_torch_paths_int8_rows(kernels, heads, kv_heads, head_dim):
    from worker.models.llama import apply_rotary

    tokens, block_size = 7, 4
    gen = torch.Generator().manual_seed(heads)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 2).bfloat16()
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).bfloat16()
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).bfloat16()
    slots = torch.randperm(8 * block_size, generator=gen)[:tokens]
    shape = (8, block_size, kv_heads, head_dim + 2)

    _, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    _, k_rotated = apply_rotary(
        k.reshape(tokens, kv_heads, head_dim),
        k.reshape(tokens, kv_heads, head_dim),
        (cos.unsqueeze(1), sin.unsqueeze(1)),
    )
    k_ref, v_ref = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
    write_kv(k_rotated, v.reshape(tokens, kv_heads, head_dim), k_ref, v_ref, slots)

    k_cache, v_cache = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
    kernels.rope_and_cache(qkv.clone(), cos, sin, slots, k_cache, v_cache, heads, kv_heads)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_model_with_int8_kv_stays_close_to_bf16_kv(tmp_path):
    """The same tiny bf16 model with either cache: the first tokens agree and their logprobs
    differ by what quantizing K and V costs (well under a tenth of a nat); the int8 cache holds
    ~1.9x the blocks in the same memory."""
    path = str(build_tiny_llama(tmp_path / "m"))
    prompts = [{"prompt_token_ids": [1, *range(5 + i, 60 + 7 * i)]} for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=0)

    def run(kv_cache_dtype: str) -> tuple[int, list]:
        llm = LLM(
            path,
            dtype="bfloat16",
            kv_cache_memory=1 << 20,
            kv_cache_dtype=kv_cache_dtype,
            skip_tokenizer_init=True,
        )
        outs = llm.generate(prompts, params, use_tqdm=False)
        return llm.runner.num_blocks, [o.outputs[0] for o in outs]

    bf16_blocks, bf16 = run("auto")
    int8_blocks, int8 = run("int8")
    assert int8_blocks == (1 << 20) // (2 * 2 * 16 * 2 * (16 + 2)) and int8_blocks > 1.5 * bf16_blocks
    for a, b in zip(bf16, int8, strict=True):
        assert a.token_ids[0] == b.token_ids[0]
        first_a, first_b = (next(iter(o.logprobs[0].values())).logprob for o in (a, b))
        assert abs(first_a - first_b) < 0.1


def test_int8_kv_refuses_the_triton_backend_and_unknown_names(tmp_path):
    from worker.model_runner import ModelRunner

    path = str(build_tiny_llama(tmp_path / "m"))
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8"):
        ModelRunner(path, dtype="bfloat16", kv_cache_memory=1 << 20, kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match="torch attention backend only"):
        ModelRunner(path, kv_cache_memory=1 << 20, kv_cache_dtype="int8", attention_backend="triton")


def test_default_model_with_int8_kv_still_says_paris(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="bfloat16", kv_cache_dtype="int8", max_model_len=1024)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )
    assert out[0].outputs[0].text == "The capital of France is Paris."
