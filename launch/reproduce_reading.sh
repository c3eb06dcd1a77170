#!/usr/bin/env bash
# Issue 14, items 2 and 4, on one H200 (every step under a hard `timeout`, results written
# after each measured size so a stop loses nothing measured):
#   1. launch.reproduce_reading: train the `tiny` reading recipe (16K-token memories,
#      document-wise RoPE) for at most TRAIN_S seconds, then encode and query shared banks
#      of 1x, 16x, 256x, 1024x, 6104x the training memory through the engine until
#      READING_S runs out (a size predicted not to fit is skipped, its reason recorded);
#   2. benchmarks.memory_cost: MSA vs full-attention training step against memory length
#      for MEMORY_COST_S seconds (0: not run).
# Outputs in $OUT: reading.json, reading.png, router_health_<mode>.png, reading.log,
# memory_cost.json, memory_cost.png, memory_cost.log.
#
# The recipe trains ~5 minutes (6,000 steps), and the five sizes take ~6 minutes to
# evaluate, so training and evaluation take two device calls (each at most 10 minutes):
#   STAGE=train bash launch/reproduce_reading.sh
#       trains (TRAIN_S, default 480 s) and packs the run into
#       $TRAINED/train_<mode>.tgz.part-aa, -ab, ... (15 MiB parts; TRAINED defaults to $OUT,
#       so the device call returns them; copy them to runs/reading_trained/ here, a
#       git-ignored folder);
#   STAGE=eval TRAINED=runs/reading_trained bash launch/reproduce_reading.sh
#       (a device call with carry ["runs/reading_trained"]) unpacks it and evaluates the banks.
#   STAGE=both (default) does both in one call: only with a shortened recipe (TRAIN_ARGS),
#   or to finish a run: RESUME_FROM below.
#   RESUME_FROM=runs/reading_trained (STAGE=train or both; carry it): unpacks that folder's
#   train_<mode>.tgz.part-* and the trainer resumes the run from its last checkpoint (data
#   position included) for TRAIN_S more seconds. A 600 s device call holds ~480 s of training
#   with margin for start-up and packing: enough for the recipe (~330 s), not for a longer
#   schedule (TRAIN_ARGS="--config.num_steps=..."), which RESUME_FROM finishes.
#   ROPE=global: the RoPE ablation (another pair of calls).
#   MULTIPLIERS (default 1,16,256,1024,6104; empty: none): the bank sizes STAGE=eval/both ask.
#   EVALUATE=1 (STAGE=eval; default 0): then `python -m msa_jax.evaluate` on the run (its
#   config's eval: per-question memories at eval.memory_multipliers, and the Memory
#   Interleave ablations when trained with --config.eval.interleave_ablations=True) for at
#   most EVALUATE_S=240 s -> $OUT/evaluate_<mode>/eval.{json,png}. For issue 14 item 3:
#   TRAIN_ARGS="--config.data.task=multihop --config.eval.interleave_ablations=True
#   --config.eval.memory_multipliers=(1,16)" at STAGE=train, MULTIPLIERS= EVALUATE=1 at eval.
#   QUANT_DOCS=N (STAGE=eval; default 0: off): then benchmarks.quant_accuracy on the same
#   run, a bank of N documents in every K̄R/K̄V̄ precision (issue 11's accuracy question;
#   25000 is 1M tokens), for at most QUANT_S=150 s -> $OUT/quant_<mode>/quant_accuracy.{json,png}.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/reading}
ROOT=${ROOT:-/tmp/reading}
PYTHON=${PYTHON:-python}
ROPE=${ROPE:-document}
STAGE=${STAGE:-both}
TRAINED=${TRAINED:-$OUT}
MEMORY_COST_S=${MEMORY_COST_S:-0}
# TRAIN_ARGS: extra trainer flags, e.g. a shortened recipe for STAGE=both; session 12's
# one-call run (answers 0.56 nats at step 3,900: too short, its lr annealed too early):
# "--config.data.memory_tokens=4096 --config.data.memory_curriculum=((0,320),(4000,None))
#  --config.data.batch_curriculum=((0,128),(4000,None)) --config.num_steps=4300"
TRAIN_ARGS=${TRAIN_ARGS-"--config.checkpoint.every_steps=500"}
NUM_QUESTIONS=${NUM_QUESTIONS:-64}
BASE_TOKENS=${BASE_TOKENS:-16384}   # bank sizes are multiples of this (16K: 1x .. 6104x = 100M)
MULTIPLIERS=${MULTIPLIERS-1,16,256,1024,6104}
EVALUATE=${EVALUATE:-0}
EVALUATE_S=${EVALUATE_S:-240}
QUANT_DOCS=${QUANT_DOCS:-0}
QUANT_S=${QUANT_S:-150}
RESUME_FROM=${RESUME_FROM:-}
case "$STAGE" in
  train) TRAIN_S=${TRAIN_S:-480}; READING_S=${READING_S:-$((TRAIN_S + 45))}; FLAGS=--train_only ;;
  eval) TRAIN_S=${TRAIN_S:-0}; READING_S=${READING_S:-540}; FLAGS=--reuse_training ;;
  both) TRAIN_S=${TRAIN_S:-300}; READING_S=${READING_S:-540}; FLAGS= ;;
  *) echo "STAGE must be train, eval or both, got '$STAGE'" >&2; exit 2 ;;
