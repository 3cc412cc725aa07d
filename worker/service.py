"""The Worker gRPC service: a thin adapter over ModelRunner.

One scheduler drives it through one long-lived Step stream. A new stream means a new (or
restarted) scheduler, so the persistent batch starts empty.

The forward passes run on the process's main thread (MainThreadLoop), not on gRPC's handler
thread: once the main thread has used OpenMP (loading the model does), a second thread gets a
second OpenMP pool, and the two slow each other down. Measured on 2 CPU cores: a decode step of
32 sequences took 59 ms on the handler thread and 43 ms on the main thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from protos.pagemesh.v1 import worker_pb2, worker_pb2_grpc
from services.convert import capacity_to_proto, step_input_from_proto, step_output_to_proto
from services.step import StepInput, StepOutput
from worker.model_runner import ModelRunner
from worker.observability import StepObserver

log = logging.getLogger("pagemesh.worker")
T = TypeVar("T")


class MainThreadLoop:
    """Runs calls handed over from other threads on the thread that calls run()."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.stopped = False

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the loop's thread; block until it returns (or raises)."""
        future: Future[T] = Future()
        with self.lock:
            if self.stopped:
                raise RuntimeError("the worker is shutting down")
            self.calls.put((future, fn))
        return future.result()

    def run(self) -> None:
        """Serve calls until stop(); then fail the calls still queued, so no caller waits forever."""
        while (item := self.calls.get()) is not None:
            future, fn = item
            try:
                future.set_result(fn())
            except BaseException as e:  # handed back to the caller, who reports it
                future.set_exception(e)
        with self.lock:
            self.stopped = True
        while not self.calls.empty():
            if (item := self.calls.get()) is not None:
                item[0].set_exception(RuntimeError("the worker is shutting down"))

    def stop(self) -> None:
        """Safe from a signal handler: only enqueues the end marker."""
        self.calls.put(None)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self, runner: ModelRunner, observer: StepObserver | None = None, loop: MainThreadLoop | None = None
    ) -> None:
        self.runner = runner
        self.loop = loop  # where forward passes run; None: on the handler's own thread
        self.observer = observer or StepObserver()  # step spans and metrics
        self.stream_lock = threading.Lock()
        self.steps = 0

    def Handshake(
        self, request: worker_pb2.HandshakeRequest, context: grpc.ServicerContext
    ) -> worker_pb2.WorkerCapacity:
        return capacity_to_proto(self.runner.capacity)

    def Step(
        self, request_iterator: Iterator[worker_pb2.StepInput], context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.StepOutput]:
        if not self.stream_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "another scheduler already drives this worker")
        try:
            self.runner.requests.clear()
            self.observer.reset()
            for message in request_iterator:
                try:
                    with self.observer.step(message) as span:
                        output = self._execute(step_input_from_proto(message))
                        self.observer.finished(span, output.compute_seconds)
                except Exception as e:  # report, keep serving: the scheduler ends the affected requests
                    log.exception("step %d failed", message.step_id)
                    yield worker_pb2.StepOutput(step_id=message.step_id, error=f"{type(e).__name__}: {e}")
                    continue
                self.steps += 1
                yield step_output_to_proto(output)
        finally:
            self.runner.requests.clear()
            self.stream_lock.release()

    def _execute(self, step: StepInput) -> StepOutput:
        if self.loop is None:
            return self.runner.execute(step)
        return self.loop.call(lambda: self.runner.execute(step))
