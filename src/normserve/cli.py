"""The `normserve` command.

    normserve serve [--host H] [--port P] [--metrics-port M] ...

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="normserve", description="Stateful PyTorch normalization layers over gRPC.")
    parser.add_argument("--version", action="version", version=f"normserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "serve":
        from normserve.server.app import serve
        from normserve.server.settings import Settings

        overrides = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            settings = Settings.load(overrides)
        except ValueError as e:
            parser.error(str(e))
        return serve(settings)
    return 2  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":
    sys.exit(main())