esac
mkdir -p "$OUT" "$ROOT"
echo "reproduce_reading.sh: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)" \
  "STAGE=$STAGE READING_S=$READING_S TRAIN_S=$TRAIN_S MEMORY_COST_S=$MEMORY_COST_S ROPE=$ROPE" \
  "BASE_TOKENS=$BASE_TOKENS TRAIN_ARGS=$TRAIN_ARGS"
# unpack DIR: each mode's packed run in DIR (train_<mode>.tgz.part-*) -> $ROOT/train_<mode>.
unpack() {
  for mode in ${ROPE//,/ }; do
    parts=("$1/train_$mode.tgz.part-"*)
    [ -f "${parts[0]}" ] || { echo "$1/train_$mode.tgz.part-* not found: run STAGE=train" \
      "first and carry $1" >&2; exit 2; }
    rm -rf "${ROOT:?}/train_$mode" && cat "${parts[@]}" | tar -xzf - -C "$ROOT" || exit 2
    echo "unpacked $1/train_$mode.tgz.part-* into $ROOT/train_$mode"
  done
}
if [ "$STAGE" = eval ]; then
  [ -z "$RESUME_FROM" ] || { echo "RESUME_FROM is for STAGE=train or both (eval reads" \
    "TRAINED)" >&2; exit 2; }
  unpack "$TRAINED"
elif [ -n "$RESUME_FROM" ]; then
  unpack "$RESUME_FROM"
fi

# shellcheck disable=SC2086
timeout --signal=TERM --kill-after=15 "$READING_S" "$PYTHON" -m launch.reproduce_reading \
  --out="$OUT" --root="$ROOT" --rope="$ROPE" --budget_s=$((READING_S - 20)) $FLAGS \
  --train_s="$TRAIN_S" --base_tokens="$BASE_TOKENS" --num_questions="$NUM_QUESTIONS" \
  --multipliers="$MULTIPLIERS" \
  --train_args="$TRAIN_ARGS" 2>&1 | tee "$OUT/reading.log" | grep -v "Warning\|warn(" | awk '!/^step/ || NR % 50 == 0'
echo "reproduce_reading: exit ${PIPESTATUS[0]}"

if [ "$STAGE" = eval ]; then
  for mode in ${ROPE//,/ }; do
    run="$ROOT/train_$mode"
    if [ "$EVALUATE" -gt 0 ]; then
      mkdir -p "$OUT/evaluate_$mode"
      timeout --signal=TERM --kill-after=10 "$EVALUATE_S" "$PYTHON" -m msa_jax.evaluate \
        --workdir="$run" 2>&1 | tee "$OUT/evaluate_$mode/eval.log" | grep -v "Warning\|warn("
      echo "evaluate ($mode): exit ${PIPESTATUS[0]}"
      cp "$run/eval.json" "$run/eval.png" "$OUT/evaluate_$mode/" 2>/dev/null
    fi
    if [ "$QUANT_DOCS" -gt 0 ]; then
      timeout --signal=TERM --kill-after=10 "$QUANT_S" "$PYTHON" -m benchmarks.quant_accuracy \
        --workdir="$run" --num_docs="$QUANT_DOCS" --num_questions="$NUM_QUESTIONS" \
        --data="$ROOT/quant_$mode" --out="$OUT/quant_$mode" 2>&1 \
        | tee "$OUT/quant_accuracy_$mode.log" | grep -v "Warning\|warn("
      echo "quant_accuracy ($mode): exit ${PIPESTATUS[0]}"
    fi
  done
fi

if [ "$MEMORY_COST_S" -gt 0 ]; then
  timeout --signal=TERM --kill-after=10 "$MEMORY_COST_S" "$PYTHON" -m benchmarks.memory_cost \
    --out="$OUT" --budget_s=$((MEMORY_COST_S - 15)) --steps=3 2>&1 | tee "$OUT/memory_cost.log" \
    | grep -v "Warning\|with mesh"
  echo "memory_cost: exit ${PIPESTATUS[0]}"
fi
if [ "$STAGE" = train ]; then
  mkdir -p "$TRAINED"
  for mode in ${ROPE//,/ }; do
    [ -d "$ROOT/train_$mode/checkpoints" ] || { echo "train_$mode: no checkpoint to pack" >&2; exit 1; }
    # In parts of 15 MiB: a device call returns files of at most 16 MiB (the tiny run with
    # its Adam moments is ~29 MiB).
    rm -f "$TRAINED/train_$mode.tgz.part-"*
    tar -czf - -C "$ROOT" "train_$mode" | split -b 15m - "$TRAINED/train_$mode.tgz.part-"
    ls -la "$TRAINED/train_$mode.tgz.part-"*
  done
fi
rm -f "$OUT"/*.partial
ls -la "$OUT"
