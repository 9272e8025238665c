#!/usr/bin/env bash
# The suite's numerics on every machine of our kind (issue 21): the kernel, reference and decode tests with
# OPENBLAS_CORETYPE=Haswell (set on AMD EPYC machines, and so in their CI) and unset, on 1 and 2 torch threads.
# Run before you stop after touching kernels, the reference or a test that compares ids; not part of `make test`.
# Usage: bash bench/test_matrix.sh [pytest args...]      (or `make test-matrix`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
TESTS=(tests/test_kernels.py tests/test_kernels_topm.py tests/test_reference.py tests/test_decode.py
       tests/test_speculation.py tests/test_tree.py tests/test_sampling.py tests/test_gpu_check.py)
status=0
for coretype in Haswell unset; do
    for threads in 1 2; do
        if [ "$coretype" = unset ]; then envs=(-u OPENBLAS_CORETYPE); else envs=(OPENBLAS_CORETYPE="$coretype"); fi
        echo "== OPENBLAS_CORETYPE=$coretype, $threads thread(s)"
        env "${envs[@]}" CLP_FAST_TEST_THREADS="$threads" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@" \
            | tail -n 3 || status=1
    done
done
exit "$status"
