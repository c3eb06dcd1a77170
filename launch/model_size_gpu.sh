# Issue 14 item 5 on one H200: the model_size sweep (configs/sweeps/model_size.py), collected,
# fitted and plotted into $OUT/model_size. Run from the repo root: OUT=DIR bash launch/model_size_gpu.sh
# (SWEEP_S bounds the training; runs still going then get SIGTERM, save, and are left out
# of results.jsonl as unfinished).
R=/tmp/runs; S=configs/sweeps/model_size.py; D=${OUT:-/tmp/out}; mkdir -p $D/model_size
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
date -u; nproc
timeout -s TERM ${SWEEP_S:-440} python3 -m launch.sweep --sweep=$S --runner=local --parallel=6 --root=$R 2>&1 | tail -40
pkill -TERM -f msa_jax.train && sleep 20
date -u
python3 -m launch.sweep --sweep=$S --collect --root=$R 2>&1 | tail -12
for w in $R/model_size/*/; do n=$(basename "$w" | sed 's/model.hidden_size=\([0-9]*\).*/w\1/'); mkdir -p $D/model_size/$n; cp $w/metrics.jsonl $w/config.json $D/model_size/$n/ 2>/dev/null; tail -5 $w/train.log > $D/model_size/$n/train_tail.log 2>/dev/null; done
cp $R/model_size/results.{jsonl,csv} $R/model_size/summary.png $D/model_size/ 2>/dev/null
for y in lm_loss loss lm_loss_answer lm_loss_retrieval; do python3 -m launch.fit --results=$R/model_size/results.jsonl --x=compute --y=$y --out=$D/model_size/fit_${y}_vs_compute 2>&1 | tail -2; done
python3 -m launch.plot_variants --out=$D/model_size $D/model_size/w* 2>&1 | tail -3
date -u
