"""The HTTP gateway without a scheduler: request translation, response shapes, error mapping, and
the routes that answer before any gRPC call (validation, auth, probes)."""

from __future__ import annotations

import json

import grpc
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.errors import GatewayError, from_grpc_error, param_from_message
from gateway.main import build_parser
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    chat_to_proto,
    completion_logprobs,
    completion_to_proto,
    envelope,
    param_names,
    sse,
    usage_dict,
)
from protos.pagemesh.v1 import common_pb2, inference_pb2

NOWHERE = "unix:///nonexistent/pagemesh-test-scheduler.sock"  # nothing listens: calls fail fast


# -- request -> protobuf ----------------------------------------------------------------------------


def test_completion_translates_every_field():
    req = CompletionRequest.model_validate(
        {
            "model": "m",
            "prompt": "Hello",
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "n": 2,
            "stop": "\n",
            "seed": 3,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "logprobs": 2,
            "top_k": -1,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "min_tokens": 1,
            "stop_token_ids": [5],
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
        }
    )
    (g,) = completion_to_proto(req, "rid", "m")
    assert (g.request_id, g.model, g.WhichOneof("input"), g.text) == ("rid", "m", "text", "Hello")
    s = g.sampling
    assert (s.n, s.max_tokens, s.seed, s.logprobs, s.top_k, s.min_tokens) == (2, 7, 3, 2, 0, 1)
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9)
    assert s.min_p == pytest.approx(0.05) and s.repetition_penalty == pytest.approx(1.1)
    assert s.presence_penalty == pytest.approx(0.1) and s.frequency_penalty == pytest.approx(0.2)
    assert list(s.stop) == ["\n"] and list(s.stop_token_ids) == [5]
    assert s.ignore_eos and s.include_stop_str_in_output and not s.skip_special_tokens


def test_completion_leaves_unset_fields_unset():
    """The scheduler applies its defaults to unset optional fields; max_tokens has OpenAI's 16."""
    (g,) = completion_to_proto(CompletionRequest(prompt="x"), "rid", "")
    s = g.sampling
    assert s.max_tokens == 16
    for name in ("temperature", "top_p", "seed", "logprobs", "repetition_penalty"):
        assert not s.HasField(name), name
    (g,) = completion_to_proto(CompletionRequest(prompt="x", max_tokens=None), "rid", "")
    assert not g.sampling.HasField("max_tokens")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a", [("text", "a")]),
        (["a", "b"], [("text", "a"), ("text", "b")]),
        ([1, 2, 3], [("token_ids", [1, 2, 3])]),
        ([[1, 2], [3]], [("token_ids", [1, 2]), ("token_ids", [3])]),
    ],
)
def test_completion_prompt_shapes(prompt, expected):
    reqs = completion_to_proto(CompletionRequest(prompt=prompt), "rid", "")
    got = [(g.WhichOneof("input"), g.text if g.HasField("text") else list(g.token_ids.ids)) for g in reqs]
    assert got == expected
    ids = [g.request_id for g in reqs]
    assert ids == (["rid"] if len(reqs) == 1 else [f"rid-{i}" for i in range(len(reqs))])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": []}, "prompt"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_completion_http_level_rejections(fields, param):
    req = CompletionRequest.model_validate({"prompt": "x"} | fields)
    with pytest.raises(GatewayError) as e:
        completion_to_proto(req, "rid", "")
    assert e.value.param == param and e.value.status == 400


