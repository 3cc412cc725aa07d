"""The whole scheduling policy (vLLM V1's shape: no prefill or decode phases, one token budget).

Each step: running requests first, in admission order, each getting the tokens it still needs
(one for a decode, a chunk for an unfinished prefill) while the budget lasts; if blocks run out
the most recently admitted running request is preempted (blocks freed, recomputed later).
Then, if nothing was preempted, waiting requests are admitted in arrival order, reusing cached
prefix blocks, until the budget, max_num_seqs or the free blocks run out.

The next step may be scheduled before the previous one's output arrives (`--async-scheduling`,
EngineCore with a remote worker): a request's tokens in flight (`num_in_flight`) count as
computed and the tokens those steps will sample (`num_pending`) as known, so a decode is
scheduled for a token only the worker has seen yet (the worker keeps each request's tokens). A
request whose pending tokens reach its length limit is not scheduled again; one that ends on EOS
or a stop token wastes one slot of the step after.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.scheduler.block_manager import BlockManager
from services.scheduler.request import Request, Status
from services.step import CachedRequest, NewRequest, StepInput, StepOutput, TokenLogprobs, WorkerCapacity


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the worker's
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    async_scheduling: bool = False  # EngineCore: step N+1 sent while N computes (pipelined executors)


@dataclass(slots=True)
class TokenEvent:
    """One sampled token of one request, after finish checks."""

    request: Request
    token_id: int
    logprobs: TokenLogprobs | None
    finished: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, capacity: WorkerCapacity) -> None:
        self.config = config
        self.max_model_len = min(config.max_model_len or capacity.max_model_len, capacity.max_model_len)
        self.block_manager = BlockManager(
            capacity.num_blocks, capacity.block_size, config.enable_prefix_caching
        )
        kv_tokens = capacity.num_blocks * capacity.block_size
        if kv_tokens < self.max_model_len:
            # Otherwise one long request could need more blocks than exist and preempt itself forever.
            raise ValueError(
                f"max_model_len {self.max_model_len} does not fit the KV cache ({kv_tokens} tokens): "
                "raise kv_cache_memory / gpu_memory_utilization or lower max_model_len"
            )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.on_worker: set[str] = set()  # request ids the worker holds state for
        self.to_drop: list[str] = []
        self.step_id = 0
        self.num_preemptions = 0

    # -- admission and removal ----------------------------------------------------------------

    def check_prompt(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens == 0:
            raise ValueError("prompt must not be empty")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt is {num_prompt_tokens} tokens; max_model_len is {self.max_model_len}, which must "
                "leave room for at least one generated token"
            )

    def add(self, req: Request) -> None:
        if req.req_id in self.requests:
            raise ValueError(f"request_id {req.req_id!r} is already in use")
        self.check_prompt(req.num_prompt_tokens)
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def finish(self, req_id: str, status: Status, stop_reason: int | str | None = None) -> Request | None:
        """End a request now (abort, or a stop string found after detokenization); frees its blocks."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req.status == Status.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = status
        if stop_reason is not None:
            req.stop_reason = stop_reason
        self._release(req)
        return req

    def _release(self, req: Request) -> None:
        self.block_manager.release(req)
        if req.req_id in self.on_worker:
            self.on_worker.discard(req.req_id)
            self.to_drop.append(req.req_id)

    def _preempt(self, req: Request) -> None:
        self._release(req)
        self._requeue(req)
        req.num_preemptions += 1
        self.num_preemptions += 1

    def _requeue(self, req: Request) -> None:
        """Back to the front of the queue, to be recomputed; output of its steps in flight is dropped."""
        req.num_computed_tokens = req.num_in_flight = req.num_pending = 0
        req.status = Status.PREEMPTED
        self.waiting.appendleft(req)

    def requeue_all(self) -> list[Request]:
        """The worker and its KV memory are gone: every running request goes back to the front of the
        queue, in admission order, to be recomputed from its prompt and the tokens it already has.
        Cached prefixes lived in that memory, so the prefix cache is emptied too."""
        resumed = list(self.running)
        for req in reversed(resumed):
            self.block_manager.release(req)
            self._requeue(req)
        self.running = []
        self.on_worker.clear()
        self.to_drop.clear()
        self.block_manager.reset_prefix_cache()
        return resumed

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------------

    def schedule(self) -> StepInput:
        self.step_id += 1
        step = StepInput(step_id=self.step_id)
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            start = req.num_computed_tokens + req.num_in_flight
            n = min(req.num_tokens + req.num_pending - start, budget)
            if n <= 0 or self._ends_with_pending(req):
                i += 1
                continue
            while not bm.can_grow(req, start + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status == Status.PREEMPTED:
                break
            bm.grow(req, start + n)
            new_blocks = req.block_ids[req.num_sent_blocks :]
            step.cached_requests.append(CachedRequest(req.req_id, new_blocks, start))
            req.num_sent_blocks = len(req.block_ids)
            self._in_flight(req, start, n)
            step.num_scheduled_tokens[req.req_id] = n
            budget -= n
            i += 1

        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached_ids, cached_hashes = bm.find_cached_prefix(req.token_ids)
            num_cached = len(cached_ids) * bm.block_size
            n = req.num_tokens - num_cached
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break
                n = budget
            if not bm.can_admit(cached_ids, num_cached + n):
                break
            self.waiting.popleft()
            bm.admit(req, cached_ids, cached_hashes, num_cached + n)
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            req.status = Status.RUNNING
            self.running.append(req)
            self.on_worker.add(req.req_id)
            step.new_requests.append(
                NewRequest(
                    req.req_id,
                    list(req.token_ids),
                    list(req.block_ids),
                    num_cached,
                    req.sampling,
                    req.num_output_tokens,
                    req.traceparent,
                )
            )
            req.num_sent_blocks = len(req.block_ids)
            self._in_flight(req, num_cached, n)
            step.num_scheduled_tokens[req.req_id] = n
            budget -= n

        step.dropped_req_ids, self.to_drop = self.to_drop, []
        return step

    @staticmethod
    def _in_flight(req: Request, start: int, n: int) -> None:
        req.num_in_flight += n
        if start + n == req.num_tokens + req.num_pending:  # the step reaches its end: it samples
            req.num_pending += 1

    def _ends_with_pending(self, req: Request) -> bool:
        """The tokens in flight already take req to max_tokens or max_model_len (never true when
        each step is updated before the next is scheduled)."""
        if not req.num_pending:
            return False
        max_tokens = req.sampling.max_tokens
        return (
            max_tokens is not None and req.num_output_tokens + req.num_pending >= max_tokens
        ) or req.num_tokens + req.num_pending >= self.max_model_len

    def update(self, step: StepInput, output: StepOutput) -> list[TokenEvent]:
        """Advance progress by what the step computed; append sampled tokens; finish requests."""
        for req_id, n in step.num_scheduled_tokens.items():
            req = self.requests.get(req_id)
            if req is None or req.status != Status.RUNNING:
                continue  # finished or preempted while the step ran
            req.num_computed_tokens += n
            req.num_in_flight -= n
            self.block_manager.cache_computed_blocks(req)
        events = []
        for req_id, token, logprobs in zip(output.req_ids, output.token_ids, output.logprobs, strict=True):
            req = self.requests.get(req_id)
            if req is None or req.status != Status.RUNNING:
                continue
            req.num_pending -= 1
            req.token_ids.append(token)
            status = req.check_stop(token, self.max_model_len)
            if status is not None:
                self.finish(req_id, status)
            events.append(TokenEvent(req, token, logprobs, status is not None))
        return events
