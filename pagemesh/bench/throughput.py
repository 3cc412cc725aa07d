"""`pagemesh bench throughput`: offline throughput of LLM.generate, optionally against Hugging Face
transformers `generate` one prompt at a time on the same prompts (vLLM's `bench throughput` habits:
random token prompts of a fixed length, ignore_eos so every request makes exactly output_len tokens)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(slots=True)
class Result:
    engine: str
    num_prompts: int
    input_len: int
    output_len: int
    seconds: float
    output_tokens: int

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.seconds


def random_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Distinct random token prompts (no shared prefix, so no prefix-cache help), avoiding low ids
    where special tokens usually live."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(num)]


def bench_pagemesh(
    model: str, prompts: list[list[int]], output_len: int, dtype: str, max_num_seqs: int | None = None
) -> Result:
    from pagemesh import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}))
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params.clone(max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return Result("pagemesh LLM.generate", len(prompts), len(prompts[0]), output_len, seconds, tokens)


def bench_hf_sequential(model: str, prompts: list[list[int]], output_len: int, dtype: str) -> Result:
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
    with torch.inference_mode():
        hf.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        tokens = 0
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
            )
            tokens += out.shape[1] - len(p)
    seconds = time.perf_counter() - start
    return Result(
        "HF transformers generate, one prompt at a time",
        len(prompts),
        len(prompts[0]),
        output_len,
        seconds,
        tokens,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagemesh bench throughput", description=__doc__)
    p.add_argument("--model", default=None, help="model directory (default: the default model)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=130)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences run at once (default: LLM's)")
    p.add_argument(
        "--hf-baseline",
        type=int,
        default=0,
        metavar="N",
        help="also time HF generate on the first N prompts, one at a time",
    )
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    if a.model is None:
        from pagemesh.model_store import ensure_default_model

        a.model = str(ensure_default_model())
    from worker.model_config import ModelConfig

    prompts = random_prompts(a.num_prompts, a.input_len, ModelConfig.from_dir(a.model).vocab_size)
    results = [bench_pagemesh(a.model, prompts, a.output_len, a.dtype, a.max_num_seqs)]
    if a.hf_baseline:
        results.append(bench_hf_sequential(a.model, prompts[: a.hf_baseline], a.output_len, a.dtype))
    for r in results:
        print(
            f"{r.engine}: {r.num_prompts} prompts x ({r.input_len} in, {r.output_len} out) "
            f"in {r.seconds:.1f}s = {r.output_tok_per_s:.1f} output tok/s"
        )
    if len(results) > 1:
        print(f"ratio: {results[0].output_tok_per_s / results[1].output_tok_per_s:.1f}x")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump([{**asdict(r), "output_tok_per_s": r.output_tok_per_s} for r in results], f, indent=2)
    return 0
