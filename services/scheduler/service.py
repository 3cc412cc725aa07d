"""The scheduler process: the public pagemesh.v1.Inference API over the engine thread.

A Generate call tokenizes through the tokenizer service, queues its n child requests in the
engine, and streams deltas. The engine thread publishes each step's tokens; one asyncio task
sends them to the tokenizer service's DetokenizeStream (one batch per step) and routes the text to
the callers, so detokenization and stop-string matching never hold up a step. A stop string found
there ends the request through the engine's command queue.

With `--stream-interval N` a request's tokens are held until N of them are new (or it finishes);
its first token goes out at once. Every message costs CPU in this process, the gateway and the
client, which on a small machine the model's threads feel; requests without stop strings are not
even detokenized until they are sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from protos.pagemesh.v1 import inference_pb2, inference_pb2_grpc, tokenizer_pb2
from services.convert import logprobs_to_proto, sampling_from_proto
from services.metrics import EngineMetrics
from services.sampling_params import SamplingParams, fan_out
from services.scheduler.engine_loop import EngineLoop, TokenRecord
from services.scheduler.observability import ObservabilityRPCs, RequestObserver
from services.telemetry import current_traceparent
from tokenizer_svc.client import DetokenizeSession, TokenizerClient

FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "abort": inference_pb2.FINISH_REASON_ABORT,
}
PROMPT_CONTEXT = 8  # prompt tokens the detokenizer sees, for the first output token's spacing


@dataclass(slots=True)
class Child:
    """One of the n sequences of a request."""

    req_id: str
    index: int
    parent: Parent
    num_tokens: int = 0  # sent to the caller
    done: bool = False
    watches_stops: bool = False  # has stop strings: detokenized every step, so a stop ends it at once
    held: list[TokenRecord] = field(default_factory=list)  # made, not yet sent (--stream-interval)
    held_text: list[str] = field(default_factory=list)  # text of held[:num_held_detokenized]
    num_held_detokenized: int = 0

    def due(self, interval: int) -> bool:
        """Whether the held tokens go out after this step: the first token at once (time to first
        token is what a stream is for), then every `interval` tokens, and whatever is left at the end."""
        return self.num_tokens == 0 or len(self.held) >= interval or self.held[-1].finish_reason is not None


@dataclass(slots=True)
class Parent:
    request_id: str
    queue: asyncio.Queue
    num_prompt_tokens: int
    children: list[Child] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def done(self) -> bool:
        return all(c.done for c in self.children)

    def usage(self) -> inference_pb2.Usage:
        return inference_pb2.Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=sum(c.num_tokens for c in self.children),
            cached_tokens=self.num_cached_tokens,
        )


class InferenceServicer(ObservabilityRPCs, inference_pb2_grpc.InferenceServicer):
    def __init__(self, tokenizer: TokenizerClient, model_name: str, model_path: str) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_path = model_path
        self.created = int(time.time())
        self.engine_loop: EngineLoop | None = None
        self.max_waiting_requests = 1024
        self.stream_interval = 1
        self.parents: dict[str, Parent] = {}
        self.children: dict[str, Child] = {}
        self.pending_starts: list[tokenizer_pb2.DetokStart] = []
        self.pending_releases: list[str] = []
        self.records: asyncio.Queue[tuple[int, list[TokenRecord]]] = asyncio.Queue()
        self.aio_loop = asyncio.get_running_loop()
        self.observer = RequestObserver(EngineMetrics(model_name))  # vllm:* metrics, span attributes

    # -- called from the engine thread ------------------------------------------------------------

    def publish(self, step_id: int, records: list[TokenRecord]) -> None:
        self.aio_loop.call_soon_threadsafe(self.records.put_nowait, (step_id, records))

    def on_failure(self, req_ids: list[str], reason: str) -> None:
        self.aio_loop.call_soon_threadsafe(self._fail, req_ids, reason)

    def _fail(self, req_ids: list[str], reason: str) -> None:
        for req_id in req_ids:
            child = self.children.get(req_id)
            if child is not None and not child.done:
                child.done = True
                child.parent.queue.put_nowait(grpc.StatusCode.UNAVAILABLE if "worker" in reason else reason)

    # -- the detokenization pipeline --------------------------------------------------------------

    async def detokenize_forever(self) -> None:
        session: DetokenizeSession | None = None
        while True:
            step_id, records = await self.records.get()
            while not self.records.empty():  # fell behind: fold the queued steps into one batch
                step_id, more = self.records.get_nowait()
                records += more
            stepped: dict[str, Child] = {}
            for r in records:
                child = self.children.get(r.req_id)
                if child is not None and not child.done:
                    child.held.append(r)
                    stepped[r.req_id] = child
            due = {req_id for req_id, c in stepped.items() if c.due(self.stream_interval)}
            to_detok = [c for req_id, c in stepped.items() if req_id in due or c.watches_stops]
            if not to_detok and not self.pending_releases:
                continue
            if session is None:
                session = self.tokenizer.detokenize_session()
            batch = tokenizer_pb2.DetokenizeBatch(
                step_id=step_id,
                start=self.pending_starts,
                tokens=[
                    tokenizer_pb2.DetokTokens(
                        request_id=c.req_id,
                        token_ids=[r.token_id for r in c.held[c.num_held_detokenized :]],
                        finished=c.held[-1].finish_reason is not None,
                    )
                    for c in to_detok
                ],
                release=self.pending_releases,
            )
            self.pending_starts, self.pending_releases = [], []
            try:
                result = await session.send(batch)
            except Exception as e:
                # The tokenizer service restarted: its per-stream state is gone, so every request
                # it was detokenizing fails; a fresh stream serves the requests that come next.
                session = None
                self._fail(list(self.children), f"tokenizer service failed: {e}")
                continue
            texts = {d.request_id: d for d in result.deltas}
            sending: list[Child] = []
            for c in to_detok:
                delta = texts.get(c.req_id)
                c.held_text.append(delta.text if delta is not None else "")
                c.num_held_detokenized = len(c.held)
                if c.req_id in due or (delta is not None and delta.HasField("stop_string")):
                    sending.append(c)
            pieces = await self._logprob_pieces([r for c in sending for r in c.held])
            for c in sending:
                if not c.done:  # its caller may have left during the awaits
                    delta = texts.get(c.req_id)
                    stop = delta.stop_string if delta is not None and delta.HasField("stop_string") else None
                    self._deliver(c, c.held, "".join(c.held_text), stop, pieces)
                c.held, c.held_text, c.num_held_detokenized = [], [], 0

    async def _logprob_pieces(self, records: list[TokenRecord]) -> dict[int, str]:
        ids = {r.token_id for r in records if r.logprobs is not None}
        for r in records:
            if r.logprobs is not None:
                ids.update(r.logprobs.top_ids)
        if not ids:
            return {}
        ordered = sorted(ids)
        reply = await self.tokenizer.detokenize(ordered, skip_special_tokens=False, per_token=True)
        return dict(zip(ordered, reply.tokens, strict=True))

    def _deliver(
        self,
        child: Child,
        recs: list[TokenRecord],
        text: str,
        stop_string: str | None,
        pieces: dict[int, str],
    ) -> None:
        parent = child.parent
        last = recs[-1]
        parent.num_cached_tokens = max(parent.num_cached_tokens, last.num_cached_tokens)
        msg = inference_pb2.GenerateResponse(
            request_id=parent.request_id,
            index=child.index,
            token_ids=[r.token_id for r in recs],
            text=text,
        )
        for r in recs:
            if r.logprobs is not None:
                lp = logprobs_to_proto(r.logprobs, r.token_id)
                lp.token = pieces.get(r.token_id, "")
                for top in lp.top:
                    top.token = pieces.get(top.token_id, "")
                msg.logprobs.append(lp)
        child.num_tokens += len(recs)
        if stop_string is not None and last.finish_reason is None:
            # Found after detokenization: end it in the engine; tokens it made since are dropped.
            assert self.engine_loop is not None
            self.engine_loop.stop(child.req_id, stop_string)
            self.pending_releases.append(child.req_id)  # the tokenizer service forgets it with the next batch
            msg.finish_reason = inference_pb2.FINISH_REASON_STOP
            msg.stop_string = stop_string
        elif last.finish_reason is not None:
            msg.finish_reason = FINISH[last.finish_reason]
            if stop_string is not None:
                msg.stop_string = stop_string
            elif isinstance(last.stop_reason, int):
                msg.stop_token_id = last.stop_reason
            elif isinstance(last.stop_reason, str):
                msg.stop_string = last.stop_reason
        if msg.finish_reason:
            child.done = True
            if parent.done:
                msg.usage.CopyFrom(parent.usage())
        self.observer.delivered(parent.request_id, child.index, recs, msg)
        parent.queue.put_nowait(msg)

    # -- RPCs -----------------------------------------------------------------------------------

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        arrival = time.monotonic()
        assert self.engine_loop is not None
        await self._check_model(request.model, context)
        try:
            params = sampling_from_proto(request.sampling)
            ids, prompt = await self._tokenize_input(request)
            self.engine_loop.engine.check_request(ids, params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        waiting = len(self.children) - len(self.engine_loop.engine.scheduler.running)
        if waiting + params.n > self.max_waiting_requests:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is overloaded: {waiting} requests are waiting "
                f"(max {self.max_waiting_requests}); retry later",
                trailing_metadata=(("retry-after", str(self._retry_after(waiting))),),
            )
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.parents:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already running"
            )
        parent = self._start(request_id, ids, params)
        self.observer.started(request_id, request, params, len(ids), arrival, context)
        try:
            # Inside the try: a caller that goes away while this first message is in flight must
            # still abort its requests.
            yield inference_pb2.GenerateResponse(request_id=request_id, prompt_token_ids=ids, prompt=prompt)
            while not parent.done or not parent.queue.empty():
                item = await parent.queue.get()
                if isinstance(item, inference_pb2.GenerateResponse):
                    yield item
                elif isinstance(item, grpc.StatusCode):
                    await context.abort(item, "the worker failed while serving this request")
                else:
                    await context.abort(grpc.StatusCode.INTERNAL, str(item))
        finally:
            self._end(parent)

    def _retry_after(self, waiting: int) -> int:
        """Seconds a refused caller should wait (gRPC `retry-after` trailer, HTTP Retry-After): a
        hint, not a promise. The queue drains a batch of max_num_seqs at a time, so one second per
        batch ahead of the caller, within [1, 30]."""
        assert self.engine_loop is not None
        batch = max(1, self.engine_loop.engine.scheduler.config.max_num_seqs)
        return min(30, 1 + waiting // batch)

    def _start(self, request_id: str, ids: list[int], params: SamplingParams) -> Parent:
        assert self.engine_loop is not None
        parent = Parent(request_id, asyncio.Queue(), len(ids))
        self.parents[request_id] = parent
        for k, (child_id, child_params) in enumerate(fan_out(request_id, params)):
            child = Child(child_id, k, parent, watches_stops=bool(params.stop))
            parent.children.append(child)
            self.children[child.req_id] = child
            self.pending_starts.append(
                tokenizer_pb2.DetokStart(
                    request_id=child.req_id,
                    prompt_tail_ids=ids[-PROMPT_CONTEXT:],
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
            )
            self.engine_loop.add(child.req_id, ids, child_params, current_traceparent())
        return parent

    def _end(self, parent: Parent) -> None:
        """The caller is gone (finished, cancelled or failed): abort what still runs, forget it."""
        assert self.engine_loop is not None
        for child in parent.children:
            if not child.done:
                child.done = True
                self.engine_loop.abort(child.req_id)
                self.pending_releases.append(child.req_id)
            self.children.pop(child.req_id, None)
        self.parents.pop(parent.request_id, None)
        self.observer.ended(parent.request_id, parent.usage())

    async def _check_model(self, model: str, context: grpc.aio.ServicerContext) -> None:
        if model and model not in (self.model_name, self.model_path):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"The model `{model}` does not exist; this server serves `{self.model_name}`",
            )

    async def _tokenize_input(
        self, request: inference_pb2.GenerateRequest | inference_pb2.TokenizeRequest
    ) -> tuple[list[int], str]:
        """Token ids of a request's input (text, chat messages or ids), and the rendered prompt."""
        kind = request.WhichOneof("input")
        if kind == "token_ids":
            return list(request.token_ids.ids), ""
        if kind == "text":
            add = request.add_special_tokens if request.HasField("add_special_tokens") else None
            ids, prompt = await self.tokenizer.tokenize_text(request.text, add_special_tokens=add)
            return ids, prompt
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            gen = (
                request.chat.add_generation_prompt if request.chat.HasField("add_generation_prompt") else True
            )
            ids, prompt = await self.tokenizer.tokenize_chat(messages, add_generation_prompt=gen)
            return ids, prompt
        raise ValueError("prompt: one of text, chat or token_ids is required")

    async def Abort(
        self, request: inference_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.AbortResponse:
        parent = self.parents.get(request.request_id)
        if parent is None:
            return inference_pb2.AbortResponse(found=False)
        for child in parent.children:
            if not child.done:
                assert self.engine_loop is not None
                self.engine_loop.abort(child.req_id)
                self.pending_releases.append(child.req_id)
                child.done = True
                msg = inference_pb2.GenerateResponse(
                    request_id=parent.request_id,
                    index=child.index,
                    finish_reason=inference_pb2.FINISH_REASON_ABORT,
                )
                if parent.done:
                    msg.usage.CopyFrom(parent.usage())
                parent.queue.put_nowait(msg)
        return inference_pb2.AbortResponse(found=True)

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        await self._check_model(request.model, context)
        assert self.engine_loop is not None
        try:
            ids, prompt = await self._tokenize_input(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return inference_pb2.TokenizeResponse(
            token_ids=ids, prompt=prompt, max_model_len=self.engine_loop.engine.max_model_len
        )

    async def Detokenize(
        self, request: inference_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.DetokenizeResponse:
        await self._check_model(request.model, context)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        try:
            reply = await self.tokenizer.detokenize(list(request.token_ids), skip_special_tokens=skip)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return inference_pb2.DetokenizeResponse(text=reply.text)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        assert self.engine_loop is not None
        card = inference_pb2.ModelCard(
            id=self.model_name,
            max_model_len=self.engine_loop.engine.max_model_len,
            root=self.model_path,
            created=self.created,
        )
        return inference_pb2.ListModelsResponse(models=[card])

    async def GetStats(
        self, request: inference_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EngineStats:
        assert self.engine_loop is not None
        s = self.engine_loop.engine.scheduler
        bm = s.block_manager
        return inference_pb2.EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_free_blocks=bm.num_free,
            num_blocks=bm.num_blocks,
            num_preemptions=s.num_preemptions,
            prefix_cache_queries=bm.query_tokens,
            prefix_cache_hits=bm.hit_tokens,
            num_steps=self.engine_loop.num_steps,
            num_worker_losses=self.engine_loop.num_worker_losses,
            num_resumed_requests=self.engine_loop.num_resumed_requests,
        )
