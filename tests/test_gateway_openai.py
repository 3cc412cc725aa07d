"""The gateway through the official OpenAI client, against the real services (`pagemesh serve`)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_served_model(client, model):
    ids = [m.id for m in client.models.list()]
    assert ids == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_answers_paris(client, model):
    r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=20)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_streams_paris_in_openai_shapes(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        temperature=0,
        max_completion_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert "Paris" in text
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    # Greedy: the streamed text is the non-streamed one.
    whole = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=20)
    assert text == whole.choices[0].message.content


def test_completions_stream_and_not(client, model):
    prompt = "The capital of France is"
    r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=5)
    assert r.object == "text_completion" and "Paris" in r.choices[0].text
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=5, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completions_echo_logprobs_and_batches(client, model):
    r = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Hello") and len(r.choices[0].text) > len("Hello")
    r = client.completions.create(
        model=model, prompt=["1, 2, 3,", "a, b, c,"], max_tokens=3, temperature=0, logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 3
        assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
        assert all(len(top) >= 1 for top in lp.top_logprobs)
    assert r.usage.completion_tokens == 6


def test_n_choices(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, n=2, temperature=0.8, seed=1, max_tokens=8
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert 2 <= r.usage.completion_tokens <= 16  # both choices counted
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, list] = {0: [], 1: []}
    for chunk in client.chat.completions.create(
        model=model, messages=QUESTION, n=2, temperature=0, max_tokens=8, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index].append(c.finish_reason)
    for k in (0, 1):
        assert texts[k] and finishes[k][-1] is not None and all(f is None for f in finishes[k][:-1])
    assert texts[0] == texts[1]  # greedy


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)


def test_invalid_values_are_bad_requests_with_our_message(client, model):
    with pytest.raises(openai.BadRequestError, match=r"top_p must be in \(0, 1\]") as e:
        client.chat.completions.create(model=model, messages=QUESTION, top_p=1.5)
    assert e.value.param == "top_p"
    with pytest.raises(
        openai.BadRequestError
    ) as e:  # refused before the stream starts: a status, not an event
        client.completions.create(model=model, prompt="x", temperature=-1, stream=True)
    assert e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert e.value.code == "model_not_found"


def test_request_id_header(client, model):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=QUESTION, max_tokens=2, extra_headers={"x-request-id": "req-123"}
    )
    assert raw.headers["x-request-id"] == "req-123"
    assert raw.parse().id == "chatcmpl-req-123"


def _wait_idle(stack, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(stack.http_url + "/ready").json()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_client_disconnect_aborts_the_request(stack, model):
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", stack.http_url + "/v1/completions", json=body | {"stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break
        assert _wait_idle(stack)["num_running"] == 0
        with pytest.raises(httpx.TimeoutException):  # a non-streamed request given up on
            http.post(stack.http_url + "/v1/completions", json=body, timeout=1.0)
        assert _wait_idle(stack)["num_running"] == 0
