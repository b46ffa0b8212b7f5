#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# The monitoring tests run a real Prometheus (Debian's package); without it they are skipped.
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
        || echo "note: could not install prometheus; its tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
