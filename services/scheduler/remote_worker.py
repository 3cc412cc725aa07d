"""The scheduler's executor for a worker in another process: one long-lived bidirectional Step
stream, one StepInput out and one StepOutput back per engine step, in order. Steps can be
submitted ahead of collecting (EngineCore pipelines one step)."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc

from protos.pagemesh.v1 import worker_pb2, worker_pb2_grpc
from services.convert import capacity_from_proto, step_input_to_proto, step_output_from_proto
from services.grpc_server import insecure_channel
from services.step import StepInput, StepOutput, WorkerCapacity


class WorkerError(RuntimeError):
    """The worker is gone or failed a step; the requests of that step cannot continue there."""


class RemoteWorker:
    def __init__(self, address: str, connect_timeout: float = 600.0) -> None:
        self.address = address
        self.channel = insecure_channel(address)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout)
            stub = worker_pb2_grpc.WorkerStub(self.channel)
            self._capacity = capacity_from_proto(stub.Handshake(worker_pb2.HandshakeRequest(), timeout=30))
        except (grpc.FutureTimeoutError, grpc.RpcError) as e:
            self.channel.close()
            raise WorkerError(f"worker at {address} did not answer: {e}") from e
        self._outbox: queue.Queue[worker_pb2.StepInput | None] = queue.Queue()
        self._responses: Iterator[worker_pb2.StepOutput] = stub.Step(iter(self._outbox.get, None))

    @property
    def capacity(self) -> WorkerCapacity:
        return self._capacity

    def execute(self, step: StepInput) -> StepOutput:
        self.submit(step)
        return self.collect()

    def submit(self, step: StepInput) -> None:
        self._outbox.put(step_input_to_proto(step))

    def collect(self) -> StepOutput:
        try:
            reply = next(self._responses)
        except (grpc.RpcError, StopIteration) as e:
            raise WorkerError(f"lost the worker at {self.address}: {e}") from e
        if reply.error:
            raise WorkerError(f"worker failed step {reply.step_id}: {reply.error}")
        return step_output_from_proto(reply)

    def close(self) -> None:
        self._outbox.put(None)
        self.channel.close()
