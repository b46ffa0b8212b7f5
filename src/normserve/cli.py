"""The `normserve` command.

    normserve serve [--host H] [--port P] [--metrics-port M] ...
    normserve health [--target HOST:PORT] [--service NAME]
    normserve import-state CHECKPOINT.pt --layer NAME [--prefix bn1] [--kind BatchNorm2d]

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


def _import_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "import-state",
        help="create or update a layer from a PyTorch checkpoint",
        description=(
            "Load a .pt checkpoint (torch.load with weights_only=True), take the tensors of one "
            "module (--prefix, e.g. layer1.0.bn1) and load them into a server-side layer; with "
            "--kind, a missing layer is created with arguments inferred from the tensors."
        ),
    )
    p.add_argument("checkpoint", help="path of a .pt file holding a state_dict (or {'state_dict': ...})")
    p.add_argument("--layer", required=True, help="server-side layer name")
    p.add_argument("--prefix", default="", help="module path inside the checkpoint (e.g. bn1)")
    p.add_argument("--kind", help="torch.nn class to create the layer as, e.g. BatchNorm2d")
    p.add_argument(
        "--arg", action="append", default=[], metavar="NAME=VALUE",
        help="extra constructor argument (JSON value), e.g. --arg eps=0.001 --arg momentum=null",
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")


def _import_state(args: argparse.Namespace) -> int:
    import json

    from normserve.client import Client, NormServeError

    kwargs = {}
    for item in args.arg:
        key, sep, raw = item.partition("=")
        if not sep:
            print(f"--arg {item!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
    try:
        with Client(args.target, timeout=args.timeout) as client:
            info = client.import_state(args.layer, args.checkpoint, prefix=args.prefix, kind=args.kind, **kwargs)
    except (NormServeError, OSError) as e:
        print(f"import-state: {e}", file=sys.stderr)
        return 1
    print(f"{info.name}: {info.kind} version={info.state.version} num_batches_tracked={info.state.num_batches_tracked}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="normserve", description="Stateful PyTorch normalization layers over gRPC.")
    parser.add_argument("--version", action="version", version=f"normserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _health_parser(sub)
    _import_parser(sub)
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
    if args.command == "import-state":
        return _import_state(args)
    return 2  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":
    sys.exit(main())
