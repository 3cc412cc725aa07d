"""OpenAI's request bodies as pydantic models, their 1:1 translation into the public protobuf
API, and the response shapes built from the protobuf deltas.

The gateway checks only what HTTP and the wire format need (types, shapes, valid Unicode, what a
uint32 can carry, OpenAI's own limits such as four stop strings, and a cap on n). Value ranges
(top_p in (0, 1]...) and lengths against max_model_len are the scheduler's to check, so gRPC
clients and HTTP clients are told the same thing.

Unknown fields are ignored, as vLLM does: SDKs add parameters faster than servers learn them, and a
client sending `store` or `metadata` should still be served. Known parameters that would change the
output and that this server cannot honour (suffix, logit_bias, tools...) are refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from gateway.errors import GatewayError
from protos.pagemesh.v1 import common_pb2, inference_pb2

_U32 = 2**32 - 1
_I32 = 2**31 - 1
_MAX_STOP = 4  # OpenAI's limit
MAX_N = 16  # choices per prompt; each one is a sequence in the batch
MAX_PROMPTS = 2048  # prompts in one completion request (OpenAI's limit)
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps to the same value

U32 = Annotated[int, Field(ge=0, le=_U32)]


def _unicode(value: str) -> str:
    """JSON's `\\ud800` escapes decode to lone surrogates, which no UTF-8 encoder (protobuf's
    included) accepts: refuse them here, naming the parameter, rather than fail later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError(
            "invalid_unicode", f"must be valid Unicode: a lone surrogate at character {e.start}"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]


def _one_of(what: str) -> WrapValidator:
    """Replace pydantic's per-member union errors with one sentence (keeping a Unicode error,
    which is more precise than "must be a string")."""

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError as e:
            for err in e.errors():
                if err["type"] == "invalid_unicode":
                    raise PydanticCustomError("invalid_unicode", err["msg"]) from None
            raise PydanticCustomError("invalid_union", f"must be {what}") from None

    return WrapValidator(validate)


Prompt = Annotated[
    Text | list[Text] | list[U32] | list[list[U32]],
    _one_of("a string, a list of strings, a list of token ids or a list of token id lists"),
]
Stop = Annotated[Text | list[Text] | None, _one_of("a string or a list of strings")]


class _Body(BaseModel):
    """Every request body (and part of one) is checked strictly, as OpenAI does: "stream": "yes"
    or "n": "2" is a type error, not a value pydantic would quietly coerce."""

    # JSON has no NaN, but Python's json module accepts it; NaN slips through every range check.
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingRequest(_Body):
    """The fields both endpoints share: OpenAI's, then vLLM's extras."""

    model: Text | None = None  # None: the served model
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: Stop = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # accepted, unused
    logit_bias: dict[str, float] | None = None  # rejected when not empty
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1, le=_I32)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=_U32)
    stop_token_ids: list[U32] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0, le=_U32)  # OpenAI's default; None: up to max_model_len
    logprobs: int | None = Field(None, ge=0, le=_U32)
    echo: bool = False
    suffix: Text | None = None  # rejected: there is no fill-in-the-middle
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # accepted only when equal to n


class TextPart(_Body):
    type: Text
    text: Text | None = None


Content = Annotated[
    Text | list[TextPart] | None,
    _one_of('a string or a list of content parts like {"type": "text", "text": "..."}'),
]
# OpenAI's roles less tool/function, which need tool calling ("developer" is its new "system").
Role = Literal["system", "user", "assistant", "developer"]


class ChatMessageIn(_Body):
    role: Role
    content: Content = None
    name: Text | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, le=_U32)  # deprecated by OpenAI, still sent by many
    max_completion_tokens: int | None = Field(None, ge=0, le=_U32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=_U32)
    tools: list[Any] | None = None  # rejected when not empty: no tool calling
    response_format: dict[str, Any] | None = None  # only {"type": "text"}
    # vLLM's extras
    add_generation_prompt: bool = True
    echo: bool = False  # prepend the last message's content when it is the assistant's


