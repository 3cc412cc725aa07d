"""`python -m pagemesh.bench.profile`: where an engine step's time goes, per batch size.

For each batch size: random 130-token prompts, `--output-len` tokens each (ignore_eos). The
decode step time is (whole generate - prefill-only generate) / (output_len - 1); then
torch.profiler over one whole generate lists the torch ops that dominate, in milliseconds per
step (prefill included, so the largest batch's rows carry some of it). Run it on a quiet machine:
torch's OpenMP threads slow down sharply when other processes take the cores.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pagemesh.bench.profile", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--input-len", type=int, default=130)
    p.add_argument("--output-len", type=int, default=33)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--top", type=int, default=8, help="rows per batch size")
    a = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from pagemesh import LLM, SamplingParams
    from pagemesh.bench.throughput import random_prompts
    from pagemesh.model_store import ensure_default_model

    llm = LLM(a.model or str(ensure_default_model()), dtype=a.dtype)
    params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    vocab = llm.runner.cfg.vocab_size

    seeds = iter(range(1, 1_000_000))

    def prompts(batch: int) -> list:  # fresh prompts every call: no prefix-cache hits
        return [{"prompt_token_ids": ids} for ids in random_prompts(batch, a.input_len, vocab, next(seeds))]

    def seconds(batch: int, sampling: SamplingParams) -> float:
        start = time.perf_counter()
        llm.generate(prompts(batch), sampling, use_tqdm=False)
        return time.perf_counter() - start

    for batch in (int(b) for b in a.batch_sizes.split(",")):
        seconds(batch, params)  # warm-up: the same shapes once
        prefill = seconds(batch, params.clone(max_tokens=1))
        whole = seconds(batch, params)
        decode_ms = (whole - prefill) / (a.output_len - 1) * 1000
        print(f"== batch {batch}: prefill {prefill * 1000:.0f} ms, decode step {decode_ms:.1f} ms")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate(prompts(batch), params, use_tqdm=False)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: a.top]
        for e in events:
            per_step = e.self_cpu_time_total / 1000 / a.output_len
            print(f"   {per_step:7.2f} ms/step {e.count // a.output_len:5d} calls/step  {e.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
