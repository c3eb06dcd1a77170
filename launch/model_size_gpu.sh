# Issue 14 item 5 on one H200: the model_size sweep (configs/sweeps/model_size.py[:ARG]),
# collected, fitted and plotted; its run folders (no checkpoints) packed into
# $OUT/model_size.tgz. Run from the repo root:
#   OUT=DIR bash launch/model_size_gpu.sh                   # 6 widths, seed 0 (~3 min)
#   OUT=DIR ARG=seeds PARALLEL=12 MEM=0.06 bash launch/model_size_gpu.sh   # seeds 1, 2
# SWEEP_S bounds the training; runs still going then get SIGTERM, save, and are left out
# of results.jsonl as unfinished.
R=/tmp/runs; S=configs/sweeps/model_size.py${ARG:+:$ARG}; D=${OUT:-/tmp/out}
NAME=model_size${ARG:+_$ARG}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM:-0.12}
date -u; nproc
timeout -s TERM ${SWEEP_S:-440} python3 -m launch.sweep --sweep=$S --runner=local \
  --parallel=${PARALLEL:-6} --root=$R 2>&1 | tail -40
pkill -TERM -f msa_jax.train && sleep 20
date -u
python3 -m launch.sweep --sweep=$S --collect --root=$R 2>&1 | tail -12
for y in lm_loss loss lm_loss_answer lm_loss_retrieval; do
  python3 -m launch.fit --results=$R/$NAME/results.jsonl --x=compute --y=$y 2>&1 | tail -2
done
python3 -m launch.plot_variants --out=$R/$NAME $R/$NAME/model.* 2>&1 | tail -8
# One file back: the device returns a limited number of files per call.
tar czf $D/$NAME.tgz -C $R --exclude='checkpoints' --exclude='ckpt*' $NAME
date -u
