#!/usr/bin/env bash
# Issue 10's next measurements on one H200 (0.6b at 16K memory tokens, batch 32), one stage a
# device call (each well inside a call's 600 s):
#
#   STAGE=profile bash benchmarks/issue10_gpu.sh  # the recipe's step (cuBLAS), profiled: the
#                                                  # by-source-op table of where the time goes
#   STAGE=triton  bash benchmarks/issue10_gpu.sh  # the same step with XLA's Triton GEMMs (they
#                                                  # can fuse elementwise producers), cold then
#                                                  # warm autotune cache: compile time and MFU
#
# Logs and JSON go to $OUT/issue10_<stage>/ (OUT defaults to /tmp/out). DRY=1 prints the
# commands instead of running them.
set -u
STAGE=${STAGE:?set STAGE=profile or triton}
OUT=${OUT:-/tmp/out}
DIR="$OUT/issue10_$STAGE"
PY=${PYTHON:-python3}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONUNBUFFERED=1
mkdir -p "$DIR"

step() {   # step NAME SECONDS command...: runs the command under `timeout`, logging to NAME.log
  local name=$1 seconds=$2
  shift 2
  echo "== $name ($seconds s): $*" | tee -a "$DIR/steps.log"
  if [ -n "${DRY:-}" ]; then return 0; fi
  timeout "$seconds" "$@" 2>&1 | tee "$DIR/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$DIR/steps.log"
}

STEP=(-m benchmarks.train_step --variants 0.6b --memory 16384 --batches 32 --steps 3)
TRITON="--xla_gpu_enable_triton_gemm=true --xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc"

case "$STAGE" in
  profile)
    step profile 420 $PY "${STEP[@]}" --compilation_cache_dir /tmp/jcc --profile_dir /tmp/prof \
      --out "$DIR/train_step_0.6b_b32_profiled.json" ;;
  triton)
    step triton_cold 330 env XLA_FLAGS="$TRITON" $PY "${STEP[@]}" \
      --out "$DIR/train_step_0.6b_b32_triton_cold.json"
    step triton_warm 240 env XLA_FLAGS="$TRITON" $PY "${STEP[@]}" \
      --out "$DIR/train_step_0.6b_b32_triton_warm.json" ;;
  *)
    echo "STAGE=$STAGE: choose profile or triton" >&2
    exit 2 ;;
esac
