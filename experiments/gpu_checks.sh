#!/usr/bin/env bash
# Every GPU item of the project in one command, for a CUDA host whose time is short:
#   1. the GPU tests (`pytest -m gpu`: FP8 GEMMs per matmul group, cuDNN attention calls);
#   2. the speed table (experiments/bench_gpu.py), target rows first, within what is left of
#      the budget, merging into the table a previous call left (the next call fills in the rest);
#   3. when the table is complete and at least 150 s are left: the compile time at depth 32,
#      scan vs the unrolled loop, on this GPU with its autotuning (experiments/bench_compile.py,
#      one round, no remat, bf16: issue 11's last target measured where it matters) into
#      RESULTS_DIR/compile_gpu/.
#
#   bash experiments/gpu_checks.sh [RESULTS_DIR] [TOTAL_S]
#
# RESULTS_DIR (default experiments/results) receives gpu_tests.log and bench_gpu/ (csv, png,
# log); a bench_gpu.csv already in the repository is copied there first, so the rows it holds
# are not measured again.  TOTAL_S (default 540) bounds the whole script, for a host that is
# lent for a fixed time: the tests get at most half of it (then pytest is interrupted and
# prints what ran), the speed table what is left less 30 s (bench_gpu.py --budget-s: no row
# starts with under 90 s left, a row running at the end is stopped and recorded as a timeout),
# so the script ends, logs, table and plot written, within TOTAL_S.
#
# A host without grain / ml_collections / tensorboardX and no package index (a stock
# Python 3.12 with a CUDA JAX): download their wheels elsewhere with
#   bash experiments/gpu_checks.sh --download-wheels
# (into .whl/, ignored by git) and bring .whl/ along: this script installs what it finds there
# into /tmp/site, without an index and without touching the host's own packages.
set -uo pipefail
cd "$(dirname "$0")/.."

# grain's own dependencies that a CUDA JAX with flax and optax does not bring: array-record,
# portpicker, importlib_resources and cloudpickle (the lent GPU image has cloudpickle already).
WHEELS=(grain==0.2.18 ml_collections==1.1.0 tensorboardX==2.6.5 array-record==0.8.6
        portpicker==1.6.0 importlib_resources==7.1.0 cloudpickle==3.1.3)

if [ "${1:-}" = "--download-wheels" ]; then
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
             manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
    exit $?
fi

RESULTS=${1:-experiments/results}
TOTAL=${2:-540}
case "$TOTAL" in ''|*[!0-9]*) echo "TOTAL_S must be a whole number of seconds, got '$TOTAL'" >&2; exit 2;; esac
if [ "$TOTAL" -lt 240 ]; then echo "TOTAL_S=$TOTAL is too short: give at least 240 s" >&2; exit 2; fi
START=$SECONDS
mkdir -p "$RESULTS/bench_gpu"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda

if compgen -G ".whl/*.whl" >/dev/null; then
    # A failed install is not fatal: the GPU tests and the bench need only jax, flax and optax.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "warning: installing .whl/ failed" >&2
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" || exit 1
python3 -c "import grain, ml_collections" \
    || echo "warning: grain / ml_collections do not import (needed by training, not here)" >&2

echo "== pytest -m gpu (at most $((TOTAL / 2)) s)"
timeout -s INT -k 20 $((TOTAL / 2)) python3 -m pytest -q -m gpu -p no:cacheprovider \
    --durations=0 tests/test_fp8_gpu.py 2>&1 | tee "$RESULTS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

BUDGET=$((TOTAL - (SECONDS - START) - 30))
echo "== bench_gpu.py (budget ${BUDGET} s)"
committed=experiments/results/bench_gpu/bench_gpu.csv
if [ -f "$committed" ] && [ ! -f "$RESULTS/bench_gpu/bench_gpu.csv" ]; then
    cp "$committed" "$RESULTS/bench_gpu/"
fi
if [ "$BUDGET" -lt 1 ]; then
    # --budget-s 0 would mean no limit at all: say so instead, and leave the table for later.
    echo "no time left for the speed table (the tests took it); run the script again" \
        | tee "$RESULTS/bench_gpu/bench_gpu.log"
    bench_rc=3
else
    python3 experiments/bench_gpu.py --out "$RESULTS/bench_gpu" --budget-s "$BUDGET" 2>&1 \
        | tee "$RESULTS/bench_gpu/bench_gpu.log"
    bench_rc=${PIPESTATUS[0]}
fi
LEFT=$((TOTAL - (SECONDS - START)))
if [ "$bench_rc" -eq 0 ] && [ "$LEFT" -ge 150 ]; then
    echo "== bench_compile.py on this GPU (at most $((LEFT - 20)) s)"
    mkdir -p "$RESULTS/compile_gpu"
    timeout -s INT -k 10 $((LEFT - 20)) python3 experiments/bench_compile.py --rounds 1 \
        --remat none --out "$RESULTS/compile_gpu" 2>&1 | tee "$RESULTS/compile_gpu/bench_compile.log"
    echo "bench_compile exit ${PIPESTATUS[0]} (informational)"
else
    echo "bench_compile.py skipped: the speed table is not complete or ${LEFT} s < 150 s are left"
fi
echo "gpu tests exit $tests_rc, bench exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
