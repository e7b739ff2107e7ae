#!/usr/bin/env bash
# Set up (first run only) and run the demo: index + search + evaluate the bundled LIMIT-small dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/lateflow demo "$@"
