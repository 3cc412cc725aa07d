"""`pagemesh tokenizer`: serve pagemesh.v1.Tokenizer for one model directory until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import sys

from protos.pagemesh.v1 import tokenizer_pb2_grpc
from services.args import add_observability_args
from services.grpc_server import Service, start_server, wait_for_termination
from services.metrics import new_registry, serve_metrics
from services.telemetry import setup_tracing
from tokenizer_svc.service import SERVICE_NAME, TokenizerServicer
from tokenizer_svc.tokenizer import Tokenizer

DEFAULT_ADDRESS = "127.0.0.1:50052"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagemesh tokenizer", description=__doc__)
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help="host:port or unix:///path.sock (default %(default)s)"
    )
    parser.add_argument("--tokenizer", help="tokenizer directory, if not the model's own")
    add_observability_args(parser)
    args = parser.parse_args(argv)
    setup_tracing("pagemesh-tokenizer", args.otlp_traces_endpoint)  # before the server: it adds interceptors
    serve_metrics(new_registry(), args.metrics_port, args.metrics_host)  # process metrics only, for now

    servicer = TokenizerServicer(Tokenizer.from_dir(args.tokenizer or args.model))
    server = start_server(
        [args.address], [Service(tokenizer_pb2_grpc.add_TokenizerServicer_to_server, servicer, SERVICE_NAME)]
    )
    # Launchers and tests wait for this line (or for health SERVING) before connecting.
    print(f"tokenizer: serving on {args.address}", flush=True)
    wait_for_termination(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