def test_chat_translation():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
                },
                {"role": "assistant", "content": None},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 9,
            "logprobs": True,
            "top_logprobs": 3,
            "add_generation_prompt": False,
        }
    )
    g = chat_to_proto(req, "rid", "")
    assert g.WhichOneof("input") == "chat"
    roles = [(m.role, m.content) for m in g.chat.messages]
    assert roles == [("system", "Be brief."), ("user", "Hi\nthere"), ("assistant", "")]
    assert g.chat.HasField("add_generation_prompt") and not g.chat.add_generation_prompt
    assert g.sampling.max_tokens == 9 and g.sampling.logprobs == 3
    plain = chat_to_proto(ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}]), "r", "")
    assert not plain.sampling.HasField("max_tokens") and not plain.sampling.HasField("logprobs")
    only_logprobs = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], logprobs=True)
    assert chat_to_proto(only_logprobs, "r", "").sampling.logprobs == 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_chat_http_level_rejections(fields, param):
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}]} | fields)
    with pytest.raises(GatewayError) as e:
        chat_to_proto(req, "rid", "")
    assert e.value.param == param


def test_param_names_follow_the_endpoint():
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_completion_tokens=3)
    names = param_names(chat)
    assert names["top_p"] == "top_p" and names["max_tokens"] == "max_completion_tokens"
    assert names["logprobs"] == "top_logprobs" and names["prompt_token_ids"] == "messages"
    assert param_names(CompletionRequest(prompt="x"))["prompt_token_ids"] == "prompt"


# -- protobuf -> response shapes --------------------------------------------------------------------


def _lp(token, logprob, *top):
    return common_pb2.TokenLogprob(
        token=token, logprob=logprob, top=[common_pb2.TopLogprob(token=t, logprob=v) for t, v in top]
    )


def test_completion_logprobs_legacy_shape():
    lps = [_lp("Hel", -0.5, ("Hel", -0.5), ("He", -1.0)), _lp("lo", float("-inf"))]
    out = completion_logprobs(lps, text_offset=4)
    assert out["tokens"] == ["Hel", "lo"]
    assert out["token_logprobs"] == [-0.5, -9999.0]  # JSON has no -inf
    assert out["top_logprobs"] == [{"Hel": -0.5, "He": -1.0}, {"lo": -9999.0}]
    assert out["text_offset"] == [4, 7]


def test_chat_logprobs_shape():
    out = chat_logprobs([_lp("é", -0.25, ("é", -0.25), ("e", -2.0))])
    (entry,) = out["content"]
    assert entry["token"] == "é" and entry["logprob"] == -0.25 and entry["bytes"] == [0xC3, 0xA9]
    assert [t["token"] for t in entry["top_logprobs"]] == ["é", "e"]
    assert out["refusal"] is None


def test_usage_and_sse_framing():
    u = inference_pb2.Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=2)
    assert usage_dict(u, with_details=False) == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    assert usage_dict(u, with_details=True)["prompt_tokens_details"] == {"cached_tokens": 2}
    chunk = envelope("chat.completion.chunk", "chatcmpl-1", 5, "m", [{"index": 0, "delta": {"content": "é"}}])
    event = sse(chunk)
    assert event.startswith("data: {") and event.endswith("}\n\n") and "\n" not in event[:-2]
    assert json.loads(event.removeprefix("data: ")) == chunk | {"object": "chat.completion.chunk"}


# -- error mapping ----------------------------------------------------------------------------------


def _rpc_error(code, details, trailing=()):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details)


def test_grpc_errors_map_to_openai_statuses():
    names = {"top_p": "top_p", "max_tokens": "max_completion_tokens"}
    e = from_grpc_error(
        _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1], got 2.0"), names
    )
    assert (e.status, e.param, e.type, e.message) == (
        400,
        "top_p",
        "invalid_request_error",
        "top_p must be in (0, 1], got 2.0",
    )
    e = from_grpc_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: too many"), names)
    assert e.param == "max_completion_tokens"
    e = from_grpc_error(
        _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "this model has no chat template"), names
    )
    assert e.status == 400 and e.param is None
    e = from_grpc_error(_rpc_error(grpc.StatusCode.NOT_FOUND, "The model `x` does not exist"))
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")
    e = from_grpc_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", [("retry-after", "7")]))
    assert e.status == 429 and e.headers["Retry-After"] == "7"
    assert (
        from_grpc_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")).headers["Retry-After"] == "1"
    )
    assert from_grpc_error(_rpc_error(grpc.StatusCode.UNAVAILABLE, "down")).status == 503
    assert from_grpc_error(_rpc_error(grpc.StatusCode.INTERNAL, "boom")).status == 500
    assert param_from_message("Top_p is bad", {"top_p": "top_p"}) is None


