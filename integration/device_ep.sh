#!/usr/bin/env bash
# One device call for the EP work: GPU tests, then the A/B against a base revision and bench_ep.
# Logs under $OUT. TESTS (pytest args), AB_BASE (a base checkout; empty: skip), PARTS (bench_ep parts).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' | tee "$OUT/env.txt"
ln -sfn ../backends flashfusemoe/backends; ln -sfn ../comm flashfusemoe/comm  # the install's package-dir mapping
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [ -n "${AB_BASE:-}" ]; then
  timeout ${AB_TIMEOUT:-150} python3 integration/ab_layer.py --base "$AB_BASE" --json "$OUT/ab.json" 2>&1 | tee "$OUT/ab.log" | tail -14
fi
if [ -n "${PARTS:-}" ]; then
  timeout ${EP_TIMEOUT:-100} python3 integration/bench_ep.py --parts "$PARTS" --json "$OUT/bench_ep.json" --write "$OUT/benchmarks_ep.md" 2>&1 | tee "$OUT/bench_ep.log" | tail -30
fi
