"""The HTTP gateway: OpenAI's REST API in front of the public pagemesh.v1.Inference gRPC API.

Each HTTP request becomes one Generate call (one per prompt for a batched completion) on a
single long-lived grpc.aio channel; its stream of deltas is re-shaped into OpenAI's SSE chunks,
or folded into one response. Nothing here knows about models or tokens beyond moving them along.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway import observability
from gateway.errors import GatewayError, from_grpc_error, install_error_handlers, internal_error
from gateway.middleware import BodyGuard, RequestContext
from gateway.protocol import (
    FINISH_REASONS,
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_echo_text,
    chat_logprobs,
    chat_to_proto,
    completion_logprobs,
    completion_to_proto,
    envelope,
    param_names,
    prompt_list,
    sse,
    stop_reason,
    tokenize_to_proto,
    usage_dict,
)
from protos.pagemesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.grpc_server import aio_channel

T = TypeVar("T")
log = logging.getLogger("pagemesh.gateway")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; nobody reads it


class Generation:
    """The Generate calls behind one HTTP request, read as one stream of (prompt index, message)."""

    def __init__(
        self, stub: inference_pb2_grpc.InferenceStub, requests: list[inference_pb2.GenerateRequest]
    ) -> None:
        self.calls = [stub.Generate(r) for r in requests]
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.pumps: list[asyncio.Task[None]] = []

    async def start(self) -> list[inference_pb2.GenerateResponse]:
        """Each call's first message. The scheduler sends it as soon as it accepts the request, so
        waiting for it turns a rejected request into an HTTP error status, not a broken stream."""
        try:
            firsts = await asyncio.gather(*(call.read() for call in self.calls))
        except BaseException:
            self.cancel()
            raise
        if any(f is grpc.aio.EOF for f in firsts):
            self.cancel()
            raise GatewayError(
                "The scheduler ended the request without a reply.", status=500, type="server_error"
            )
        self.pumps = [asyncio.create_task(self._pump(i, call)) for i, call in enumerate(self.calls)]
        return firsts

    async def _pump(self, i: int, call: Any) -> None:
        try:
            while (msg := await call.read()) is not grpc.aio.EOF:
                self.queue.put_nowait((i, msg))
            self.queue.put_nowait((i, None))
        except grpc.aio.AioRpcError as e:
            self.queue.put_nowait((i, e))

    async def rest(self) -> AsyncIterator[tuple[int, inference_pb2.GenerateResponse]]:
        """Everything after the first messages, the calls interleaved as their messages arrive."""
        open_calls = len(self.calls)
        while open_calls:
            i, item = await self.queue.get()
            if item is None:
                open_calls -= 1
            elif isinstance(item, grpc.aio.AioRpcError):
                raise item
            else:
                yield i, item

    def cancel(self) -> None:
        """Cancelling a call aborts its request in the scheduler; a no-op for finished calls."""
        for call in self.calls:
            call.cancel()
        for pump in self.pumps:
            pump.cancel()


@dataclass(slots=True)
class Choice:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    chars: int = 0  # characters so far (echo included), for the legacy text_offset
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, msg: inference_pb2.GenerateResponse) -> None:
        self.text.append(msg.text)
        self.logprobs.extend(msg.logprobs)
        self.chars += len(msg.text)
        if msg.finish_reason:
            self.finish_reason = FINISH_REASONS[msg.finish_reason]
            self.stop_reason = stop_reason(msg)


@dataclass(slots=True)
class Run:
    """One HTTP request in flight: its Generate calls and what each of its choices has produced.
    Choice k of a batched completion is choice k % n of prompt k // n (OpenAI's order)."""

    gateway: Gateway
    gen: Generation
    firsts: list[inference_pb2.GenerateResponse]
    n: int
    scheduler_model: str
    names: dict[str, str]  # the scheduler's parameter names -> this endpoint's
    head: dict[str, Any]  # id, created, model of every response object
    choices: list[Choice] = field(default_factory=list)
    usages: list[inference_pb2.Usage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.choices = [Choice() for _ in range(len(self.firsts) * self.n)]

    async def deltas(self) -> AsyncIterator[tuple[int, inference_pb2.GenerateResponse]]:
        """(choice index, message) for every message, each already added to its choice."""

        async def messages() -> AsyncIterator[tuple[int, inference_pb2.GenerateResponse]]:
            for item in enumerate(self.firsts):
                yield item
            async for item in self.gen.rest():
                yield item

        try:
            async for i, msg in messages():
                await self.gateway.fill_token_texts(msg, self.scheduler_model)
                k = i * self.n + msg.index
                self.choices[k].add(msg)
                if msg.HasField("usage"):
                    self.usages.append(msg.usage)
                yield k, msg
        except grpc.aio.AioRpcError as e:
            raise from_grpc_error(e, self.names) from None

    async def drain(self) -> None:
        """Read to the end (a non-streamed response); cancelled, the calls are cancelled too."""
        try:
            async for _ in self.deltas():
                pass
        finally:
            self.gen.cancel()

    def usage(self, with_details: bool) -> dict[str, Any]:
        total = inference_pb2.Usage()
        for u in self.usages:
            total.prompt_tokens += u.prompt_tokens
            total.completion_tokens += u.completion_tokens
            total.cached_tokens += u.cached_tokens
        return usage_dict(total, with_details)

    async def sse(self, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
        """Chunks as SSE events; an error after the stream began becomes an error event (the SDKs
        raise it); the calls are cancelled at the end, which is how a client disconnect aborts."""
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except GatewayError as e:
            yield sse(e.body(), ascii=True)
        except Exception:
            log.exception("stream %s failed", self.head["id"])
            yield sse(internal_error().body(), ascii=True)
        finally:
            self.gen.cancel()
        yield SSE_DONE


class EventStream(StreamingResponse):
    """An SSE response that cancels its run's calls however it ends. The generator's own `finally`
    is not enough: a client that leaves before the first chunk means the generator never starts,
    and a never-started generator runs no `finally`."""

    def __init__(self, run: Run, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.gen.cancel()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client goes away first, cancel it (and so its gRPC calls) and return None."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


# -- the four response shapes ---------------------------------------------------------------------


async def completion_chunks(run: Run, echoes: list[str], logprobs: bool, usage: bool) -> AsyncIterator[dict]:
    extra = {"usage": None} if usage else {}  # OpenAI: null on every chunk but the usage one

    def chunk(k: int, text: str, lps: Any = None, finish: str | None = None, **more: Any) -> dict[str, Any]:
        choice = {"index": k, "text": text, "logprobs": lps, "finish_reason": finish} | more
        return envelope("text_completion", **run.head, choices=[choice]) | extra

    for k, c in enumerate(run.choices):
        if echo := echoes[k // run.n]:
            c.chars = len(echo)
            yield chunk(k, echo)
    async for k, msg in run.deltas():
        c = run.choices[k]
        if msg.text or msg.logprobs:
            offset = c.chars - len(msg.text)
            yield chunk(k, msg.text, completion_logprobs(msg.logprobs, offset) if logprobs else None)
        if msg.finish_reason:
            yield chunk(k, "", finish=c.finish_reason, stop_reason=c.stop_reason)
    if usage:
        yield envelope("text_completion", **run.head, choices=[]) | {"usage": run.usage(with_details=False)}


async def completion_body(run: Run, echoes: list[str], logprobs: bool) -> dict[str, Any]:
    await run.drain()
    choices = []
    for k, c in enumerate(run.choices):
        echo = echoes[k // run.n]
        choices.append(
            {
                "index": k,
                "text": echo + "".join(c.text),
                "logprobs": completion_logprobs(c.logprobs, len(echo)) if logprobs else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
        )
    return envelope("text_completion", **run.head, choices=choices) | {"usage": run.usage(with_details=False)}


async def chat_chunks(run: Run, echo: str, logprobs: bool, usage: bool) -> AsyncIterator[dict]:
    extra = {"usage": None} if usage else {}

    def chunk(k: int, delta: dict[str, Any], lps: Any = None, finish: str | None = None, **more: Any) -> dict:
        choice = {"index": k, "delta": delta, "logprobs": lps, "finish_reason": finish} | more
        return envelope("chat.completion.chunk", **run.head, choices=[choice]) | extra

    for k in range(run.n):  # OpenAI's first chunk of each choice carries the role
        yield chunk(k, {"role": "assistant", "content": echo})
    async for k, msg in run.deltas():
        c = run.choices[k]
        if msg.text or msg.logprobs:
            yield chunk(k, {"content": msg.text}, chat_logprobs(msg.logprobs) if logprobs else None)
        if msg.finish_reason:  # OpenAI's last chunk of a choice: an empty delta and the reason
            yield chunk(k, {}, finish=c.finish_reason, stop_reason=c.stop_reason)
    if usage:
        yield envelope("chat.completion.chunk", **run.head, choices=[]) | {
            "usage": run.usage(with_details=True)
        }


async def chat_body(run: Run, echo: str, logprobs: bool) -> dict[str, Any]:
    await run.drain()
    choices = [
        {
            "index": k,
            "message": {"role": "assistant", "content": echo + "".join(c.text), "refusal": None},
            "logprobs": chat_logprobs(c.logprobs) if logprobs else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        for k, c in enumerate(run.choices)
    ]
    return envelope("chat.completion", **run.head, choices=choices) | {"usage": run.usage(with_details=True)}


# -- the gateway ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Gateway:
    """What the routes share: the stub on the one channel, and the model naming."""

    scheduler_address: str
    served_model_name: str | None
    stub: inference_pb2_grpc.InferenceStub | None = None  # set in the lifespan, inside the event loop
    default_model: str | None = None  # the scheduler's model id, asked once
    token_texts: dict[int, str] = field(default_factory=dict)  # Detokenize fallback cache

    def scheduler_model(self, name: str | None) -> str:
        """Empty means "the served model" to the scheduler."""
        return "" if not name or name == self.served_model_name else name

    async def response_model(self, name: str | None) -> str:
        if name:
            return name
        if self.served_model_name:
            return self.served_model_name
        if self.default_model is None:
            assert self.stub is not None
            reply = await self.stub.ListModels(inference_pb2.ListModelsRequest())
            self.default_model = reply.models[0].id if reply.models else ""
        return self.default_model

    async def fill_token_texts(self, msg: inference_pb2.GenerateResponse, model: str) -> None:
        """The scheduler fills each logprob's token text; ask Detokenize for any it left empty."""
        for e in [*msg.logprobs, *(t for lp in msg.logprobs for t in lp.top)]:
            if e.token:
                continue
            if e.token_id not in self.token_texts:
                assert self.stub is not None
                reply = await self.stub.Detokenize(
                    inference_pb2.DetokenizeRequest(
                        model=model, token_ids=[e.token_id], skip_special_tokens=False
                    )
                )
                self.token_texts[e.token_id] = reply.text
            e.token = self.token_texts[e.token_id]

    async def prompt_text(self, first: inference_pb2.GenerateResponse, model: str) -> str:
        """The prompt for echo; the scheduler renders no text for a token-id prompt."""
        if first.prompt or not first.prompt_token_ids:
            return first.prompt
        assert self.stub is not None
        reply = await self.stub.Detokenize(
            inference_pb2.DetokenizeRequest(
                model=model, token_ids=first.prompt_token_ids, skip_special_tokens=False
            )
        )
        return reply.text

    async def start(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        request_id: str,
        requests: list[inference_pb2.GenerateRequest],
    ) -> Run:
        assert self.stub is not None
        head = {"id": request_id, "created": int(time.time()), "model": await self.response_model(body.model)}
        gen = Generation(self.stub, requests)
        try:
            firsts = await gen.start()
        except grpc.aio.AioRpcError as e:
            raise from_grpc_error(e, param_names(body)) from None
        return Run(self, gen, firsts, body.n, self.scheduler_model(body.model), param_names(body), head)

    def card(self, c: inference_pb2.ModelCard, first: bool) -> dict[str, Any]:
        # --served-model-name renames the scheduler's first (default) model.
        name = self.served_model_name if first and self.served_model_name else c.id
        return {
            "id": name,
            "object": "model",
            "created": c.created,
            "owned_by": "pagemesh",
            "root": c.root,
            "parent": None,
            "max_model_len": c.max_model_len,
        }


def create_app(
    scheduler_address: str, api_key: str | None = None, served_model_name: str | None = None
) -> FastAPI:
    gw = Gateway(scheduler_address, served_model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One channel for the process: HTTP/2 multiplexes calls.
        channel = aio_channel(scheduler_address, observability.client_interceptors())
        gw.stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            yield
        finally:
            await channel.close()

    app = FastAPI(title="pagemesh gateway", lifespan=lifespan)
    app.state.gateway = gw
    # The last added runs first: the request id and the key check come before the body is read.
    app.add_middleware(BodyGuard)
    app.add_middleware(RequestContext, api_key=api_key)
    observability.install(app)  # outermost middleware (trace span, HTTP metrics); /ready, /metrics
    install_error_handlers(app)

    async def reply(request: Request, run: Run, work: Awaitable[dict[str, Any]]) -> Response:
        try:
            result = await _unless_disconnected(request, work)
        finally:
            run.gen.cancel()  # a no-op once finished; otherwise the client left, or `work` failed
        return JSONResponse(result) if result is not None else Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}  # answering at all means the event loop is alive

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        assert gw.stub is not None
        models = (await gw.stub.ListModels(inference_pb2.ListModelsRequest())).models
        return {"object": "list", "data": [gw.card(c, i == 0) for i, c in enumerate(models)]}

    @app.get("/v1/models/{model_id:path}")  # ids may hold slashes (HuggingFaceTB/SmolLM2-135M-Instruct)
    async def get_model(model_id: str) -> dict[str, Any]:
        for card in (await list_models())["data"]:
            if card["id"] == model_id:
                return card
        raise GatewayError(
            f"The model `{model_id}` does not exist.", param="model", status=404, code="model_not_found"
        )

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        request_id = request.state.request_id
        run = await gw.start(
            body, request_id, completion_to_proto(body, request_id, gw.scheduler_model(body.model))
        )
        run.head["id"] = f"cmpl-{request_id}"
        echoes = [""] * len(run.firsts)
        try:
            if body.echo:  # the prompt as given; rendered by the scheduler for token ids
                for i, (given, first) in enumerate(zip(prompt_list(body), run.firsts, strict=True)):
                    echoes[i] = (
                        given if isinstance(given, str) else await gw.prompt_text(first, run.scheduler_model)
                    )
        except BaseException:
            run.gen.cancel()
            raise
        logprobs = body.logprobs is not None
        if body.stream:
            return EventStream(run, run.sse(completion_chunks(run, echoes, logprobs, body.include_usage)))
        return await reply(request, run, completion_body(run, echoes, logprobs))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        request_id = request.state.request_id
        run = await gw.start(
            body, request_id, [chat_to_proto(body, request_id, gw.scheduler_model(body.model))]
        )
        run.head["id"] = f"chatcmpl-{request_id}"
        echo = chat_echo_text(body)
        if body.stream:
            return EventStream(run, run.sse(chat_chunks(run, echo, body.logprobs, body.include_usage)))
        return await reply(request, run, chat_body(run, echo, body.logprobs))

    # vLLM's extra routes, same shapes: {count, max_model_len, tokens} and {prompt}.
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        assert gw.stub is not None
        request = tokenize_to_proto(body, gw.scheduler_model(body.model))
        names = {"prompt": "messages" if body.messages is not None else "prompt"}
        try:
            r = await gw.stub.Tokenize(request)
        except grpc.aio.AioRpcError as e:
            raise from_grpc_error(e, names) from None
        return {"count": len(r.token_ids), "max_model_len": r.max_model_len, "tokens": list(r.token_ids)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        assert gw.stub is not None
        # Special tokens kept, as vLLM does: /detokenize of /tokenize's output gives the prompt back.
        request = inference_pb2.DetokenizeRequest(
            model=gw.scheduler_model(body.model), token_ids=body.tokens, skip_special_tokens=False
        )
        try:
            r = await gw.stub.Detokenize(request)
        except grpc.aio.AioRpcError as e:
            raise from_grpc_error(e, {"token": "tokens"}) from None
        return {"prompt": r.text}

    return app
