"""The `normserve` command.

    normserve serve [--host H] [--port P] [--metrics-port M] ...
    normserve health [--target HOST:PORT] [--service NAME]

Every `serve` flag can also be set with a NORMSERVE_* environment variable (flag wins).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Optional, Sequence

from normserve import __version__


def _serve_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from normserve.server.settings import Settings

    p = sub.add_parser("serve", help="run the gRPC server", description="Run the normserve gRPC server.")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(
            flag,
            type=type(f.default),
            default=None,
            metavar=f.name.upper(),
            help=f"{Settings.HELP[f.name]} (env {Settings.env_name(f.name)}, default {f.default})",
        )


def _health_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "health",
        help="check a server through the gRPC health service",
        description="Exit 0 when the server reports SERVING, 1 otherwise (usable as a container health check).",
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default 3)")


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"{args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="normserve", description="Stateful PyTorch normalization layers over gRPC.")
    parser.add_argument("--version", action="version", version=f"normserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _health_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "serve":
        from normserve.server.settings import Settings

        overrides = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            settings = Settings.load(overrides)
        except ValueError as e:
            parser.error(str(e))
        from normserve.server.app import serve  # torch and grpc load only for a valid config

        return serve(settings)
    if args.command == "health":
        return _health(args)
    return 2  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":
    sys.exit(main())
