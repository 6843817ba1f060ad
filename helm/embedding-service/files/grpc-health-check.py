#!/usr/bin/env python3
"""Exit 0 when a gRPC server's ``grpc.health.v1`` Check answers SERVING, 1 otherwise.

The kubelet's native ``grpc:`` probe cannot speak TLS, so with TLS the chart runs this as an exec
probe (it is also the image's Docker HEALTHCHECK). It needs only grpcio and grpcio-health-checking,
which the serving image has. Flags, not environment, configure it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help='service name; "" is the overall status')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca-file", help="CA bundle that signed the server certificate")
    parser.add_argument("--cert-file", help="client certificate (mTLS)")
    parser.add_argument("--key-file", help="client private key (mTLS)")
    parser.add_argument("--server-name", help="name expected in the server certificate")
    args = parser.parse_args(argv)

    if args.tls:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(args.ca_file),
            private_key=_read(args.key_file),
            certificate_chain=_read(args.cert_file),
        )
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        channel = grpc.secure_channel(args.addr, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.addr)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"health check failed: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.service or '(overall)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
