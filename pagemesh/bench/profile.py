"""`python -m pagemesh.bench.profile`: where an engine step's time goes, per batch size.

cProfile over LLM.generate (random 130-token prompts, 64 output tokens, ignore_eos), printed as
milliseconds per step for the torch calls and model functions that dominate. Run it on a quiet
machine: torch's OpenMP threads slow down sharply when other processes take the cores.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pagemesh.bench.profile", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--input-len", type=int, default=130)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--top", type=int, default=10, help="rows per batch size")
    a = p.parse_args(argv)

    from pagemesh import LLM, SamplingParams
    from pagemesh.bench.throughput import random_prompts
    from pagemesh.model_store import ensure_default_model

    llm = LLM(a.model or str(ensure_default_model()), dtype=a.dtype)
    params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    vocab = llm.runner.cfg.vocab_size
    for batch in (int(b) for b in a.batch_sizes.split(",")):
        prompts = [{"prompt_token_ids": ids} for ids in random_prompts(batch, a.input_len, vocab, seed=batch)]
        llm.generate(prompts[:1], params.clone(max_tokens=4), use_tqdm=False)  # warm-up
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        llm.generate(prompts, params, use_tqdm=False)
        profile.disable()
        seconds = time.perf_counter() - start
        steps = a.output_len
        print(
            f"== batch {batch}: {batch * a.output_len / seconds:.1f} output tok/s, "
            f"{seconds / steps * 1000:.1f} ms/step (prefill included)"
        )
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(a.top)
        for line in text.getvalue().splitlines():
            cols = line.split(maxsplit=5)
            if len(cols) == 6 and cols[1].replace(".", "").isdigit():
                print(f"   {float(cols[1]) / steps * 1000:7.2f} ms/step {cols[0]:>7} calls  {cols[5][:80]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
