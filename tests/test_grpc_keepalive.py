"""A long-lived step stream must survive idle periods while clients send keepalive pings.

gRPC servers by default accept one ping per 5 minutes without data and answer more with GOAWAY
(too_many_pings); a session-long stack then lost its worker stream after a quiet minute. Here the
client pings every second, so a server with default settings fails within a few seconds."""

from __future__ import annotations

import queue
import time

import grpc
from tiny_models import build_tiny_llama

from protos.pagemesh.v1 import worker_pb2, worker_pb2_grpc
from services.convert import step_input_to_proto
from services.grpc_server import CHANNEL_OPTIONS, Service, start_server
from services.sampling_params import SamplingParams
from services.step import CachedRequest, NewRequest, StepInput
from worker.model_runner import ModelRunner
from worker.service import WorkerServicer


def test_idle_step_stream_survives_keepalive_pings(tmp_path):
    runner = ModelRunner(str(build_tiny_llama(tmp_path / "m")), dtype="float32", max_model_len=256)
    address = f"unix://{tmp_path}/w.sock"
    servicer = WorkerServicer(runner)
    server = start_server(
        [address], [Service(worker_pb2_grpc.add_WorkerServicer_to_server, servicer, "pagemesh.v1.Worker")]
    )
    options = dict(CHANNEL_OPTIONS) | {"grpc.keepalive_time_ms": 1000, "grpc.keepalive_timeout_ms": 1000}
    outbox: queue.Queue[worker_pb2.StepInput | None] = queue.Queue()
    try:
        with grpc.insecure_channel(address, options=list(options.items())) as channel:
            replies = worker_pb2_grpc.WorkerStub(channel).Step(iter(outbox.get, None))
            greedy = SamplingParams(temperature=0)
            outbox.put(
                step_input_to_proto(StepInput(1, [NewRequest("a", [5, 6, 7], [0], 0, greedy)], [], {"a": 3}))
            )
            assert len(next(replies).token_ids) == 1
            time.sleep(8)  # idle, while the client pings every second
            outbox.put(step_input_to_proto(StepInput(2, [], [CachedRequest("a", [], 3)], {"a": 1})))
            reply = next(replies)
            assert reply.error == "" and len(reply.token_ids) == 1
            outbox.put(None)
    finally:
        server.stop(grace=1).wait()  # finish the stream's handler thread before the interpreter exits
