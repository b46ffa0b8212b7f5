"""The operator commands of the `normserve` CLI: `normserve layers ...` and `normserve
health`, built on the SDK (so they need neither torch nor grpcio-health-checking).

    normserve layers list   [--prefix P]
    normserve layers get    NAME
    normserve layers create NAME KIND [ARG=VALUE ...]       e.g. num_features=3 momentum=null
    normserve layers delete NAME [NAME ...]
    normserve layers reset  NAME [--expected-version V]
    normserve layers state  NAME
    normserve health        [--service S]

Human-readable tables by default, `--json` for scripts. Exit status: 0 on success, 1 when
a call failed (the error on stderr, one line), 2 for usage errors. Connection flags:
--target (env NORMSERVE_TARGET), --timeout, --token (env NORMSERVE_TOKEN), --tls,
--ca-cert, --cert, --key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence, TextIO

from . import _core as core
from . import codec
from ._client import Client
from .errors import InvalidArgumentError, NormServeError
from .types import LayerInfo, StateVersion

__all__ = ["add_health_parser", "add_layers_parser", "run_health", "run_layers"]

SubParsers = "argparse._SubParsersAction[argparse.ArgumentParser]"
DEFAULT_CLI_TIMEOUT = 10.0


def _connection_flags(p: argparse.ArgumentParser, default_timeout: float) -> None:
    g = p.add_argument_group("connection")
    target = os.environ.get("NORMSERVE_TARGET", core.DEFAULT_TARGET)
    g.add_argument("--target", default=target, help=f"server address (env NORMSERVE_TARGET, default {target})")
    g.add_argument("--timeout", type=float, default=default_timeout, help=f"seconds per call (default {default_timeout:g})")
    g.add_argument("--token", default=None, help="bearer token sent as 'authorization' metadata (env NORMSERVE_TOKEN)")
    g.add_argument("--tls", action="store_true", help="use TLS (implied by --ca-cert/--cert)")
    g.add_argument("--ca-cert", metavar="PEM", help="root certificate(s) to trust (default: the system's)")
    g.add_argument("--cert", metavar="PEM", help="client certificate chain, for mutual TLS (with --key)")
    g.add_argument("--key", metavar="PEM", help="client private key, for mutual TLS (with --cert)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _client(args: argparse.Namespace) -> Client:
    credentials: Any = None
    if args.tls or args.ca_cert or args.cert or args.key:
        credentials = core.tls_credentials(args.ca_cert, args.cert, args.key)
    token = args.token or os.environ.get("NORMSERVE_TOKEN") or None
    metadata = [("authorization", f"Bearer {token}")] if token else None
    return Client(args.target, timeout=args.timeout, credentials=credentials, metadata=metadata)


# -- health --------------------------------------------------------------------------------
def add_health_parser(sub: Any) -> None:
    """Register `normserve health`."""
    p = sub.add_parser(
        "health",
        help="check a server through the gRPC health service",
        description="Exit 0 when the server reports SERVING, 1 otherwise (usable as a container health check).",
    )
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    _connection_flags(p, default_timeout=3.0)


def run_health(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """`normserve health`: print the status; exit 0 when SERVING."""
    try:
        with _client(args) as client:
            status = client.health(args.service, timeout=args.timeout)
    except (NormServeError, OSError, ValueError) as e:
        if args.json:
            error = {"code": e.code.name, "message": e.message} if isinstance(e, NormServeError) else {"message": str(e)}
            print(json.dumps({"target": args.target, "service": args.service, "status": None, "error": error}), file=out)
        else:
            print(f"{args.target}: {e}", file=err)
        return 1
    if args.json:
        print(json.dumps({"target": args.target, "service": args.service, "status": status}), file=out)
    else:
        print(f"{args.target}: {status}", file=out)
    return 0 if status == "SERVING" else 1


# -- layers --------------------------------------------------------------------------------
def add_layers_parser(sub: Any) -> None:
    """Register `normserve layers list|get|create|delete|reset|state`."""
    p = sub.add_parser(
        "layers",
        help="list, inspect, create, delete and reset server-side layers",
        description="Manage the server's layers. Tables by default; --json for scripts.",
    )
    lsub = p.add_subparsers(dest="layers_command", required=True, metavar="{list,get,create,delete,reset,state}")

    q = lsub.add_parser("list", help="list layers (sorted by name)")
    q.add_argument("--prefix", default="", help="only layers whose names start with this")
    _connection_flags(q, DEFAULT_CLI_TIMEOUT)

    q = lsub.add_parser("get", help="show one layer: kind, arguments, state version")
    q.add_argument("name")
    _connection_flags(q, DEFAULT_CLI_TIMEOUT)

    q = lsub.add_parser(
        "create",
        help="create a layer",
        description="Create a layer: a torch.nn class name and its constructor arguments as NAME=VALUE "
        "(JSON values: num_features=3 momentum=null normalized_shape=[4,8] dtype=float64).",
    )
    q.add_argument("name")
    q.add_argument("kind", help=f"one of {', '.join(codec.KIND_FIELDS)}")
    q.add_argument("args", nargs="*", metavar="ARG=VALUE", help="constructor argument")
    q.add_argument("--arg", action="append", default=[], dest="more_args", metavar="ARG=VALUE", help="same, as a flag")
    _connection_flags(q, DEFAULT_CLI_TIMEOUT)

    q = lsub.add_parser("delete", help="delete layers and their state")
    q.add_argument("names", nargs="+", metavar="NAME")
    q.add_argument("--missing-ok", action="store_true", help="a layer that doesn't exist is not an error")
    _connection_flags(q, DEFAULT_CLI_TIMEOUT)

    q = lsub.add_parser("reset", help="reset a layer's running statistics")
    q.add_argument("name")
    q.add_argument("--expected-version", type=int, default=None, help="only if the layer is at this version (else ABORTED)")
    _connection_flags(q, DEFAULT_CLI_TIMEOUT)

    q = lsub.add_parser("state", help="show a layer's state_dict (summary table; --json: every value)")
    q.add_argument("name")
    _connection_flags(q, DEFAULT_CLI_TIMEOUT)


def _parse_args(items: Sequence[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"{item!r}: expected ARG=VALUE, e.g. num_features=3")
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
    return kwargs


def info_json(info: LayerInfo) -> dict[str, Any]:
    """A LayerInfo as a JSON-ready dict."""
    return {
        "name": info.name,
        "kind": info.kind,
        "args": info.args,
        "version": info.state.version,
        "num_batches_tracked": info.state.num_batches_tracked,
        "has_running_stats": info.has_running_stats,
    }


def _non_default_args(info: LayerInfo) -> str:
    family = next((f for f in core._DEFAULTS if info.kind.startswith(f)), "")
    defaults = core._DEFAULTS.get(family, {})
    shown = {k: v for k, v in info.args.items() if k not in defaults or defaults[k] != v}
    return " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: left-aligned columns separated by two spaces."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _print_info(info: LayerInfo, out: TextIO) -> None:
    rows = [
        ("name", info.name),
        ("kind", info.kind),
        ("version", info.state.version),
        ("num_batches_tracked", info.state.num_batches_tracked),
        ("running stats", "yes" if info.has_running_stats else "no"),
    ]
    rows += [(f"  {k}", _fmt(v)) for k, v in info.args.items()]
    rows.insert(5, ("args", ""))
    print(table(("FIELD", "VALUE"), rows), file=out)


def _state_rows(state: dict[str, Any]) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    import numpy as np

    rows: list[tuple[Any, ...]] = []
    full: dict[str, Any] = {}
    for key in sorted(state):
        value = state[key]
        dtype = str(value.dtype).removeprefix("torch.")
        if not isinstance(value, np.ndarray):  # a torch tensor (bfloat16 layers)
            value = value.float().numpy() if value.is_floating_point() else value.numpy()
        arr = np.asarray(value)
        values = arr.tolist()
        full[key] = {"dtype": dtype, "shape": list(arr.shape), "values": _json_safe(values)}
        flat = arr.astype(np.float64).ravel()
        if flat.size:
            stats = (f"{flat.min():.6g}", f"{flat.mean():.6g}", f"{flat.max():.6g}")
        else:
            stats = ("", "", "")
        preview = " ".join(f"{v:.4g}" for v in flat[:4]) + (" …" if flat.size > 4 else "")
        rows.append((key, dtype, list(arr.shape), *stats, preview))
    return rows, full


def _json_safe(values: Any) -> Any:
    if isinstance(values, list):
        return [_json_safe(v) for v in values]
    if isinstance(values, float) and not math.isfinite(values):
        return str(values)
    return values


def _get_state(client: Client, name: str) -> dict[str, Any]:
    try:
        return client.get_state(name)
    except InvalidArgumentError as e:
        if "numpy" not in e.message:
            raise
        return client.get_state(name, as_torch=True)  # bfloat16 needs torch


def _version(v: StateVersion) -> str:
    return f"version={v.version} num_batches_tracked={v.num_batches_tracked}"


def run_layers(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """`normserve layers ...`: run one subcommand; returns the exit status."""
    command: str = args.layers_command
    handlers: dict[str, Callable[[Client, argparse.Namespace, TextIO], None]] = {
        "list": _list,
        "get": _get,
        "create": _create,
        "delete": _delete,
        "reset": _reset,
        "state": _state,
    }
    try:
        with _client(args) as client:
            handlers[command](client, args, out)
    except (NormServeError, OSError, ValueError) as e:
        print(f"normserve layers {command}: {e}", file=err)
        return 1
    return 0


def _list(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    layers = client.list_layers(args.prefix)
    if args.json:
        print(json.dumps([info_json(i) for i in layers], indent=2), file=out)
        return
    rows = [
        (i.name, i.kind, i.state.version, i.state.num_batches_tracked, "yes" if i.has_running_stats else "no", _non_default_args(i))
        for i in layers
    ]
    print(table(("NAME", "KIND", "VERSION", "BATCHES", "RUNNING_STATS", "ARGS"), rows), file=out)


def _get(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    info = client.get_layer(args.name)
    if args.json:
        print(json.dumps(info_json(info), indent=2), file=out)
    else:
        _print_info(info, out)


def _create(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    kwargs = _parse_args([*args.args, *args.more_args])
    info = client.create_layer(args.name, args.kind, **kwargs)
    if args.json:
        print(json.dumps(info_json(info), indent=2), file=out)
    else:
        print(f"created {info.name}: {info.kind} {_non_default_args(info)}".rstrip(), file=out)


def _delete(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    from .errors import NotFoundError

    deleted, missing = [], []
    for name in args.names:
        try:
            client.delete_layer(name)
        except NotFoundError:
            if not args.missing_ok:
                raise
            missing.append(name)
        else:
            deleted.append(name)
    if args.json:
        print(json.dumps({"deleted": deleted, "missing": missing}), file=out)
    else:
        for name in deleted:
            print(f"deleted {name}", file=out)
        for name in missing:
            print(f"not found {name}", file=out)


def _reset(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    v = client.reset_running_stats(args.name, expected_version=args.expected_version)
    if args.json:
        print(json.dumps({"name": args.name, "version": v.version, "num_batches_tracked": v.num_batches_tracked}), file=out)
    else:
        print(f"reset {args.name}: {_version(v)}", file=out)


def _state(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    state = _get_state(client, args.name)
    info = client.get_layer(args.name)
    rows, full = _state_rows(state)
    if args.json:
        doc = {"name": info.name, "kind": info.kind, "version": info.state.version, "state": full}
        print(json.dumps(doc, indent=2), file=out)
        return
    print(f"{info.name}: {info.kind} {_version(info.state)}", file=out)
    print(table(("KEY", "DTYPE", "SHAPE", "MIN", "MEAN", "MAX", "VALUES"), rows), file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:  # pragma: no cover - via normserve.cli
    """Run only the operator commands (the full CLI is `normserve`)."""
    parser = argparse.ArgumentParser(prog="normserve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_layers_parser(sub)
    add_health_parser(sub)
    args = parser.parse_args(argv)
    return run_layers(args) if args.command == "layers" else run_health(args)
