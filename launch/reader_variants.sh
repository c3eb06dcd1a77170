#!/usr/bin/env bash
# Train several variants of the `tiny` recipe side by side on ONE GPU (each a few hundred MB
# of memory), each for at most RUN_S seconds, and keep their metrics: the question "which
# setting makes the reader leave chance soonest" in one call. Each variant is
# NAME=overrides, variants separated by ';'. Outputs in $OUT/<NAME>/: metrics.jsonl,
# config.json, train.log (stdout, progress lines with the answer / id LM losses), and all of
# them in $OUT/variants.tgz.
#
#   OUT=/tmp/rv RUN_S=420 VARIANTS='base=;lr5e-3=--config.optim.main_phase_lr=5e-3' \
#     bash launch/reader_variants.sh
# Common overrides (COMMON) make every variant the reader stage alone by default: 8-document
# memories (320 tokens) at batch 256, no evaluation, no mid-run checkpoints.
# POSITIONS=N (default 0: off): after training, each variant's last checkpoint (the trainer
# saves one when the time limit's SIGTERM stops it) answers N held-out examples and
# launch.answer_positions writes the NLL of each answer target position and of each id
# target position (the retrieval round) to $OUT/<NAME>/answer_positions.json (and prints
# both tables).
# EVAL=1 (default 0: off): after training, msa_jax.evaluate asks each variant's last
# checkpoint its config's eval questions (answer exact match and router recall through the
# engine; set e.g. --config.eval.memory_multipliers=(1,) in COMMON) -> $OUT/<NAME>/eval.json.
# The variants' post-training steps run side by side.
# PACK_BEST=1 (with EVAL=1; default 0): for each RoPE mode among the variants, the one whose
# eval.json has the highest answer exact match is packed as $PACK_DIR/train_<mode>.tgz.part-*
# (e.g. a variant with --config.model.rope_mode=global -> train_global; PACK_DIR defaults to $OUT;
# 15 MiB parts a device call returns), ready for reproduce_reading.sh STAGE=eval or
# RESUME_FROM (session 13: the seed that read, evaluated on shared banks).
# POST_S=N (default 0: no limit): each post-training command (answer_positions, evaluate)
# is stopped after N seconds, so a device call's limit is not spent waiting on it.
# A SIGTERM (e.g. an outer `timeout`) still writes $OUT/variants.tgz of what exists.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/reader_variants}
ROOT=${ROOT:-/tmp/reader_variants}
PYTHON=${PYTHON:-python}
RUN_S=${RUN_S:-420}
MEM_FRACTION=${MEM_FRACTION:-0.15}
POSITIONS=${POSITIONS:-0}
EVAL=${EVAL:-0}
PACK_BEST=${PACK_BEST:-0}
PACK_DIR=${PACK_DIR:-$OUT}
POST_S=${POST_S:-0}
COMMON=${COMMON-"--config.num_steps=1000 --config.optim.decay_steps=0 --config.eval.at_end=False --config.checkpoint.every_steps=100000 --config.data.memory_curriculum=() --config.data.memory_tokens=320 --config.data.batch_curriculum=() --config.batch_size=256 --config.log_every_steps=25"}
VARIANTS=${VARIANTS:?set VARIANTS='name=overrides;name=overrides'}
mkdir -p "$OUT" "$ROOT"
echo "reader_variants.sh: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) RUN_S=$RUN_S"
IFS=';' read -ra SPECS <<< "$VARIANTS"
all_names=(); for spec in "${SPECS[@]}"; do all_names+=("${spec%%=*}"); done
archive() {   # one archive as well (with each run's metrics): a device call returns few files
  for name in "${all_names[@]}"; do
    cp "$ROOT/$name/metrics.jsonl" "$ROOT/$name/config.json" "$OUT/$name/" 2>/dev/null
  done
  (cd "$OUT" && tar -czf variants.tgz --ignore-failed-read "${all_names[@]}" 2>/dev/null)
}
trap 'echo "reader_variants.sh: SIGTERM, archiving what exists" >&2; archive; exit 143' TERM
limited() {   # a post-training command, stopped after POST_S seconds when set
  if [ "$POST_S" -gt 0 ]; then timeout --signal=TERM --kill-after=5 "$POST_S" "$@"; else "$@"; fi
}
pids=()
for spec in "${SPECS[@]}"; do
  name=${spec%%=*}; args=${spec#*=}
  mkdir -p "$OUT/$name"; rm -rf "${ROOT:?}/$name"
  echo "$name: $COMMON $args" | tee "$OUT/$name/args.txt"
  # shellcheck disable=SC2086
  XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION timeout --signal=TERM --kill-after=10 "$RUN_S" \
    "$PYTHON" -m msa_jax.train --config=configs/16k_to_100m.py:tiny --workdir="$ROOT/$name" \
    $COMMON $args > "$OUT/$name/train.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
post_pids=()
for name in "${all_names[@]}"; do
  (
    if [ "$POSITIONS" -gt 0 ]; then
      # The memory the variant trained with (its last data.memory_tokens override), if any.
      mem=$(grep -o 'data.memory_tokens=[0-9]*' "$OUT/$name/args.txt" | tail -1 | cut -d= -f2)
      XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION limited "$PYTHON" -m launch.answer_positions \
        --workdir="$ROOT/$name" --num_examples="$POSITIONS" ${mem:+--memory_tokens=$mem} \
        --out="$OUT/$name/answer_positions.json" > "$OUT/$name/positions.log" 2>&1
    fi
    if [ "$EVAL" -gt 0 ]; then
      XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION limited "$PYTHON" -m msa_jax.evaluate \
        --workdir="$ROOT/$name" > "$OUT/$name/eval.log" 2>&1
      cp "$ROOT/$name/eval.json" "$OUT/$name/" 2>/dev/null
    fi
  ) &
  post_pids+=($!)
done
for p in "${post_pids[@]}"; do wait "$p"; done
for name in "${all_names[@]}"; do
  grep -h "^|\|targets of\|Error" "$OUT/$name/positions.log" 2>/dev/null | sed "s/^/$name: /"
  grep -h "EM\|exact\|Error" "$OUT/$name/eval.log" 2>/dev/null | grep -v "Warning\|warn(" | tail -6 | sed "s/^/$name: /"
  grep -v "Warning\|warn(" "$OUT/$name/train.log" | grep "^step" | tail -4 | sed "s/^/$name: /"
done
archive
if [ "$PACK_BEST" -gt 0 ]; then
  # One pack per RoPE mode among the variants (model.rope_mode of each config.json): the
  # variant of that mode whose eval.json has the highest answer exact match.
  best=$("$PYTHON" -c 'import glob, json, os, sys
best = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*", "eval.json"))):
  run_dir = os.path.dirname(f)
  with open(os.path.join(run_dir, "config.json")) as cf:
    mode = json.load(cf)["model"].get("rope_mode", "document")
  with open(f) as ef:
    em = json.load(ef)["rows"][0]["answer_exact_match"]
  best[mode] = max(best.get(mode, (-1.0, "")), (em, os.path.basename(run_dir)))
print(" ".join(f"{mode}={name}" for mode, (_, name) in sorted(best.items())))' "$OUT")
  if [ -z "$best" ]; then
    echo "PACK_BEST: no variant has an eval.json (set EVAL=1)" >&2; exit 1
  fi
  mkdir -p "$PACK_DIR"
  for pair in $best; do
    mode=${pair%%=*}; name=${pair#*=}
    echo "PACK_BEST: $name -> $PACK_DIR/train_$mode.tgz.part-*"
    rm -f "$PACK_DIR/train_$mode.tgz.part-"*
    tar -czf - -C "$ROOT" --transform "s,^$name,train_$mode," "$name" \
      | split -b 15m - "$PACK_DIR/train_$mode.tgz.part-"
  done
fi
