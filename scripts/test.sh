#!/usr/bin/env bash
# Set up (first run only) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# numba (ranx) compiles its kernels once: keep the cache between runs
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$PWD/.venv/numba-cache}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.venv/prefect-home}
exec .venv/bin/python -m pytest "$@"