# -- routes that answer before any gRPC call --------------------------------------------------------


@pytest.fixture
def client():
    with TestClient(create_app(NOWHERE)) as c:
        yield c


def _error(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/v1/chat/completions", CHAT | {"temperature": "hot"}, "temperature", "valid number"),
        ("/v1/chat/completions", CHAT | {"n": 0}, "n", "greater than or equal to 1"),
        ("/v1/chat/completions", CHAT | {"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
        ("/v1/chat/completions", {"model": "m"}, "messages", "required"),
        ("/v1/chat/completions", CHAT | {"messages": []}, "messages", "at least 1"),
        ("/v1/chat/completions", CHAT | {"messages": [{"content": "x"}]}, "messages[0].role", "required"),
        ("/v1/chat/completions", CHAT | {"stop": 3}, "stop", "a string or a list of strings"),
        (
            "/v1/chat/completions",
            CHAT | {"messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "a list of content parts",
        ),
        (
            "/v1/chat/completions",
            CHAT | {"stream_options": {"include_usage": "maybe"}},
            "stream_options.include_usage",
            "valid boolean",
        ),
        ("/v1/completions", {"prompt": [{"a": 1}]}, "prompt", "a list of token ids"),
        ("/v1/completions", {"prompt": [-1]}, "prompt", "a list of token ids"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
        ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed", "less than or equal"),
    ],
)
def test_bad_requests_are_400_naming_the_param(client, path, body, param, words):
    err = _error(client.post(path, json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert words in err["message"]


def test_body_that_is_not_json_is_400(client):
    err = _error(
        client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"}), 400
    )
    assert "JSON" in err["message"]
    err = _error(
        client.post(
            "/v1/completions",
            content=b'{"prompt": "x", "temperature": NaN}',
            headers={"content-type": "application/json"},
        ),
        400,
    )
    assert err["param"] == "temperature"


def test_unknown_route_uses_the_envelope(client):
    assert _error(client.get("/v1/nothing"), 404)["type"] == "invalid_request_error"


def test_request_id_is_echoed_or_made_up(client):
    assert client.get("/health", headers={"x-request-id": "abc"}).headers["x-request-id"] == "abc"
    resp = client.post("/v1/completions", json={"prompt": "x", "suffix": "y"})
    assert len(resp.headers["x-request-id"]) == 32


def test_health_and_ready_without_a_scheduler(client):
    assert client.get("/health").status_code == 200
    resp = client.get("/ready")
    assert resp.status_code == 503 and "UNAVAILABLE" in resp.json()["reason"]


def test_api_key_guards_v1_only():
    with TestClient(create_app(NOWHERE, api_key="sekrit")) as c:
        err = _error(c.get("/v1/models"), 401)
        assert err["code"] == "invalid_api_key"
        _error(c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"}), 401)
        # Checked before the body: an unauthenticated bad request is still a 401.
        _error(c.post("/v1/completions", json={"prompt": 1}), 401)
        ok = c.post(
            "/v1/completions", json={"prompt": "x", "suffix": "y"}, headers={"Authorization": "Bearer sekrit"}
        )
        assert ok.status_code == 400  # past the key check, stopped by validation before any gRPC call
        assert c.get("/health").status_code == 200


def test_openapi_schema_lists_the_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready"):
        assert p in paths


def test_cli_defaults():
    a = build_parser().parse_args([])
    assert (a.host, a.port, a.scheduler, a.api_key, a.served_model_name) == (
        "127.0.0.1",
        8000,
        "127.0.0.1:50051",
        None,
        None,
    )
