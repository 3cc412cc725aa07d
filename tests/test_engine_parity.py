"""Greedy parity with Hugging Face transformers, through the offline LLM API.

8 prompts of different lengths, 64 new tokens each, generated together in one LLM.generate call
(so they are batched, chunked and decoded together), against transformers' generate one prompt
at a time, in float32: token ids must be identical.
"""

from __future__ import annotations

from collections import deque

import pytest
import torch
from tiny_models import build_tiny, build_tiny_llama, hf_greedy, random_prompts

from pagemesh import LLM, SamplingParams

NEW = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=NEW)


def generate_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize(
    "tie,kv_heads,rope_scaling",
    [
        (True, 2, None),  # GQA, tied embeddings
        (False, 4, None),  # MHA, untied
        (True, 1, None),  # MQA
        (
            False,
            2,
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ],
    ids=["gqa-tied", "mha-untied", "mqa", "llama3-rope"],
)
def test_tiny_llama_greedy_matches_hf(tmp_path, tie, kv_heads, rope_scaling):
    path = build_tiny_llama(tmp_path / "m", tie=tie, kv_heads=kv_heads, rope_scaling=rope_scaling)
    prompts = random_prompts(8, 512)
    ref = hf_greedy(path, prompts, NEW)
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=96)
    assert generate_ids(llm, prompts) == ref


def test_llama_with_attention_bias_matches_hf(tmp_path):
    """Llama's attention_bias puts biases on q, k, v and o (Qwen2's only on q, k, v)."""
    path = build_tiny_llama(tmp_path / "m", attention_bias=True)
    prompts = random_prompts(4, 512)
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True)
    assert generate_ids(llm, prompts) == hf_greedy(path, prompts, NEW)


@pytest.mark.parametrize("family,tie", [("qwen2", True), ("mistral", False)])
def test_other_llama_family_architectures_match_hf(tmp_path, family, tie):
    path = build_tiny(tmp_path / "m", family, tie_word_embeddings=tie)
    prompts = random_prompts(8, 512)
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=96)
    assert generate_ids(llm, prompts) == hf_greedy(path, prompts, NEW)


def test_sliding_window_models_are_capped_to_the_window(tmp_path):
    path = build_tiny(tmp_path / "m", "mistral", sliding_window=128)
    assert LLM(str(path), dtype="float32", skip_tokenizer_init=True).engine.max_model_len == 128
    with pytest.raises(ValueError, match="sliding window"):
        LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=256)


class InOrderWorker:
    """The runner behind the remote worker's contract: steps submitted ahead of collecting run in
    submission order, so EngineCore pipelines (schedules step N+1 before N's output is back)."""

    def __init__(self, runner) -> None:  # type: ignore[no-untyped-def]
        self.runner, self.submitted = runner, deque()

    @property
    def capacity(self):  # type: ignore[no-untyped-def]
        return self.runner.capacity

    def execute(self, step):  # type: ignore[no-untyped-def]
        return self.runner.execute(step)

    def submit(self, step) -> None:  # type: ignore[no-untyped-def]
        self.submitted.append(step)
        self.most_queued = max(getattr(self, "most_queued", 0), len(self.submitted))

    def collect(self):  # type: ignore[no-untyped-def]
        return self.runner.execute(self.submitted.popleft())


@pytest.mark.parametrize("pipelined", [False, True])
def test_parity_holds_under_preemption(tmp_path, pipelined):
    path = build_tiny_llama(tmp_path / "m", kv_heads=2)
    prompts = random_prompts(8, 512, seed=3)
    ref = hf_greedy(path, prompts, NEW)
    # 2 layers x K,V x 16 tokens x 2 kv heads x 16 dims x 4 bytes = 8 KiB a block; 12 blocks = 192 tokens,
    # far less than 8 sequences of up to 154 tokens need together.
    llm = LLM(
        str(path), dtype="float32", skip_tokenizer_init=True, kv_cache_memory=12 * 8192, max_model_len=192
    )
    if pipelined:
        llm.engine.executor = InOrderWorker(llm.runner)
        llm.engine.scheduler.config.async_scheduling = True
    assert generate_ids(llm, prompts) == ref
    assert llm.engine.scheduler.num_preemptions > 0
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free == bm.num_blocks


@pytest.mark.parametrize("pipelined", [False, True])
def test_parity_holds_with_prefix_cache_hits(tmp_path, pipelined):
    path = build_tiny_llama(tmp_path / "m", kv_heads=2)
    shared = random_prompts(1, 512, seed=5, min_len=70, max_len=70)[0]
    prompts = [shared + tail for tail in random_prompts(8, 512, seed=6, min_len=1, max_len=20)]
    ref = hf_greedy(path, prompts, NEW)
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True)
    if pipelined:
        llm.engine.executor = InOrderWorker(llm.runner)
        llm.engine.scheduler.config.async_scheduling = True
    first = generate_ids(llm, prompts[:1])  # warms the cache with the shared prefix
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert first == ref[:1]
    assert [o.outputs[0].token_ids for o in outs] == ref
    hits = [o.num_cached_tokens for o in outs]
    assert all(h >= 64 for h in hits), hits  # 4 full blocks of the 70-token prefix
    bm = llm.engine.scheduler.block_manager
    print(f"prefix cache: {bm.hit_tokens} of {bm.query_tokens} prompt tokens hit; per request {hits}")


