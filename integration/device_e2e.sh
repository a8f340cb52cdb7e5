#!/usr/bin/env bash
# One device call for the integration work, each stage under its own timeout, logs under $OUT:
# the HF GPU tests (and the CPU ones on this transformers), bench_hf, and full_integration.py seed-1b
# with the triton and torch backends (eager) and triton compiled.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())' | tee "$OUT/env.txt"
if [ -f .whl-sonic/libs_base.tar.xz ]; then  # SonicMoE for bench_hf (../shared/tools/sonicmoe-wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-sonic/*.whl
  tar -C /tmp/site -xJf .whl-sonic/libs_base.tar.xz
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages${PYTHONPATH:+:$PYTHONPATH}
  export QUACK_COMPILE_WORKERS=16
fi
ln -sfn ../backends flashfusemoe/backends; ln -sfn ../comm flashfusemoe/comm
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/integrations -k "gpu or torch or refused or sentinels or import" 2>&1 | tee "$OUT/tests.log" | tail -6
timeout ${HF_TIMEOUT:-120} python3 -m integration.bench_hf --json "$OUT/bench_hf.json" --write "$OUT/bench_hf.md" 2>&1 | tee "$OUT/bench_hf.log" | tail -8
# (integration/bench_e2e.py runs the same backends x EP sizes and writes the table)
for run in "triton eager" "torch eager" "triton compile"; do
  set -- $run
  flag=""; [ "$2" = compile ] && flag="--compile"
  timeout ${SEED_TIMEOUT:-110} python3 integration/full_integration.py --preset seed-1b --steps ${SEED_STEPS:-12} \
    --backend "$1" $flag --quiet --metrics "$OUT/seed_$1_$2.json" 2>&1 | tee "$OUT/seed_$1_$2.log" | tail -3
done
