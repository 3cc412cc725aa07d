"""The offline API as a user meets it: chat, sampling options, stop strings, bad input."""

from __future__ import annotations

import pytest
from tiny_models import build_tiny_llama, random_prompts

from pagemesh import LLM, SamplingParams


@pytest.fixture(scope="module")
def smol(default_model_dir):
    return LLM(str(default_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", kv_heads=2)
    return LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=256)


def test_chat_says_paris(smol):
    out = smol.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"


def test_default_llm_uses_default_model(default_model_dir):
    llm = LLM()
    assert llm.model == str(default_model_dir)


def test_stop_string_cuts_text_and_is_reported(smol):
    params = SamplingParams(temperature=0, max_tokens=40, stop=["Paris"])
    out = smol.chat([{"role": "user", "content": "What is the capital of France?"}], params, use_tqdm=False)
    o = out[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == "Paris"
    assert "Paris" not in o.text and o.text.startswith("The capital of France is")
    kept = smol.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        params.clone(include_stop_str_in_output=True),
        use_tqdm=False,
    )
    assert kept[0].outputs[0].text.endswith("Paris")


def test_max_tokens_gives_length(smol):
    out = smol.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    o = out[0].outputs[0]
    assert len(o.token_ids) == 5 and o.finish_reason == "length"
    assert o.text == smol.get_tokenizer().decode(o.token_ids)


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(tiny):
    prompt = [{"prompt_token_ids": random_prompts(1, 512, seed=4)[0]}]
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24)
    a = tiny.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    b = tiny.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b
    c = tiny.generate(prompt, params.clone(seed=99), use_tqdm=False)[0].outputs[0].token_ids
    assert c != a
    many = tiny.generate(prompt, params.clone(n=3), use_tqdm=False)[0]
    assert [o.index for o in many.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in many.outputs}) == 3


def test_top_k_1_and_min_p_1_are_greedy(tiny):
    prompt = [{"prompt_token_ids": random_prompts(1, 512, seed=8)[0]}]
    greedy = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    for p in (
        SamplingParams(temperature=1.0, top_k=1, max_tokens=16, seed=3),
        SamplingParams(temperature=0.7, min_p=1.0, max_tokens=16, seed=3),
    ):
        assert (
            tiny.generate(prompt, p, use_tqdm=False)[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
        )


def test_penalties_change_repetitive_output(tiny):
    prompt = [{"prompt_token_ids": [5, 6, 7, 5, 6, 7, 5, 6, 7]}]
    base = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    pen = tiny.generate(
        prompt,
        SamplingParams(
            temperature=0, max_tokens=32, repetition_penalty=5.0, frequency_penalty=2.0, presence_penalty=2.0
        ),
        use_tqdm=False,
    )
    ids = pen[0].outputs[0].token_ids
    assert len(set(ids)) > len(set(base.token_ids))
    assert len(set(ids)) == len(ids)  # with penalties this strong, nothing repeats


def test_min_tokens_and_stop_token_ids(tiny):
    prompt = [{"prompt_token_ids": random_prompts(1, 512, seed=2)[0]}]
    free = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[3]
    out = tiny.generate(
        prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]), use_tqdm=False
    )[0].outputs[0]
    first = free.token_ids.index(stop_id)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


@pytest.mark.parametrize(
    "make_call,param",
    [
        (lambda llm: llm.generate([], use_tqdm=False), "prompts"),
        (lambda llm: llm.generate([{"prompt_token_ids": [5] * 300}], use_tqdm=False), "max_model_len"),
        (lambda llm: llm.generate([{"prompt_token_ids": [5]}], SamplingParams(max_tokens=0)), "max_tokens"),
        (lambda llm: llm.generate([{"prompt_token_ids": [5]}], SamplingParams(top_p=0.0)), "top_p"),
        (lambda llm: llm.generate([{"prompt_token_ids": [5]}], SamplingParams(top_p=1.5)), "top_p"),
        (
            lambda llm: llm.generate([{"prompt_token_ids": [5]}], SamplingParams(temperature=-1)),
            "temperature",
        ),
        (lambda llm: llm.generate([{"prompt_token_ids": [5, 99999]}]), "prompt_token_ids"),
        (lambda llm: llm.generate([{"prompt_token_ids": []}]), "prompt"),
        (lambda llm: llm.generate("text", use_tqdm=False), "skip_tokenizer_init"),
    ],
    ids=[
        "empty-list",
        "too-long",
        "max-tokens-0",
        "top-p-0",
        "top-p-1.5",
        "temperature",
        "bad-token-id",
        "empty-prompt",
        "text-without-tokenizer",
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(tiny, make_call, param):
    with pytest.raises(ValueError, match=param):
        make_call(tiny)


def test_unknown_model_path_raises():
    with pytest.raises(ValueError, match="model"):
        LLM("/nonexistent/model/dir")


def test_bad_request_leaves_running_requests_untouched(tiny):
    """A rejected request mid-flight does not disturb the ones being served."""
    engine = tiny.engine
    prompts = random_prompts(4, 512, seed=11)
    expected = [
        o.outputs[0].token_ids
        for o in tiny.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0, max_tokens=12),
            use_tqdm=False,
        )
    ]
    for i, p in enumerate(prompts):
        engine.add_request(f"ok-{i}", p, SamplingParams(temperature=0, max_tokens=12))
    engine.step()
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("bad", [5] * 300, SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("bad2", [5], SamplingParams(top_p=2.0))
    got = {rid: list(r.output_token_ids) for rid, r in engine.scheduler.requests.items()}
    while engine.has_unfinished():
        for ev in engine.step():
            got[ev.request.req_id].append(ev.token_id)
    assert [got[f"ok-{i}"] for i in range(4)] == expected


def test_abort_frees_blocks_at_once(tiny):
    engine = tiny.engine
    bm = engine.scheduler.block_manager
    engine.add_request(
        "x", random_prompts(1, 512, seed=12, min_len=60, max_len=60)[0], SamplingParams(max_tokens=50)
    )
    engine.step()
    assert bm.num_free < bm.num_blocks
    engine.abort("x")
    assert bm.num_free == bm.num_blocks and not engine.has_unfinished()


def test_steps_do_not_page_fault_their_activations_in_again(default_model_dir):
    """The runner keeps freed activation memory in the heap (worker/cpu_memory.py). With glibc's
    defaults this first generate after loading faults ~180,000 pages in (7,000 a step): each step's
    large activations were unmapped or trimmed away when freed. With the setting, ~30,000."""
    import resource

    llm = LLM(str(default_model_dir), dtype="float32", skip_tokenizer_init=True)
    ids = random_prompts(16, 49152, seed=3, min_len=120, max_len=140)
    prompts = [{"prompt_token_ids": p} for p in ids]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 80_000, faults
