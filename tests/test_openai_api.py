"""The OpenAI surface end to end, through the official openai client, against the real services.

Most tests share the session `stack`; one private stack (API key, tiny queue) covers 401, 429 and a
failure in the middle of a stream, which would disturb the shared one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

import grpc
import httpx
import openai
import pytest
from stack import start_stack, stop_stack, wait_until_idle

from gateway.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from protos.pagemesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.slow

CAPITAL = "The capital of France is"  # greedy: " Paris.\n\nThe answer is: ..."
HELLO = [{"role": "user", "content": "Say hello."}]  # greedy: about 30 tokens, then EOS
FINISHES = {"stop", "length"}


@pytest.fixture(scope="module")
def stub(stack):
    channel = grpc.insecure_channel(stack.grpc_address)
    yield inference_pb2_grpc.InferenceStub(channel)
    channel.close()


def sse_events(http_url: str, path: str, body: dict, headers: dict | None = None) -> list[str]:
    """The raw `data:` payloads of a streamed response, [DONE] included."""
    with httpx.stream("POST", http_url + path, json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]


# -- /v1/completions ------------------------------------------------------------------------------


def test_completion_prompt_shapes(client, model, stack):
    ids = httpx.post(stack.http_url + "/tokenize", json={"prompt": CAPITAL}).json()["tokens"]
    one = client.completions.create(model=model, prompt=CAPITAL, max_tokens=4, temperature=0)
    text = one.choices[0].text
    assert text.startswith(" Paris")
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == text  # the same prompt, as token ids
    batch = client.completions.create(model=model, prompt=[CAPITAL, "1, 2, 3,"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == text
    id_batch = client.completions.create(model=model, prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert id_batch.choices[0].text == text and len(id_batch.choices) == 2
    assert id_batch.usage.prompt_tokens == len(ids) + 3 and id_batch.usage.completion_tokens == 8


def test_completion_defaults_and_sampling_parameters(client, model):
    # max_tokens defaults to 16, as OpenAI's does.
    r = client.completions.create(model=model, prompt=CAPITAL, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    greedy = (
        client.completions.create(model=model, prompt=CAPITAL, max_tokens=8, temperature=0).choices[0].text
    )

    def sample(**kw) -> str:
        return client.completions.create(model=model, prompt=CAPITAL, max_tokens=8, **kw).choices[0].text

    # Each of these leaves only the most likely token, so it must reproduce greedy decoding.
    assert sample(temperature=1.0, top_p=1e-6) == greedy
    assert sample(temperature=1.0, extra_body={"top_k": 1}) == greedy
    assert sample(temperature=1.0, extra_body={"min_p": 1.0}) == greedy
    # Seeds make sampling reproducible; different seeds (almost surely) differ.
    assert sample(temperature=1.0, seed=42) == sample(temperature=1.0, seed=42)
    assert sample(temperature=1.0, seed=42) != sample(temperature=1.0, seed=43)
    # Accepted and applied without error (their effect is the sampler's unit tests' business).
    for kw in (
        {"presence_penalty": 1.5, "frequency_penalty": 1.5, "user": "user-1"},
        {"extra_body": {"repetition_penalty": 1.3}},
    ):
        r = client.completions.create(model=model, prompt=CAPITAL, max_tokens=8, temperature=0, **kw)
        assert r.choices[0].finish_reason in FINISHES


def test_completion_n_and_seed(client, model):
    r = client.completions.create(model=model, prompt=CAPITAL, max_tokens=8, n=3, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1  # each choice its own sequence
    again = client.completions.create(model=model, prompt=CAPITAL, max_tokens=8, n=3, temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    assert 3 <= r.usage.completion_tokens <= 24  # all three choices counted


def test_completion_logprobs_echo_and_offsets(client, model, stack):
    r = client.completions.create(model=model, prompt=CAPITAL, max_tokens=5, temperature=0, logprobs=2)
    c = r.choices[0]
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text and len(lp.tokens) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(2 <= len(top) <= 3 and tok in top for top, tok in zip(lp.top_logprobs, lp.tokens, strict=True))
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    # Streamed, the offsets go on counting across chunks.
    streamed = [
        ch.choices[0]
        for ch in client.completions.create(
            model=model, prompt=CAPITAL, max_tokens=5, temperature=0, logprobs=2, stream=True
        )
    ]
    tokens = [t for ch in streamed if ch.logprobs for t in ch.logprobs.tokens]
    stream_offsets = [o for ch in streamed if ch.logprobs for o in ch.logprobs.text_offset]
    assert tokens == lp.tokens and stream_offsets == lp.text_offset
    # echo: the prompt first, as text even when it was given as token ids.
    e = client.completions.create(model=model, prompt=CAPITAL, max_tokens=3, temperature=0, echo=True)
    assert e.choices[0].text.startswith(CAPITAL + " Paris")
    ids = httpx.post(stack.http_url + "/tokenize", json={"prompt": CAPITAL}).json()["tokens"]
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0, echo=True)
    assert by_ids.choices[0].text == CAPITAL + " Paris"


def test_completion_stream_with_usage_chunk(client, model, stack):
    chunks = list(
        client.completions.create(
            model=model,
            prompt=CAPITAL,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6
    assert all(c.usage is None for c in content)
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    # On the wire: [DONE] closes it; without include_usage no chunk carries a usage key.
    events = sse_events(
        stack.http_url, "/v1/completions", {"prompt": CAPITAL, "max_tokens": 3, "stream": True}
    )
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_stop_strings_split_across_tokens_never_leak(client, model, stack):
    # " Paris" "." "\n" "\n" "The": the stop string starts inside " Paris" and spans four tokens.
    stop = "s.\n\nT"
    body = {"prompt": CAPITAL, "max_tokens": 12, "temperature": 0, "stop": [stop, "never-seen"]}
    r = client.completions.create(model=model, **body)
    assert r.choices[0].text == " Pari"
    assert (r.choices[0].finish_reason, r.choices[0].model_extra["stop_reason"]) == ("stop", stop)
    events = [
        json.loads(e) for e in sse_events(stack.http_url, "/v1/completions", body | {"stream": True})[:-1]
    ]
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == " Pari"  # "s" was held back until the match was certain
    assert events[-1]["choices"][0]["stop_reason"] == stop
    kept = client.completions.create(model=model, **body, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == " Paris.\n\nT"
    # Chat too, and a stop string in the middle of one token's text.
    chat = client.chat.completions.create(
        model=model, messages=HELLO, temperature=0, max_tokens=30, stop="welc"
    )
    assert chat.choices[0].message.content == "Hello there, " and chat.choices[0].finish_reason == "stop"


def test_stop_token_ids_ignore_eos_min_tokens_and_special_tokens(client, model, stack):
    text = client.completions.create(model=model, prompt=CAPITAL, max_tokens=4, temperature=0).choices[0].text
    ids = httpx.post(stack.http_url + "/tokenize", json={"prompt": text}).json()["tokens"]
    r = client.completions.create(
        model=model, prompt=CAPITAL, max_tokens=8, temperature=0, extra_body={"stop_token_ids": [ids[1]]}
    )
    c = r.choices[0]
    assert (c.finish_reason, c.model_extra["stop_reason"]) == ("stop", ids[1])
    assert c.text == text[: len(c.text)] and r.usage.completion_tokens == 2

    natural = client.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=60)
    n = natural.usage.completion_tokens
    assert natural.choices[0].finish_reason == "stop" and n < 60  # ended by EOS (reported as stop)
    assert natural.choices[0].model_extra["stop_reason"] is None  # vLLM's value for EOS
    longer = client.chat.completions.create(
        model=model, messages=HELLO, temperature=0, max_tokens=n + 4, extra_body={"ignore_eos": True}
    )
    assert longer.usage.completion_tokens == n + 4 and longer.choices[0].finish_reason == "length"
    assert "<|im_end|>" not in longer.choices[0].message.content  # special tokens skipped by default
    raw = client.chat.completions.create(
        model=model,
        messages=HELLO,
        temperature=0,
        max_tokens=n + 4,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    assert "<|im_end|>" in raw.choices[0].message.content
    at_least = client.chat.completions.create(
        model=model, messages=HELLO, temperature=0, max_tokens=n + 10, extra_body={"min_tokens": n + 3}
    )
    assert at_least.usage.completion_tokens >= n + 3


def test_suffix_is_refused_by_name(client, model):
    with pytest.raises(openai.BadRequestError, match="suffix is not supported") as e:
        client.completions.create(model=model, prompt=CAPITAL, suffix="!")
    assert e.value.param == "suffix"


# -- /v1/chat/completions -------------------------------------------------------------------------


def test_chat_roles_content_parts_and_template(client, model, stack):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
    ]
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in FINISHES
    # The model's own chat template renders the prompt: /tokenize of the messages counts the same.
    counted = httpx.post(stack.http_url + "/tokenize", json={"messages": messages}).json()
    assert r.usage.prompt_tokens == counted["count"]
    rendered = httpx.post(stack.http_url + "/detokenize", json={"tokens": counted["tokens"]}).json()["prompt"]
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


def test_chat_max_completion_tokens_is_preferred(client, model):
    r = client.chat.completions.create(
        model=model, messages=HELLO, temperature=0, max_tokens=9, max_completion_tokens=3
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=4)
    assert r.usage.completion_tokens == 4


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(
        model=model, messages=HELLO, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and t.logprob <= 0
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the top one
        assert all(a.bytes == list(a.token.encode()) for a in t.top_logprobs)
    plain = client.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_chat_stream_shapes_usage_and_done(client, model, stack):
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=HELLO,
            temperature=0,
            max_completion_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
    )
    *content, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert [c.choices[0].finish_reason for c in content].count("length") == 1
    assert content[-1].choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 6
    assert usage.usage.prompt_tokens_details.cached_tokens >= 0
    assert all(c.usage is None for c in content) and all(c.id == usage.id for c in content)
    streamed = [t.token for c in content if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(streamed) == "".join(c.choices[0].delta.content or "" for c in content)
    events = sse_events(
        stack.http_url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2, "stream": True}
    )
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_chat_n3_streams_interleaved_choices(client, model):
    order: list[int] = []
    texts = {0: "", 1: "", 2: ""}
    finishes: dict[int, list] = {0: [], 1: [], 2: []}
    roles = []
    for chunk in client.chat.completions.create(
        model=model, messages=HELLO, n=3, temperature=1.0, seed=3, max_tokens=10, stream=True
    ):
        (c,) = chunk.choices
        order.append(c.index)
        roles.append((c.index, c.delta.role))
        texts[c.index] += c.delta.content or ""
        finishes[c.index].append(c.finish_reason)
    assert [r for r in roles if r[1]] == [(0, "assistant"), (1, "assistant"), (2, "assistant")]
    for k in range(3):
        assert texts[k] and finishes[k][-1] in FINISHES and all(f is None for f in finishes[k][:-1])
    # Interleaved as the engine steps all three together, not one choice after another.
    last_of_0 = max(i for i, k in enumerate(order) if k == 0)
    first_of_2 = order.index(2)
    assert first_of_2 < last_of_0
    assert len(set(texts.values())) > 1
    whole = client.chat.completions.create(
        model=model, messages=HELLO, n=3, temperature=1.0, seed=3, max_tokens=10
    )
    assert [c.message.content for c in whole.choices] == [texts[0], texts[1], texts[2]]


def test_chat_stop_and_seed(client, model):
    kw = {"model": model, "messages": HELLO, "max_tokens": 12, "temperature": 1.0, "seed": 11}
    assert client.chat.completions.create(**kw).choices[0].message.content == (
        client.chat.completions.create(**kw).choices[0].message.content
    )
    r = client.chat.completions.create(
        model=model, messages=HELLO, temperature=0, max_tokens=30, stop=["!", ","]
    )
    assert r.choices[0].message.content == "Hello there" and r.choices[0].model_extra["stop_reason"] == ","


def test_cached_tokens_come_from_prefix_hits(client, model):
    system = {"role": "system", "content": "You answer questions about geography. " * 8}
    messages = [system, {"role": "user", "content": "What is the capital of Spain?"}]
    client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached % 16 == 0 and cached < again.usage.prompt_tokens


# -- models, tokenize, detokenize, request ids ---------------------------------------------------


def test_models(client, model, stack):
    (card,) = client.models.list().data
    assert card.id == model and card.object == "model" and card.model_extra["max_model_len"] == 8192
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found" and "gpt-4" in e.value.message


def test_tokenize_and_detokenize(stack, model):
    url = stack.http_url
    r = httpx.post(url + "/tokenize", json={"model": model, "prompt": "Hello world"}).json()
    assert r == {"count": 2, "max_model_len": 8192, "tokens": r["tokens"]} and len(r["tokens"]) == 2
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    chat = httpx.post(url + "/tokenize", json={"messages": HELLO, "add_generation_prompt": False}).json()
    with_prompt = httpx.post(url + "/tokenize", json={"messages": HELLO}).json()
    assert with_prompt["count"] > chat["count"]
    bad = httpx.post(url + "/tokenize", json={"model": "nope", "prompt": "x"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
    bad = httpx.post(url + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_request_ids(client, model):
    raw = client.completions.with_raw_response.create(
        model=model, prompt="x", max_tokens=1, extra_headers={"x-request-id": "my-id-1"}
    )
    assert raw.headers["x-request-id"] == "my-id-1" and raw.parse().id == "cmpl-my-id-1"
    made_up = client.completions.with_raw_response.create(model=model, prompt="x", max_tokens=1)
    assert re.fullmatch(r"[0-9a-f]{32}", made_up.headers["x-request-id"])
    # An id already in flight: 409, the SDK's ConflictError.
    first = client.completions.create(
        model=model,
        prompt="x",
        max_tokens=200,
        stream=True,
        extra_body={"ignore_eos": True},
        extra_headers={"x-request-id": "busy-id"},
    )
    try:
        next(iter(first))
        with pytest.raises(openai.ConflictError, match="already running"):
            client.completions.create(
                model=model, prompt="x", max_tokens=1, extra_headers={"x-request-id": "busy-id"}
            )
    finally:
        first.close()


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "kwargs", "param", "words"),
    [
        ("chat", {"temperature": -1}, "temperature", "non-negative"),
        ("chat", {"top_p": 1.5}, "top_p", "(0, 1]"),
        ("chat", {"n": 17}, "n", "less than or equal to 16"),
        ("chat", {"max_completion_tokens": 10**6}, "max_completion_tokens", "max_model_len (8192)"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
        ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "'user'"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "hi " * 9000}]},
            "messages",
            "max_model_len is 8192",
        ),
        ("completion", {"prompt": "hi " * 9000}, "prompt", "prompt is 9001 tokens; max_model_len is 8192"),
        ("completion", {"prompt": [10**6]}, "prompt", "outside the vocabulary"),
        ("completion", {"logprobs": 21}, "logprobs", "[0, 20]"),
        ("completion", {"max_tokens": 0}, "max_tokens", "at least 1"),
        ("completion", {"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
        ("completion", {"extra_body": {"min_tokens": 20}}, "min_tokens", "must not exceed max_tokens"),
        ("completion", {"extra_body": {"top_k": -2}}, "top_k", "greater than or equal to -1"),
    ],
)
def test_bad_values_raise_bad_request_naming_the_param(client, model, kind, kwargs, param, words):
    for stream in (False, True):  # refused before any streaming starts: a status either way
        with pytest.raises(openai.BadRequestError) as e:
            if kind == "chat":
                client.chat.completions.create(
                    **({"model": model, "messages": HELLO} | kwargs), stream=stream
                )
            else:
                client.completions.create(**({"model": model, "prompt": CAPITAL} | kwargs), stream=stream)
        assert e.value.status_code == 400 and e.value.param == param, e.value.body
        assert e.value.type == "invalid_request_error" and words in e.value.message


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        client.completions.create(model="no-such-model", prompt="x")
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO, stream=True)


# -- disconnects ----------------------------------------------------------------------------------


def test_twenty_streams_cut_midway_free_everything(stack, model, stub):
    body = {"model": model, "prompt": CAPITAL, "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def cut_after(http: httpx.AsyncClient, path: str, payload: dict, events: int) -> int:
        seen = 0
        async with http.stream("POST", stack.http_url + path, json=payload) as r:
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= events:
                    break  # leaving the block closes the connection mid-stream
        return seen

    async def main() -> list[int]:
        chat = {"model": model, "messages": HELLO, "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(timeout=120) as http:
            cuts = [cut_after(http, "/v1/completions", body, 3 + i % 5) for i in range(10)]
            cuts += [cut_after(http, "/v1/chat/completions", chat | {"n": 2}, 3 + i % 5) for i in range(10)]
            return await asyncio.gather(*cuts)

    assert all(seen >= 3 for seen in asyncio.run(main()))
    steps_at_cut = stub.GetStats(inference_pb2.GetStatsRequest()).num_steps
    stats = wait_until_idle(stub, timeout=5.0)
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_blocks
    # Freed within a step or two of the last cut, not after the 400 tokens each asked for.
    assert stats.num_steps - steps_at_cut <= 3


def test_grpc_cancellation_frees_everything(stub):
    calls = []
    for i in range(5):
        req = inference_pb2.GenerateRequest(
            text=f"Count to {i + 100}:",
            sampling=common_pb2.SamplingParams(max_tokens=400, ignore_eos=True, n=1 + i % 2),
        )
        call = stub.Generate(req, timeout=120)
        next(call)  # accepted
        next(call)  # generating
        calls.append(call)
    assert stub.GetStats(inference_pb2.GetStatsRequest()).num_running >= 5
    steps_at_cancel = stub.GetStats(inference_pb2.GetStatsRequest()).num_steps
    for call in calls:
        call.cancel()
    stats = wait_until_idle(stub, timeout=5.0)
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_blocks
    assert stats.num_steps - steps_at_cancel <= 3  # the step in flight, then the aborts apply


# -- OpenAPI --------------------------------------------------------------------------------------


def test_openapi_describes_the_routes_and_bodies(stack):
    doc = httpx.get(stack.http_url + "/openapi.json").json()
    paths = doc["paths"]
    for path, method in [
        ("/v1/completions", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/v1/models/{model_id}", "get"),
        ("/tokenize", "post"),
        ("/detokenize", "post"),
        ("/health", "get"),
    ]:
        assert method in paths[path], path
    schemas = doc["components"]["schemas"]
    for path, model_cls in [
        ("/v1/completions", CompletionRequest),
        ("/v1/chat/completions", ChatCompletionRequest),
        ("/tokenize", TokenizeRequest),
        ("/detokenize", DetokenizeRequest),
    ]:
        ref = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        properties = schemas[ref.rsplit("/", 1)[1]]["properties"]
        assert set(properties) == set(model_cls.model_fields), path
    assert schemas["CompletionRequest"]["required"] == ["prompt"]
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 16


# -- a private stack: API key, a tiny queue, a failure mid-stream --------------------------------

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def guarded(default_model_dir, tmp_path_factory):
    s = start_stack(
        default_model_dir,
        tmp_path_factory.mktemp("guarded") / "serve.log",
        "--api-key",
        KEY,
        "--max-num-seqs",
        "1",
        "--max-waiting-requests",
        "1",
        "--max-model-len",
        "512",
    )
    yield s
    stop_stack(s)


def test_api_key(guarded):
    model = guarded.model_dir.name
    c = openai.OpenAI(base_url=guarded.http_url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Incorrect or missing API key") as e:
        c.chat.completions.create(model=model, messages=HELLO, max_tokens=1, stream=True)
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    # No key at all (the SDK always sends one), or another scheme.
    for headers in ({}, {"Authorization": f"Basic {KEY}"}):
        for path in ("/v1/completions", "/tokenize", "/detokenize"):
            r = httpx.post(guarded.http_url + path, json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded.http_url + "/health").status_code == 200
    ok = openai.OpenAI(base_url=guarded.http_url + "/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(model=model, prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_full_queue_is_429_with_the_schedulers_retry_after(guarded):
    model = guarded.model_dir.name
    c = openai.OpenAI(base_url=guarded.http_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    long = {
        "model": model,
        "prompt": CAPITAL,
        "max_tokens": 400,
        "stream": True,
        "extra_body": {"ignore_eos": True},
    }
    running = c.completions.create(**long)
    next(iter(running))  # generating: the one running slot is taken
    waiting = c.completions.create(**long)  # accepted into the one waiting slot
    try:
        with pytest.raises(openai.RateLimitError, match="overloaded") as e:
            c.completions.create(model=model, prompt="x", max_tokens=1)
        # 1 + waiting // max_num_seqs: computed by the scheduler (the gateway's fallback is 1).
        assert int(e.value.response.headers["retry-after"]) >= 2
        assert e.value.code == "rate_limit_exceeded"
    finally:
        running.close()
        waiting.close()


def test_failure_mid_stream_is_an_error_event_then_done(guarded):
    """The tokenizer service dies while requests stream: each client gets OpenAI's error envelope as
    an SSE event and then [DONE] (the SDK raises APIError), never a silently truncated stream."""
    model = guarded.model_dir.name
    tokenizer_pid = int(re.findall(r"launcher: tokenizer is healthy at \S+ \(pid (\d+)\)", guarded.log())[-1])
    c = openai.OpenAI(base_url=guarded.http_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    body = {"model": model, "prompt": CAPITAL, "max_tokens": 400, "ignore_eos": True, "stream": True}
    events: list[str] = []
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", guarded.http_url + "/v1/completions", json=body, headers=headers, timeout=60
    ) as r:
        lines = (line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: "))
        events += [next(lines), next(lines)]  # generating, in the one running slot
        queued = c.completions.create(
            model=model, prompt=CAPITAL, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )  # accepted into the waiting slot: its stream has begun
        os.kill(tokenizer_pid, signal.SIGKILL)
        events += list(lines)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "tokenizer" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])
    with pytest.raises(openai.APIError, match="tokenizer"):
        list(queued)
