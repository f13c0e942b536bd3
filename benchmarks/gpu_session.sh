#!/usr/bin/env bash
# One prepared call on a CUDA machine: install qatgraph, run the GPU-marked tests, then the GPU
# benchmark with the arguments given (see benchmarks/gpu_train.py). Logs and the JSON results go
# to $OUT (default /tmp/qatgraph-gpu). Each part has its own time limit so the call ends in time.
#   TESTS_TIMEOUT=150 BENCH_TIMEOUT=330 benchmarks/gpu_session.sh --sections kernels,step --modes eager
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qatgraph-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QATGRAPH_NO_PROGRESS=1
export QATGRAPH_CPU_KERNEL=0  # the CPU C++ kernel's one-time build (about 25 s) is not what this call measures
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${TESTS_TIMEOUT:-150}" -gt 0 ]; then
  timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider -rfE 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/gpu_train.py --json "$OUT/results.json" "$@" 2>"$OUT/bench_stderr.log" | tee "$OUT/bench.log"
echo "benchmark exit status ${PIPESTATUS[0]}"
grep -v "Warning\|warn(\|^  " "$OUT/bench_stderr.log" | tail -8
