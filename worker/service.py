"""The Worker gRPC service: a thin adapter over ModelRunner.

One scheduler drives it through one long-lived Step stream. A new stream means a new (or
restarted) scheduler, so the persistent batch starts empty.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc

from protos.pagemesh.v1 import worker_pb2, worker_pb2_grpc
from services.convert import capacity_to_proto, step_input_from_proto, step_output_to_proto
from worker.model_runner import ModelRunner
from worker.observability import StepObserver

log = logging.getLogger("pagemesh.worker")


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runner: ModelRunner, observer: StepObserver | None = None) -> None:
        self.runner = runner
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
                        output = self.runner.execute(step_input_from_proto(message))
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
