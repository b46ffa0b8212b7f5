"""The `normserve` command.

    normserve serve [--host H] [--port P] [--metrics-port M] ...
    normserve health [--target HOST:PORT] [--service NAME] [--json]
    normserve layers list|get|create|delete|reset|state ... [--target HOST:PORT] [--json]
    normserve import-state CHECKPOINT.pt --layer NAME [--prefix bn1] [--kind BatchNorm2d]
    normserve token new --role infer|train|admin [--layer-prefix P]

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
    from normserve.client._cli import add_health_parser

    add_health_parser(sub)


def _health(args: argparse.Namespace) -> int:
    # Through the SDK: needs neither torch nor grpcio-health-checking.
    from normserve.client._cli import run_health

    return run_health(args)


def _layers_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from normserve.client._cli import add_layers_parser

    add_layers_parser(sub)


def _layers(args: argparse.Namespace) -> int:
    from normserve.client._cli import run_layers

    return run_layers(args)


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


def _token_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("token", help="manage bearer tokens", description="Manage bearer tokens for --tokens-file.")
    tsub = p.add_subparsers(dest="token_command", required=True)
    new = tsub.add_parser(
        "new",
        help="print a fresh token and the tokens-file entry to paste",
        description="Print a fresh random token (give it to the client) and the JSON entry holding "
        "only its SHA-256 digest (paste it into the tokens file, then send the server SIGHUP).",
    )
    new.add_argument("--role", required=True, choices=("infer", "train", "admin"))
    new.add_argument("--name", default="", help="a name for the token (default: derived from the role)")
    new.add_argument("--layer-prefix", default="", help="restrict the token to layers whose names start with this")


def _token_new(args: argparse.Namespace) -> int:
    import json

    from normserve.server.transport.auth import digest, new_token

    token = new_token()
    entry = {"name": args.name or f"{args.role}-{token[3:11]}", "sha256": digest(token), "role": args.role}
    if args.layer_prefix:
        entry["layer_prefix"] = args.layer_prefix
    print(f"token: {token}")
    print("tokens-file entry:")
    print(json.dumps(entry))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="normserve", description="Stateful PyTorch normalization layers over gRPC.")
    parser.add_argument("--version", action="version", version=f"normserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _health_parser(sub)
    _layers_parser(sub)
    _import_parser(sub)
    _token_parser(sub)
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
    if args.command == "layers":
        return _layers(args)
    if args.command == "import-state":
        return _import_state(args)
    if args.command == "token":
        return _token_new(args)
    return 2  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":
    sys.exit(main())
