# Sourced by benchmarks/issue*_gpu.sh after they set ISSUE and STAGE: the stage's log folder
# ($OUT/<ISSUE>_<STAGE>/, OUT defaults to /tmp/out), the environment every GPU benchmark
# runs with, and `step`, which runs one command under its own `timeout` (inside a device
# call's limit, so a stuck step still leaves the others' logs). DRY=1 prints the commands.
OUT=${OUT:-/tmp/out}
DIR="$OUT/${ISSUE}_$STAGE"
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