def test_chosen_token_logprobs_match_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    path = build_tiny_llama(tmp_path / "m", kv_heads=2)
    prompts = random_prompts(4, 512, seed=9)
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        ids = prompt + out.outputs[0].token_ids
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0].float()
        ref = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
        for step, (token, entry) in enumerate(
            zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True)
        ):
            assert abs(entry[token].logprob - ref[step, token].item()) < 1e-4
            assert entry[token].rank == 1  # greedy picks the most likely token
            top = torch.topk(ref[step], 5)
            got = sorted(((e.rank, tid) for tid, e in entry.items() if e.rank is not None))
            assert [tid for _, tid in got][:5] == top.indices.tolist()


def test_default_model_greedy_matches_hf_fp32(default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    texts = [
        "The capital of France is",
        "Write a haiku about the sea.",
        "def fibonacci(n):",
        "Once upon a time, in a small village nestled between two mountains, there lived",
        "Explain why the sky is blue in two sentences.",
        "1, 2, 3, 4,",
        "The quick brown fox jumps over the lazy dog. The quick brown fox",
        "Translate to French: I would like a cup of coffee, please. Thank you very much for your help today.",
    ]
    prompts = [tok(t)["input_ids"] for t in texts]
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ref = hf_greedy(default_model_dir, prompts, NEW, model=model)
    llm = LLM(str(default_model_dir), dtype="float32")
    assert generate_ids(llm, prompts) == ref


def _common_prefix(a: list[list[int]], b: list[list[int]]) -> list[int]:
    return [
        next((i for i, (x, y) in enumerate(zip(u, v, strict=True)) if x != y), len(u))
        for u, v in zip(a, b, strict=True)
    ]


NEAR_TIE = 0.5  # fp32 logits this close can swap under bf16 rounding (seen here: gaps up to ~0.2)


def test_default_model_bf16_departs_from_fp32_only_at_near_ties(default_model_dir):
    """bfloat16 cannot match transformers bit for bit: kernels round differently and one flipped
    near-tie changes everything after it (this Q4-dequantized model has many), so how long the
    common prefix runs is mostly chance (transformers' own bf16 kept 36% of it on one machine and
    65% on another). The guard: wherever our bf16 first departs from the float32 reference, the
    float32 model itself nearly tied the two tokens. A wrong kernel departs where it did not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    texts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Write a haiku about the sea.",
        "Explain why the sky is blue in two sentences.",
        "1, 2, 3, 4,",
        "Once upon a time, there lived",
        "The quick brown fox jumps over the lazy dog. The quick brown fox",
        "Translate to French: good morning",
    ]
    prompts = [tok(t)["input_ids"] for t in texts]
    fp32_model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    fp32 = hf_greedy(default_model_dir, prompts, NEW, model=fp32_model)
    hf_bf16 = hf_greedy(
        default_model_dir,
        prompts,
        NEW,
        model=AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16).eval(),
    )
    ours = generate_ids(LLM(str(default_model_dir), dtype="bfloat16"), prompts)

    def departure_gaps(other: list[list[int]]) -> list[float]:
        """fp32 logit of the reference token minus that of the other's, where the two first differ."""
        gaps = []
        for prompt, ref, out, n in zip(prompts, fp32, other, _common_prefix(fp32, other), strict=True):
            if n < NEW:
                with torch.no_grad():
                    logits = fp32_model(torch.tensor([prompt + ref[:n]])).logits[0, -1]
                gaps.append(float(logits[ref[n]] - logits[out[n]]))
        return gaps

    total = NEW * len(prompts)
    ours_gaps, hf_gaps = departure_gaps(ours), departure_gaps(hf_bf16)
    print(
        f"common prefix with HF fp32: ours bf16 {sum(_common_prefix(ours, fp32)) / total:.1%}, "
        f"HF bf16 {sum(_common_prefix(hf_bf16, fp32)) / total:.1%}; fp32 logit gaps where they depart: "
        f"ours {[round(g, 3) for g in ours_gaps]}, HF bf16 {[round(g, 3) for g in hf_gaps]}"
    )
    assert all(n >= 1 for n in _common_prefix(ours, hf_bf16))  # the first token: nearly identical logits
    assert all(0 <= g <= NEAR_TIE for g in hf_gaps)  # the bound holds for transformers' own bf16
    assert all(0 <= g <= NEAR_TIE for g in ours_gaps), ours_gaps


def test_pipelined_engine_ends_requests_like_the_synchronous_one(tmp_path):
    """Stop tokens, max_tokens and the length limit with a step always in flight: the same tokens
    and finish reasons as one step at a time, nothing scheduled past max_tokens, every block back."""
    path = build_tiny_llama(tmp_path / "m", kv_heads=2)
    prompts = random_prompts(10, 512, seed=8)
    params = [
        SamplingParams(temperature=0.0, max_tokens=1 + 7 * i, stop_token_ids=[5 + i, 17, 200 + i])
        for i in range(10)
    ]

    def run(pipelined: bool) -> list[tuple[list[int], str | None]]:
        llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=160)
        if pipelined:
            llm.engine.executor = InOrderWorker(llm.runner)
            llm.engine.scheduler.config.async_scheduling = True
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        if pipelined:
            assert llm.engine.executor.most_queued == 2  # a step was always sent ahead
        bm = llm.engine.scheduler.block_manager
        assert bm.num_free == bm.num_blocks and not llm.engine.has_unfinished()
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]

    synchronous, pipelined = run(False), run(True)
    assert pipelined == synchronous
    assert {reason for _, reason in synchronous} == {"stop", "length"}
