#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# Tests use real services from Debian packages: Prometheus (monitoring tests) and Redis
# (shared-store tests). Installed when missing and possible; tests needing one skip otherwise.
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null) \
        || echo "note: could not install ${missing[*]}; their tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
