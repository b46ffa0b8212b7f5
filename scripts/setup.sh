#!/usr/bin/env bash
# Create .venv and install normserve into it (idempotent). Usage: scripts/setup.sh [EXTRAS]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-server}"
python3 -m venv .venv
# torch first and pinned to the tested release. Where pip's configuration offers a CPU
# wheel of it (as on this project's machines) that one is taken; on other Linux hosts set
# PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index to avoid a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
