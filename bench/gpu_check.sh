#!/usr/bin/env bash
# The prepared device check (see bench/gpu_check.py): correctness vs the reference, then speed.
# Usage on a lent GPU:  bash bench/gpu_check.sh        CI on CPU:  GPU_CHECK_TINY=1 bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PY" bench/gpu_check.py "$@"
