#!/usr/bin/env bash
# One device call: environment facts, GPU tests, then the benchmark; logs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' | tee "$OUT/env.txt"
# No package index there: mirror the install's package-dir mapping with links in this throwaway copy.
ln -sfn ../backends flashfusemoe/backends; ln -sfn ../comm flashfusemoe/comm
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "${RUN_TESTS:-1}" = 1 ]; then
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/backends/test_triton_gpu.py} 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [ "${RUN_BENCH:-1}" = 1 ]; then
  timeout ${BENCH_TIMEOUT:-400} python3 integration/bench_layer.py ${BENCH_ARGS:-} --json "$OUT/bench.json" --write "$OUT/benchmarks.md" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
