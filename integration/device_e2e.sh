#!/usr/bin/env bash
# One device call for the integration work, each stage under its own timeout; logs in $OUT/logs.tgz
# (a call brings back only a few files).
#   HF=1 (default): the HF GPU tests (and the CPU ones on this transformers) and bench_hf.
#   SEED_RUNS (default "triton:eager torch:eager triton:compile"): full_integration.py --preset seed-1b runs,
#     each "backend:eager|compile[:flag+flag...[:VAR=value+VAR=value...]]" (the last field: environment
#     variables of that run, e.g. inductor's TORCHINDUCTOR_*); PROFILE=1 adds --profile to the compiled
#     triton runs. SEED_FLAGS: flags of every run (the base row's too).
#   SEED_BASE: an older full_integration.py (e.g. in the carried .ab_base/) run compiled as an A/B row.
#   SONIC_WARM: shapes at which SonicMoE's kernels compile in the background from the start (minutes).
#   LAYER_PROFILE: shapes (space-separated) whose layer kernel profile (integration/profile_layer.py) is taken;
#     PROFILE_FLAGS: its extra flags (e.g. --timeline, --variant ours-triton-gemm).
#   EXTRA: any other command (its log: extra.log).
#   TESTS: extra pytest targets run first. E2E: flags of an integration/bench_e2e.py run. LAYER: flags of
#   an integration/bench_layer.py run, last (after the SonicMoE warm-up).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG=/tmp/logs; mkdir -p "$LOG"
trap 'tar -C "$LOG" -czf "$OUT/logs.tgz" .' EXIT
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())' | tee "$LOG/env.txt"
if [ -f .whl-sonic/libs_base.tar.xz ]; then  # SonicMoE for bench_hf (../shared/tools/sonicmoe-wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-sonic/*.whl
  tar -C /tmp/site -xJf .whl-sonic/libs_base.tar.xz
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages${PYTHONPATH:+:$PYTHONPATH}
  export QUACK_COMPILE_WORKERS=16
  # Its first call per shape autotunes for minutes (> 330 s at the fine shape on the H200): keep the
  # timings across calls. Comes back as $OUT/sonic-cache.tgz; unpack it into .sonic-cache/ and carry it.
  export QUACK_CACHE_DIR=/tmp/sonic-cache TRITON_CACHE_AUTOTUNING=1; mkdir -p "$QUACK_CACHE_DIR"
  [ -d .sonic-cache ] && cp -r .sonic-cache/. "$QUACK_CACHE_DIR"/
  trap 'tar -C "$LOG" -czf "$OUT/logs.tgz" .; tar -C "$QUACK_CACHE_DIR" -czf "$OUT/sonic-cache.tgz" .' EXIT
fi
ln -sfn ../backends flashfusemoe/backends; ln -sfn ../comm flashfusemoe/comm
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${SONIC_WARM:-}" ]; then  # compile SonicMoE's kernels at these shapes while the other stages run;
  # its autotune timings taken meanwhile (GPU shared) are dropped, the LAYER stage re-times them alone
  ( timeout ${SONIC_WARM_TIMEOUT:-500} python3 integration/bench_layer.py --warm --variants SonicMoE \
      --shapes "$SONIC_WARM" > "$LOG/sonic_warm.log" 2>&1
    find "$QUACK_CACHE_DIR" -name '*.autotune.json' -delete ) &
  WARM_PID=$!
fi
if [ -n "${TESTS:-}" ]; then
  timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$LOG/tests_extra.log" | tail -6
fi
if [ -n "${EXTRA:-}" ]; then  # any other command, e.g. a carried A/B script
  timeout ${EXTRA_TIMEOUT:-120} bash -c "$EXTRA" 2>&1 | tee "$LOG/extra.log" | grep -v -i warn | tail -${EXTRA_TAIL:-20}
fi
for shape in ${LAYER_PROFILE:-}; do  # our layer's per-kernel GPU times (integration/profile_layer.py)
  timeout 120 python3 -m integration.profile_layer --shape "$shape" --rows 30 ${PROFILE_FLAGS:-} 2>&1 | tee "$LOG/profile_layer_$shape.log" | tail -${PROFILE_TAIL:-8}
done
if [ "${HF:-1}" = 1 ]; then
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/integrations -k "gpu or bf16 or torch or refused or sentinels or import" 2>&1 | tee "$LOG/tests.log" | tail -6
  timeout ${HF_TIMEOUT:-120} python3 -m integration.bench_hf --json "$LOG/bench_hf.json" --write "$LOG/bench_hf.md" 2>&1 | tee "$LOG/bench_hf.log" | tail -8
fi
if [ -n "${E2E:-}" ]; then  # bench_e2e's table (backends x EP sizes this machine has), E2E = its flags
  timeout ${E2E_TIMEOUT:-240} python3 -m integration.bench_e2e $E2E --write "$LOG/e2e.md" --json "$LOG/e2e.json" \
    2>&1 | tee "$LOG/e2e.log" | tail -12
fi
seed() {  # name script flags... (environment: the array run_env)
  local name=$1 script=$2; shift 2
  timeout ${SEED_TIMEOUT:-110} env "${run_env[@]}" python3 "$script" --preset seed-1b --steps ${SEED_STEPS:-12} \
    --quiet --metrics "$LOG/seed_$name.json" ${SEED_FLAGS:-} "$@" 2>&1 | tee "$LOG/seed_$name.log" | tail -${SEED_TAIL:-3}
}
for run in ${SEED_RUNS-triton:eager torch:eager triton:compile}; do
  IFS=: read -r backend mode extra envs <<< "$run"
  IFS=+ read -ra extras <<< "$extra"
  IFS=+ read -ra run_env <<< "$envs"
  flags=(--backend "$backend" "${extras[@]}")
  name=${backend}_${mode}$(echo "$extra$envs" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' _)
  if [ "$mode" = compile ]; then
    flags+=(--compile); [ "${PROFILE:-0}" = 1 ] && [ "$backend" = triton ] && flags+=(--profile "$LOG/profile_$name.md")
  fi
  seed "$name" integration/full_integration.py "${flags[@]}"
done
run_env=()
[ -n "${SEED_BASE:-}" ] && seed base_compile "$SEED_BASE" --backend triton --compile
[ -n "${WARM_PID:-}" ] && { wait "$WARM_PID"; tail -5 "$LOG/sonic_warm.log"; }
if [ -n "${LAYER:-}" ]; then  # bench_layer (with the SonicMoE column where its wheel is carried), LAYER = flags
  timeout ${LAYER_TIMEOUT:-300} python3 integration/bench_layer.py $LAYER --json "$LOG/layer.json" \
    --write "$LOG/layer.md" 2>&1 | tee "$LOG/layer.log" | grep -v -i warn | tail -${LAYER_TAIL:-20}
fi
