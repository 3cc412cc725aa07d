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

    @classmethod
    def of(cls, ev: TokenEvent) -> TokenRecord:
        r = ev.request
        return cls(
            r.req_id,
            ev.token_id,
            ev.logprobs,
            r.finish_reason,
            r.stop_reason,
            r.num_prompt_tokens,
            max(r.num_cached_tokens, 0),
        )


class EngineLoop:
    def __init__(
        self,
        worker_address: str,
        config: SchedulerConfig,
        publish: Callable[[int, list[TokenRecord]], None],
        on_failure: Callable[[list[str], str], None],
    ) -> None:
        self.worker_address = worker_address
        self.engine = EngineCore(RemoteWorker(worker_address), config)
        self.publish = publish
        self.on_failure = on_failure
        self.commands: queue.Queue[tuple] = queue.Queue()
        self.num_steps = 0
        self.last_step_time = time.monotonic()
        self._closed = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._closed = True
        self.commands.put(("wake",))

    # Called from other threads.
    def add(self, req_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        self.commands.put(("add", req_id, prompt_token_ids, sampling))

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
            try:
                events = self.engine.step()
            except WorkerError as e:
                self._fail_all(str(e))
                self._reconnect()
                continue
            self.num_steps += 1
            self.last_step_time = time.monotonic()
            if events:
                self.publish(self.engine.scheduler.step_id, [TokenRecord.of(ev) for ev in events])

    def _fail_all(self, reason: str) -> None:
        ids = list(self.engine.scheduler.requests)
        for req_id in ids:
            self.engine.abort(req_id)
        self.engine.scheduler.to_drop.clear()  # that worker's state is gone with it
        self.engine.scheduler.on_worker.clear()
        log.error("worker failed; ended %d requests: %s", len(ids), reason)
        self.on_failure(ids, reason)

    def _reconnect(self) -> None:
        old = self.engine.executor
        if isinstance(old, RemoteWorker):
            old.close()
        while not self._closed:
            try:
                self.engine.executor = RemoteWorker(self.worker_address, connect_timeout=5.0)
                log.warning("reconnected to the worker at %s", self.worker_address)
                return
            except WorkerError:
                time.sleep(0.5)
