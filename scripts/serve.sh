#!/usr/bin/env bash
# Set up .venv and start the server with its defaults (gRPC 127.0.0.1:50051, metrics :9464).
# Extra arguments go to `normserve serve` (see `normserve serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh server
exec .venv/bin/normserve serve "$@"
