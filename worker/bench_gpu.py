"""GPU benchmark of the worker's CUDA path: `python -m worker.bench_gpu` (one NVIDIA GPU; about
5 minutes on an H100, most of it writing and loading 16 GB of random weights).

1. Copy bandwidth: a device-to-device copy of a large tensor, the roofline of memory-bound steps.
2. The Triton kernels against the torch path on the GPU, at Llama-3-8B attention shapes (bf16,
   fp16, fp32; with and without split-KV), and the attention kernel's own bandwidth.
3. A Llama-3-8B-shaped model with random bf16 weights (config.json + safetensors in a temporary
   directory), loaded through pagemesh.LLM: Triton attention and CUDA graphs, as served.
4. CUDA-graph replay against the eager forward on the same decode inputs (padded and split).
5. Decode step time at batch 1/8/32/64 (graphs and eager) and one long-context decode, with the
   achieved HBM bandwidth: (weight bytes + KV bytes read per step) / step time, set against the
   copy bandwidth; and one prefill step.
6. Output tok/s at 64 streams through the engine (greedy, ignore_eos), with graphs and eager.

The weights are random, so the tokens mean nothing; every step does the work of the real model.
Sampling is greedy throughout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.attention import AttentionMetadata

if TYPE_CHECKING:
    from pagemesh.llm import LLM
    from worker.model_runner import ModelRunner

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 128256, 32, 8, 128
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": 32,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)


def gpu_seconds(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Mean device time of one call, from CUDA events around `iters` back-to-back calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


# -- 1. copy bandwidth ----------------------------------------------------------------------------


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes/s of a device-to-device copy: each byte is read once and written once."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = gpu_seconds(partial(dst.copy_, src), iters=20)
    return 2 * nbytes / seconds


# -- 2. kernels -------------------------------------------------------------------------------------


def random_paged_batch(
    shape: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """q, k, v for sequences given as (q_len, context_len), decodes first, over a random cache
    with shuffled block tables. Returns (q, k, v, k_cache, v_cache, metadata)."""
    block_size = 16
    num_blocks = sum(-(-ctx // block_size) for _, ctx in shape) + 8
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, starts = [], [], [0]
    for q_len, ctx in shape:
        n = -(-ctx // block_size)
        blocks, pool = pool[:n], pool[n:]
        tables.append(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx)]
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in tables)
    seq_lens = [ctx for _, ctx in shape]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda"
        ),
        num_decodes=sum(1 for q_len, _ in shape if q_len == 1),
        query_start_host=starts,
        seq_lens_host=seq_lens,
    )

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(dtype).cuda()

    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    q, k, v = (
        randn(starts[-1], heads, head_dim),
        randn(starts[-1], kv_heads, head_dim),
        randn(starts[-1], kv_heads, head_dim),
    )
    return q, k, v, randn(*cache_shape), randn(*cache_shape), meta


def check_kernels() -> None:
    from worker.attention import paged_attention, write_kv
    from worker.triton_attention import unified_attention_triton, write_kv_triton

    print("Triton kernels against the torch path (32 heads, 8 KV heads, head_dim 128, blocks of 16):")
    mixed = [(1, 1), (1, 17), (1, 1000), (1, 3000), (300, 300), (77, 900), (1024, 1024)]
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 5e-3), (torch.float32, 1e-4)):
        q, k, v, k_cache, v_cache, meta = random_paged_batch(mixed, 32, 8, 128, dtype, gen)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        write_kv(k, v, k_ref, v_ref, meta.slot_mapping)
        write_kv_triton(k, v, k_cache, v_cache, meta.slot_mapping)
        check(torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), f"write_kv_triton {dtype}: exact")
        ref = paged_attention(q, k, v, k_ref, v_ref, meta, 128**-0.5)
        for splits in (1, 4, 16):
            out = unified_attention_triton(q, k_cache, v_cache, meta, 128**-0.5, splits)
            err = (out.float() - ref.float()).abs().max().item()
            bound = tol * max(1.0, ref.float().abs().max().item())
            check(
                err < bound,
                f"unified attention {dtype}, {splits} KV split(s): max |diff| {err:.2e} < {bound:.0e}",
            )
    del q, k, v, k_cache, v_cache, k_ref, v_ref
    torch.cuda.empty_cache()


def time_attention_kernel(copy_bw: float) -> None:
    from worker.attention_backend import choose_num_kv_splits
    from worker.triton_attention import unified_attention_triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"Attention kernel alone, bf16 decode, one layer ({sms} SMs):")
    gen = torch.Generator().manual_seed(1)
    for batch, ctx in ((64, 1024), (8, 4096), (1, 8192)):
        q, _, _, k_cache, v_cache, meta = random_paged_batch(
            [(1, ctx)] * batch, 32, 8, 128, torch.bfloat16, gen
        )
        kv_bytes = 2 * batch * ctx * 8 * 128 * 2
        for splits in sorted({1, choose_num_kv_splits(batch, 8, ctx, 16, sms)}):
            s = gpu_seconds(
                partial(unified_attention_triton, q, k_cache, v_cache, meta, 128**-0.5, splits), 50
            )
            print(
                f"  batch {batch:3d} x {ctx:5d} tokens, {splits:2d} split(s): {s * 1e6:8.1f} us, "
                f"KV read {kv_bytes / s / 1e9:7.0f} GB/s ({kv_bytes / s / copy_bw:4.0%} of copy)"
            )
        del q, k_cache, v_cache
    torch.cuda.empty_cache()


# -- 3. the model ----------------------------------------------------------------------------------


def write_random_llama(path: Path, num_layers: int) -> None:
    """config.json + random bf16 safetensors shaped like Llama-3-8B (std 0.02, norms at 1)."""
    from safetensors.torch import save_file

    cfg = dict(LLAMA3_8B, num_hidden_layers=num_layers)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    h, inter, v, kv = HIDDEN, INTERMEDIATE, VOCAB, KV_HEADS * HEAD_DIM

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    save_file(
        {"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h), "model.norm.weight": ones(h)},
        str(path / "model-embed.safetensors"),
    )
    for first in range(0, num_layers, 4):  # ~1.7 GB a shard: host memory stays small
        shard: dict[str, torch.Tensor] = {}
        for i in range(first, min(first + 4, num_layers)):
            p = f"model.layers.{i}."
            shard |= {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(inter, h),
                p + "mlp.up_proj.weight": rand(inter, h),
                p + "mlp.down_proj.weight": rand(h, inter),
                p + "input_layernorm.weight": ones(h),
                p + "post_attention_layernorm.weight": ones(h),
            }
        save_file(shard, str(path / f"model-layers-{first:02d}.safetensors"))


# -- 4, 5. decode and prefill steps through the ModelRunner -----------------------------------------


class StepDriver:
    """Feeds the runner hand-made steps (the engine's scheduler is idle meanwhile), with block ids
    handed out from the top of the pool."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.vocab = runner.cfg.vocab_size
        self.step_id = 1 << 30
        self.gen = torch.Generator().manual_seed(2)

    def step(self, **kw: object) -> float:
        from services.step import StepInput

        self.step_id += 1
        start = time.perf_counter()
        self.runner.execute(StepInput(step_id=self.step_id, **kw))  # type: ignore[arg-type]
        return time.perf_counter() - start  # execute returns sampled tokens on the host: synchronous

    def add(self, batch: int, context: int, room: int, tag: str) -> list[str]:
        """Add `batch` requests with `context` random prompt tokens and blocks for `room` more, and
        prefill them in steps of up to 8192 tokens."""
        from services.sampling_params import SamplingParams
        from services.step import NewRequest

        bs = self.runner.block_size
        per = -(-(context + room) // bs)
        total = self.runner.num_blocks
        assert batch * per <= total, f"{batch} x {context + room} tokens do not fit {total} blocks"
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        new = [
            NewRequest(
                req_id=f"{tag}-{i}",
                token_ids=torch.randint(0, self.vocab, (context,), generator=self.gen).tolist(),
                block_ids=list(range(total - (i + 1) * per, total - i * per)),
                num_computed_tokens=0,
                sampling=params,
            )
            for i in range(batch)
        ]
        per_step = max(1, 8192 // context)
        for i in range(0, batch, per_step):
            chunk = new[i : i + per_step]
            self.step(new_requests=chunk, num_scheduled_tokens={r.req_id: context for r in chunk})
        return [r.req_id for r in new]

    def decode(self, ids: list[str], steps: int) -> list[float]:
        return [self.step(num_scheduled_tokens=dict.fromkeys(ids, 1)) for _ in range(steps)]

    def drop(self, ids: list[str]) -> None:
        self.step(dropped_req_ids=ids)


def check_graph_against_eager(r: ModelRunner, ids: list[str]) -> None:
    """The same decode inputs through a graph replay and through the eager forward: the same kernels
    on the same shapes, so the hidden states must agree (both write the same k, v to the same slots)."""
    from worker.attention_backend import choose_num_kv_splits
    from worker.cuda_graph import pad_decode_batch

    graphs = r.decode_graphs
    assert graphs is not None
    states = [r.requests[i] for i in ids]
    bs = r.block_size
    pos = [s.num_computed_tokens for s in states]
    seq_lens = [p + 1 for p in pos]
    batch = pad_decode_batch(
        [s.token_ids[p] for s, p in zip(states, pos, strict=True)],
        pos,
        [s.block_ids[p // bs] * bs + p % bs for s, p in zip(states, pos, strict=True)],
        seq_lens,
        [s.block_ids[: -(-n // bs)] for s, n in zip(states, seq_lens, strict=True)],
        graphs.padded_size(len(states)),
    )
    size = batch.input_ids.shape[0]
    splits = choose_num_kv_splits(size, r.cfg.num_kv_heads, max(seq_lens), bs, r.num_sms)
    with torch.inference_mode():
        replayed = graphs.run(batch, splits)[: len(states)].float()
        meta = AttentionMetadata(
            slot_mapping=batch.slot_mapping.cuda(),
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device="cuda"),
            seq_lens=batch.seq_lens.cuda(),
            block_tables=batch.block_tables.cuda(),
            num_decodes=size,
            query_start_host=list(range(size + 1)),
            seq_lens_host=batch.seq_lens.tolist(),
            num_kv_splits=splits,
        )
        eager = r.model(batch.input_ids.cuda(), batch.positions.cuda(), r.kv_caches, meta)[
            : len(states)
        ].float()
    err = (replayed - eager).abs().max().item()
    scale = eager.abs().max().item()
    check(
        err <= 1e-3 * scale,
        f"graph replay == eager forward: {len(states)} seqs padded to {size}, {splits} KV split(s), "
        f"context {max(seq_lens)}: max |diff| {err:.2e} (values up to {scale:.1f})",
    )


def bench_steps(runner: ModelRunner, copy_bw: float, context: int) -> None:
    cfg = runner.cfg
    driver = StepDriver(runner)
    params = list(runner.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    embed = runner.model.embed_tokens.weight
    weight_bytes -= embed.numel() * embed.element_size()  # a decode step reads B rows of it, not all
    kv_token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * embed.element_size()
    params_no_embed = sum(p.numel() for p in params) - embed.numel()

    # Compile the kernel variants before anything is timed.
    warm = driver.add(4, 64, 8, "warm")
    driver.decode(warm, 2)
    driver.drop(warm)

    print("CUDA graphs against eager, on the real model:")
    ids = driver.add(8, 300, 8, "check")
    driver.decode(ids, 2)
    check_graph_against_eager(runner, ids[:5])  # padded 5 -> 8
    check_graph_against_eager(runner, ids[:1])
    driver.drop(ids)
    ids = driver.add(1, min(4000, runner.max_model_len - 16), 8, "check-long")
    check_graph_against_eager(runner, ids)  # one long context: split-KV
    driver.drop(ids)

    print(f"Decode steps (context {context} tokens per sequence; ModelRunner.execute incl. sampling):")
    print(
        f"  {'batch':>5} {'graphs ms':>10} {'eager ms':>9} {'speedup':>8} {'HBM GB/s':>9} {'of copy':>8} "
        f"{'tok/s':>8}"
    )
    cases = [(b, context) for b in (1, 8, 32, 64)] + [(1, runner.max_model_len - 64)]
    for batch, ctx in cases:
        ids = driver.add(batch, ctx, 48, f"decode{batch}x{ctx}")
        driver.decode(ids, 3)
        with_graphs = statistics.median(driver.decode(ids, 15))
        graphs, runner.decode_graphs = runner.decode_graphs, None
        try:
            eager = statistics.median(driver.decode(ids, 15))
        finally:
            runner.decode_graphs = graphs
        step_bytes = weight_bytes + batch * (ctx + 25) * kv_token_bytes
        best = min(with_graphs, eager) if graphs is not None else eager
        print(
            f"  {batch:5d} {with_graphs * 1e3:10.2f} {eager * 1e3:9.2f} {eager / with_graphs:7.2f}x "
            f"{step_bytes / best / 1e9:9.0f} {step_bytes / best / copy_bw:8.0%} {batch / best:8.0f}"
            + (f"   (context {ctx})" if ctx != context else ""),
            flush=True,
        )
        driver.drop(ids)

    print("Prefill step:")
    for batch, ctx in ((1, 2048), (4, 2048)):
        times = []
        for rep in range(3):
            start = time.perf_counter()
            ids = driver.add(batch, ctx, 0, f"prefill{batch}-{rep}")
            times.append(time.perf_counter() - start)
            driver.drop(ids)
        s = min(times)
        tokens = batch * ctx
        print(
            f"  {batch} x {ctx} tokens: {s * 1e3:7.1f} ms, {tokens / s:8.0f} tok/s, "
            f"{2 * params_no_embed * tokens / s / 1e12:5.0f} TFLOP/s (2 x params x tokens)"
        )


# -- 6. the engine -------------------------------------------------------------------------------


def bench_engine(llm: LLM, streams: int, prompt_len: int, output_len: int) -> None:
    from services.sampling_params import SamplingParams

    vocab = llm.runner.cfg.vocab_size
    gen = torch.Generator().manual_seed(3)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    print(
        f"Engine (pagemesh.LLM.generate): {streams} streams, {prompt_len} prompt + {output_len} "
        "output tokens each:"
    )
    runner = llm.runner
    graphs = runner.decode_graphs
    for label, use_graphs in (("CUDA graphs", True), ("eager", False)):
        if use_graphs and graphs is None:
            continue
        prompts = [
            {"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()}
            for _ in range(streams)
        ]
        runner.decode_graphs = graphs if use_graphs else None
        try:
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
        finally:
            runner.decode_graphs = graphs
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        check(generated == streams * output_len, f"{label}: {generated} tokens generated")
        print(f"  {label:12s}: {generated / seconds:8.0f} output tok/s ({seconds:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=32, help="decoder layers (32: Llama-3-8B)")
    p.add_argument("--context", type=int, default=1024, help="tokens per sequence for the decode timings")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--output-len", type=int, default=256, help="output tokens per stream in the engine run")
    p.add_argument("--model-dir", default=None, help="reuse (or keep) the random model in this directory")
    a = p.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            f"bench_gpu: no CUDA device visible (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}): this benchmark needs one NVIDIA GPU.",
            file=sys.stderr,
        )
        return 2
    from worker.triton_attention import triton_available

    if not triton_available():
        print("bench_gpu: triton cannot be imported; install it (pip install triton).", file=sys.stderr)
        return 2

    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name}: {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
        f"torch {torch.__version__}"
    )
    copy_bw = copy_bandwidth()
    torch.cuda.empty_cache()  # give the copy buffers back before the KV cache is sized from free memory
    print(f"Copy bandwidth (device to device, read + write): {copy_bw / 1e9:.0f} GB/s", flush=True)
    check_kernels()
    time_attention_kernel(copy_bw)

    model_dir = Path(a.model_dir) if a.model_dir else Path(tempfile.mkdtemp(prefix="pagemesh-bench-"))
    try:
        if not (model_dir / "config.json").is_file():
            start = time.perf_counter()
            write_random_llama(model_dir, a.num_layers)
            print(
                f"Wrote a random Llama-3-8B-shaped model to {model_dir} "
                f"in {time.perf_counter() - start:.0f}s",
                flush=True,
            )
        from pagemesh.llm import LLM

        start = time.perf_counter()
        llm = LLM(
            str(model_dir),
            skip_tokenizer_init=True,
            device="cuda",
            max_model_len=a.max_model_len,
            max_num_seqs=128,
        )
        runner = llm.runner
        print(
            f"Loaded in {time.perf_counter() - start:.0f}s: {runner.attention_backend} attention, "
            f"{'CUDA graphs' if runner.decode_graphs else 'eager'}, {runner.num_blocks} KV blocks "
            f"of {runner.block_size} tokens",
            flush=True,
        )
        bench_steps(runner, copy_bw, a.context)
        bench_engine(llm, 64, 128, a.output_len)
    finally:
        if not a.model_dir:
            shutil.rmtree(model_dir, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) FAILED:", *failures, sep="\n  ")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
