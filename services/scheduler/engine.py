"""EngineCore: the scheduler driving an executor, one step at a time.

The executor is anything with `capacity` and `execute(StepInput) -> StepOutput`: the in-process
ModelRunner (offline LLM) or the gRPC client of a worker process (services). The same class
serves both, so the offline API and the services run one scheduling policy.

With `async_scheduling` (the scheduler service's default), an executor that can also `submit` a
step and `collect` outputs in order (the remote worker) gets the next step scheduled and sent
while the current one computes: the worker starts it as soon as it returns the previous output
instead of idling through the round trip and the scheduler's update and schedule (p50 1.3 ms of
a ~51 ms step at 32 streams on a 2-core CPU). There the scheduler's work then competes with the
step instead: +2-3% tok/s at 1 and 8 streams, no change at 32.
"""

from __future__ import annotations

import itertools
import time
from typing import Protocol, runtime_checkable

from services.sampling_params import SamplingParams
from services.scheduler.request import Request, Status
from services.scheduler.scheduler import Scheduler, SchedulerConfig, TokenEvent
from services.step import StepInput, StepOutput, WorkerCapacity


class Executor(Protocol):
    @property
    def capacity(self) -> WorkerCapacity: ...

    def execute(self, step: StepInput) -> StepOutput: ...


@runtime_checkable
class PipelinedExecutor(Executor, Protocol):
    def submit(self, step: StepInput) -> None: ...

    def collect(self) -> StepOutput:
        """The output of the oldest submitted step not collected yet."""
        ...


class EngineCore:
    def __init__(self, executor: Executor, config: SchedulerConfig) -> None:
        self.executor = executor
        self.capacity = executor.capacity
        self.scheduler = Scheduler(config, self.capacity)
        self._ids = itertools.count()
        self.device_seconds = 0.0
        self.in_flight: StepInput | None = None  # submitted to a pipelined executor, not collected

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def check_request(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Every check that can reject a request, without side effects: callers validate a whole
        batch before queueing any of it."""
        sampling.validate()
        self.scheduler.check_prompt(len(prompt_token_ids))
        vocab = self.capacity.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids: token id {bad[0]} outside the vocabulary of {vocab}")
        if (
            sampling.max_tokens is not None
            and len(prompt_token_ids) + sampling.max_tokens > self.max_model_len
        ):
            # vLLM rejects too; silently truncating would surprise a caller who asked for N tokens.
            raise ValueError(
                f"max_tokens: prompt ({len(prompt_token_ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                f"exceeds max_model_len ({self.max_model_len})"
            )

    def add_request(
        self, req_id: str, prompt_token_ids: list[int], sampling: SamplingParams, traceparent: str = ""
    ) -> Request:
        self.check_request(prompt_token_ids, sampling)
        req = Request.new(req_id, prompt_token_ids, sampling, self.capacity.eos_token_ids)
        req.traceparent = traceparent
        self.scheduler.add(req)
        return req

    def abort(self, req_id: str) -> Request | None:
        return self.scheduler.finish(req_id, Status.FINISHED_ABORTED)

    def stop(self, req_id: str, stop_string: str) -> Request | None:
        """A stop string was found in the detokenized text."""
        return self.scheduler.finish(req_id, Status.FINISHED_STOPPED, stop_string)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None

    @property
    def executor(self) -> Executor:
        return self._executor

    @executor.setter
    def executor(self, executor: Executor) -> None:
        # Worker recovery swaps the executor. The protocol check is made here, once per executor:
        # isinstance against a runtime_checkable Protocol costs tens of microseconds.
        self._executor = executor
        self._pipelined = executor if isinstance(executor, PipelinedExecutor) else None

    def step(self) -> list[TokenEvent]:
        pipelined = self._pipelined
        if pipelined is not None and (self.scheduler.config.async_scheduling or self.in_flight is not None):
            return self._pipelined_step(pipelined)
        step = self._schedule()
        return [] if step is None else self._update(step, self._executor.execute(step))

    def _pipelined_step(self, executor: PipelinedExecutor) -> list[TokenEvent]:
        if self.in_flight is None:
            self.in_flight = self._submit(executor, self._schedule())
            if self.in_flight is None:
                return []
        ahead = self._submit(executor, self._schedule())  # computes right after in_flight, no idle gap
        step, self.in_flight = self.in_flight, ahead
        try:
            output = executor.collect()
        except BaseException:
            self.in_flight = None  # the worker is gone: requeue_all() takes the requests back
            raise
        return self._update(step, output)

    def _schedule(self) -> StepInput | None:
        step = self.scheduler.schedule()
        if not step.num_scheduled_tokens and not step.dropped_req_ids:
            return None
        now = time.monotonic()
        for new in step.new_requests:  # queue time ends at the first admission, not at resumes
            req = self.scheduler.requests[new.req_id]
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        return step

    @staticmethod
    def _submit(executor: PipelinedExecutor, step: StepInput | None) -> StepInput | None:
        if step is not None:
            executor.submit(step)
        return step

    def _update(self, step: StepInput, output: StepOutput) -> list[TokenEvent]:
        self.device_seconds += output.compute_seconds
        self._attribute_cost(step, output.compute_seconds)
        return self.scheduler.update(step, output)

    def _attribute_cost(self, step: StepInput, seconds: float) -> None:
        """Each request's share of the step's device time, by the tokens it had in the step: the
        cost a request caused, for attribution (an approximation: attention cost grows with context
        length, which tokens alone do not see). Before update(), which forgets finished requests."""
        total = step.total_tokens
        if not total:
            return
        for req_id, n in step.num_scheduled_tokens.items():
            req = self.scheduler.requests.get(req_id)
            if req is not None:
                req.device_seconds += seconds * n / total
