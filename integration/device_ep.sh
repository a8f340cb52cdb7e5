#!/usr/bin/env bash
# One device call for the EP work, stages in order, each under its own timeout, logs under $OUT:
# BENCH (bench_ep parts at EP = 1; BENCH_ARGS more flags), SMOKE (bench_ep --smoke W, tiny sizes), TESTS (pytest paths) with
# TESTS_K (a pytest -k expression),
# AB_BASE (integration/ab_layer.py against a base checkout). Empty: the stage is skipped.
# DeepEP: carry its wheel in .whl-deepep/ (../shared/tools/deepep-wheel.sh .whl-deepep).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl-deepep/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-deepep/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' | tee "$OUT/env.txt"
ln -sfn ../backends flashfusemoe/backends; ln -sfn ../comm flashfusemoe/comm  # the install's package-dir mapping
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${BENCH:-}" ]; then
  timeout ${BENCH_TIMEOUT:-150} python3 -m integration.bench_ep --parts "$BENCH" ${BENCH_ARGS:-} --json "$OUT/bench_ep.json" \
    --write "$OUT/benchmarks_ep.md" 2>&1 | tee "$OUT/bench_ep.log" | tail -22
fi
if [ -n "${SMOKE:-}" ]; then
  for W in $SMOKE; do
    timeout ${SMOKE_TIMEOUT:-100} python3 -m integration.bench_ep --smoke "$W" --parts comm,layer \
      --comm-tokens 1024,4096 --comm-dims 2048 --comm-topk 8 --shapes seed --layer-tokens 2048 --rounds 1 \
      --iters 5 --json "$OUT/smoke$W.json" --write "$OUT/smoke$W.md" 2>&1 | tee "$OUT/smoke$W.log" | tail -16
  done
fi
if [ -n "${TESTS:-}" ]; then
  read -ra test_args <<< "$TESTS"
  [ -n "${TESTS_K:-}" ] && test_args+=(-k "$TESTS_K")
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider --durations=8 "${test_args[@]}" 2>&1 \
    | tee "$OUT/tests.log" | tail -25
fi
if [ -n "${AB_BASE:-}" ]; then
  timeout ${AB_TIMEOUT:-150} python3 integration/ab_layer.py --base "$AB_BASE" --json "$OUT/ab.json" 2>&1 \
    | tee "$OUT/ab.log" | tail -14
fi
