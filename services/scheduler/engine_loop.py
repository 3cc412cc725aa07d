"""The scheduler process's engine thread: it alone touches the EngineCore.

Other threads talk to it through a command queue (add, abort, stop) and get its results through
`publish`, called with plain records after every step. It never waits on detokenization: the
next step is scheduled while the previous step's tokens are detokenized elsewhere.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.sampling_params import SamplingParams
from services.scheduler.engine import EngineCore
from services.scheduler.remote_worker import RemoteWorker, WorkerError
from services.scheduler.scheduler import SchedulerConfig, TokenEvent
from services.step import TokenLogprobs

log = logging.getLogger("pagemesh.scheduler")


@dataclass(slots=True)
class TokenRecord:
    """A TokenEvent copied out of the engine thread's objects."""

    req_id: str
    token_id: int
    logprobs: TokenLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    device_seconds: float = 0.0  # the request's share of step time so far
    queue_seconds: float = 0.0  # from arrival in the engine to its first scheduling

    @classmethod
    def of(cls, ev: TokenEvent) -> TokenRecord:
        r = ev.request
        scheduled = r.first_scheduled_time if r.first_scheduled_time is not None else r.arrival_time
        return cls(
            r.req_id,
            ev.token_id,
            ev.logprobs,
            r.finish_reason,
            r.stop_reason,
            r.num_prompt_tokens,
            max(r.num_cached_tokens, 0),
            r.device_seconds,
            scheduled - r.arrival_time,
        )


class EngineLoop:
    def __init__(
        self,
        worker_address: str,
        config: SchedulerConfig,
        publish: Callable[[int, list[TokenRecord]], None],
        on_failure: Callable[[list[str], str], None],
        worker_recovery_timeout: float = 120.0,
    ) -> None:
        self.worker_address = worker_address
        self.worker_recovery_timeout = worker_recovery_timeout
        self.num_worker_losses = 0
        self.num_resumed_requests = 0
        self.engine = EngineCore(RemoteWorker(worker_address), config)
        self.publish = publish
        self.on_failure = on_failure
        self.commands: queue.Queue[tuple] = queue.Queue()
        self.num_steps = 0
        self.last_step_time = time.monotonic()
        # For readiness: when the step in flight began (None between steps), and why the worker is
        # lost while waiting for it to come back (None when it is there).
        self.step_started: float | None = None
        self.worker_lost: str | None = None
        self._closed = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._closed = True
        self.commands.put(("wake",))

    # Called from other threads.
    def add(
        self, req_id: str, prompt_token_ids: list[int], sampling: SamplingParams, traceparent: str = ""
    ) -> None:
        self.commands.put(("add", req_id, prompt_token_ids, sampling, traceparent))

    def abort(self, req_id: str) -> None:
        self.commands.put(("abort", req_id))

    def stop(self, req_id: str, stop_string: str) -> None:
        self.commands.put(("stop", req_id, stop_string))

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            try:
                self.engine.add_request(*command[1:])
            except ValueError as e:  # checked before queueing; a race (e.g. duplicate id) still ends cleanly
                self.on_failure([command[1]], str(e))
        elif kind == "abort":
            self.engine.abort(command[1])
        elif kind == "stop":
            self.engine.stop(command[1], command[2])

    def _run(self) -> None:
        while not self._closed:
            # Idle: sleep until a command arrives. Busy: take what is queued and step.
            if not self.engine.has_unfinished():
                self._apply(self.commands.get())
            while True:
                try:
                    self._apply(self.commands.get_nowait())
                except queue.Empty:
                    break
            if not self.engine.has_unfinished():
                continue
            self.step_started = time.monotonic()
            try:
                events = self.engine.step()
            except WorkerError as e:
                self.step_started = None
                self._recover(str(e))
                continue
            self.step_started = None
            self.num_steps += 1
            self.last_step_time = time.monotonic()
            if events:
                self.publish(self.engine.scheduler.step_id, [TokenRecord.of(ev) for ev in events])

    def _recover(self, reason: str) -> None:
        """Keep every request; wait for a worker to come back (the launcher or Kubernetes restarts
        it); resume the requests by recompute, so their streams go on where they stopped. Only if
        none returns within worker_recovery_timeout do the requests end, with an error."""
        self.num_worker_losses += 1
        self.worker_lost = reason
        resumed = self.engine.scheduler.requeue_all()
        self.num_resumed_requests += len(resumed)
        log.error(
            "lost the worker (%s); %d requests wait to resume", reason, len(self.engine.scheduler.requests)
        )
        old = self.engine.executor
        if isinstance(old, RemoteWorker):
            old.close()
        deadline = time.monotonic() + self.worker_recovery_timeout
        while not self._closed and time.monotonic() < deadline:
            try:
                worker = RemoteWorker(
                    self.worker_address, connect_timeout=min(5.0, deadline - time.monotonic())
                )
            except WorkerError:
                time.sleep(0.2)
                continue
            if worker.capacity.num_blocks < self.engine.capacity.num_blocks:
                log.warning(
                    "the new worker has fewer KV blocks (%d < %d); requests may be preempted more",
                    worker.capacity.num_blocks,
                    self.engine.capacity.num_blocks,
                )
            self.engine.executor = worker
            self.worker_lost = None
            log.warning(
                "worker back at %s; resuming %d requests by recompute", self.worker_address, len(resumed)
            )
            return
        ids = list(self.engine.scheduler.requests)
        for req_id in ids:
            self.engine.abort(req_id)
        self.engine.scheduler.to_drop.clear()
        log.error(
            "no worker came back within %.0fs; ended %d requests", self.worker_recovery_timeout, len(ids)
        )
        self.on_failure(ids, f"worker unavailable for {self.worker_recovery_timeout:.0f}s: {reason}")
        self._wait_for_worker()

    def _wait_for_worker(self) -> None:
        """With no request left to keep, wait (indefinitely) for a worker before serving again."""
        while not self._closed:
            try:
                self.engine.executor = RemoteWorker(self.worker_address, connect_timeout=5.0)
                self.worker_lost = None
                return
            except WorkerError:
                time.sleep(0.5)