# -- request -> protobuf ------------------------------------------------------------------------


def _check_common(req: _SamplingRequest) -> None:
    if len(req.stop_list()) > _MAX_STOP:
        raise GatewayError(f"stop: at most {_MAX_STOP} stop sequences are allowed", param="stop")
    if req.logit_bias:
        raise GatewayError("logit_bias is not supported", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise GatewayError("stream_options is only allowed when stream is true", param="stream_options")


def _sampling(
    req: _SamplingRequest, max_tokens: int | None, logprobs: int | None
) -> common_pb2.SamplingParams:
    """Unset optional fields stay unset, so the scheduler applies its defaults."""
    p = common_pb2.SamplingParams(
        n=req.n,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        min_tokens=req.min_tokens,
        stop=req.stop_list(),
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
    )
    if req.top_k == -1:  # vLLM's "disabled"; the proto's 0 means the same
        p.top_k = 0
    for name, value in (
        ("temperature", req.temperature),
        ("top_p", req.top_p),
        ("repetition_penalty", req.repetition_penalty),
        ("seed", req.seed),
        ("max_tokens", max_tokens),
        ("logprobs", logprobs),
    ):
        if value is not None:
            setattr(p, name, value)
    return p


def prompt_list(req: CompletionRequest) -> list[str] | list[list[int]]:
    """OpenAI's four prompt shapes as a batch: one text, texts, one list of token ids, lists of them."""
    if isinstance(req.prompt, str):
        return [req.prompt]
    if req.prompt and all(isinstance(t, int) for t in req.prompt):
        return [req.prompt]  # type: ignore[list-item,return-value]
    return req.prompt  # type: ignore[return-value]


def completion_to_proto(
    req: CompletionRequest, request_id: str, model: str
) -> list[inference_pb2.GenerateRequest]:
    """One GenerateRequest per prompt (OpenAI accepts a batch); ids are request_id-0, -1... for a batch."""
    _check_common(req)
    if req.suffix is not None:
        raise GatewayError("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise GatewayError("best_of is not supported (only best_of == n)", param="best_of")
    if req.echo and req.logprobs is not None:
        # The public API returns no prompt logprobs, so the echoed prompt would have none.
        raise GatewayError("echo is not supported together with logprobs", param="echo")
    prompts = prompt_list(req)
    if not prompts:
        raise GatewayError("prompt must not be empty", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise GatewayError(
            f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt"
        )
    sampling = _sampling(req, req.max_tokens, req.logprobs)
    out = []
    for i, prompt in enumerate(prompts):
        rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        g = inference_pb2.GenerateRequest(request_id=rid, model=model, sampling=sampling)
        if isinstance(prompt, str):
            g.text = prompt
        else:
            g.token_ids.ids.extend(prompt)
        out.append(g)
    return out


def _message_text(i: int, m: ChatMessageIn) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise GatewayError(
                f"messages[{i}].content: only text content parts are supported, got type {part.type!r}",
                param=f"messages[{i}].content",
            )
    return "\n".join(part.text or "" for part in m.content)


def _chat_input(messages: list[ChatMessageIn], add_generation_prompt: bool) -> common_pb2.ChatInput:
    chat = common_pb2.ChatInput(add_generation_prompt=add_generation_prompt)
    for i, m in enumerate(messages):
        # "developer" is OpenAI's new name for "system"; chat templates know only the old one.
        role = "system" if m.role == "developer" else m.role
        chat.messages.append(common_pb2.ChatMessage(role=role, content=_message_text(i, m)))
    return chat


def chat_to_proto(req: ChatCompletionRequest, request_id: str, model: str) -> inference_pb2.GenerateRequest:
    _check_common(req)
    if req.tools:
        raise GatewayError("tools are not supported", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise GatewayError("response_format: only type 'text' is supported", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise GatewayError("top_logprobs requires logprobs to be true", param="top_logprobs")
    chat = _chat_input(req.messages, req.add_generation_prompt)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return inference_pb2.GenerateRequest(
        request_id=request_id, model=model, chat=chat, sampling=_sampling(req, max_tokens, logprobs)
    )


def chat_echo_text(req: ChatCompletionRequest) -> str:
    """vLLM's chat echo: the last message's text when it is the assistant's (the one continued)."""
    last = req.messages[-1]
    return _message_text(len(req.messages) - 1, last) if req.echo and last.role == "assistant" else ""


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the chat template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessageIn] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # unset: the tokenizer's default (a BOS where the model wants one)
    add_generation_prompt: bool = True  # for messages


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[U32]


def tokenize_to_proto(req: TokenizeRequest, model: str) -> inference_pb2.TokenizeRequest:
    if (req.prompt is None) == (req.messages is None):
        raise GatewayError("exactly one of prompt or messages is required", param="prompt")
    out = inference_pb2.TokenizeRequest(model=model)
    if req.add_special_tokens is not None:
        out.add_special_tokens = req.add_special_tokens
    if req.prompt is not None:
        out.text = req.prompt
    else:
        assert req.messages is not None
        out.chat.CopyFrom(_chat_input(req.messages, req.add_generation_prompt))
    return out


def param_names(req: _SamplingRequest) -> dict[str, str]:
    """The scheduler's parameter names -> this request's, for error messages that name them."""
    names = {name: name for name in type(req).model_fields}
    names["prompt_token_ids"] = "prompt"
    if isinstance(req, ChatCompletionRequest):
        names["logprobs"] = "top_logprobs"
        names["prompt"] = names["prompt_token_ids"] = "messages"
        if req.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
    return names


# -- protobuf -> response shapes ------------------------------------------------------------------

FINISH_REASONS: dict[int, str | None] = {
    inference_pb2.FINISH_REASON_UNSPECIFIED: None,
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    # Only another client's Abort RPC ends a request this way (a disconnect leaves nobody to tell).
    # OpenAI's clients know only stop and length: the text so far is what there is.
    inference_pb2.FINISH_REASON_ABORT: "stop",
}


def stop_reason(msg: inference_pb2.GenerateResponse) -> int | str | None:
    """vLLM's extra field: the stop token id or stop string that ended the choice."""
    which = msg.WhichOneof("stop_reason")
    return getattr(msg, which) if which else None


def usage_dict(usage: inference_pb2.Usage, with_details: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
    if with_details:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return out


def _lp(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def completion_logprobs(lps: Sequence[common_pb2.TokenLogprob], text_offset: int) -> dict[str, Any]:
    """The legacy shape; top_logprobs holds the k alternatives plus the chosen token (like vLLM)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for lp in lps:
        tokens.append(lp.token)
        token_logprobs.append(_lp(lp.logprob))
        alternatives = {t.token: _lp(t.logprob) for t in lp.top}
        alternatives.setdefault(lp.token, _lp(lp.logprob))
        top.append(alternatives)
        offsets.append(text_offset)
        text_offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(lps: Sequence[common_pb2.TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode())}

    content = [
        entry(lp.token, lp.logprob) | {"top_logprobs": [entry(t.token, t.logprob) for t in lp.top]}
        for lp in lps
    ]
    return {"content": content, "refusal": None}


ObjectKind = Literal["text_completion", "chat.completion", "chat.completion.chunk"]


def envelope(
    kind: ObjectKind, id: str, created: int, model: str, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }


def sse(obj: dict[str, Any], ascii: bool = False) -> str:
    """One SSE event. Generated text is valid Unicode; an error event may quote the client's
    input, so it is sent with ensure_ascii (any string is valid JSON escaped)."""
    return f"data: {json.dumps(obj, ensure_ascii=ascii)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
