"""Issue 14 (5): ≥ 4 model sizes on the same data and token budget; loss against compute.

Fit: ``python -m launch.fit --results=runs/model_size/results.jsonl --x=compute --y=lm_loss``.
Full: the ``tiny`` recipe's reader stage (8-document memories, 320 memory tokens, batch
128, its facts curriculum: 1, 2 then 4 facts a document from steps 0, 500, 1,500; no
evaluation) for 2,000 steps at six widths, 64 to 512, all with the recipe's 2 layers
(router layer 1), heads of 32 and as many KV heads: from scratch a router deeper than one
attention layer did not learn the 6-fact task (WORKSPACE.md, depth-cal1-4), and the
routing loss covers only upper-half router layers, so depth would change what is learnt,
not only the size. Same seed, so the same batches, for every width. Every point fits one
GPU beside the others (a few hundred MB each): ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
python -m launch.sweep --sweep=configs/sweeps/model_size.py --runner=local --parallel=6``
on one H200 (16 cores: 3 example workers a run). Logged every 20 steps, so the fit's
default y (``--y_from=tail``: the mean over the last 10 % of steps) averages 10 rows.
``:seeds``: the same widths with seeds 1 and 2 (12 runs). ``:smoke``: widths 32-128
(1-2 layers), 40 CPU steps each, no evaluation: the example sweep of WORKSPACE.md.
"""
from configs.sweeps._common import RECIPE, smoke_fixed


def _shape(width: int, layers: int) -> dict:
  return {"model.hidden_size": width, "model.intermediate_size": 4 * width,
          "model.num_layers": layers}   # router layers: the upper half (the default)


def _reader_shape(width: int) -> dict:
  """The tiny recipe's 2 layers (router layer 1) at ``width``, heads of 32, one KV head a
  head as the recipe (no GQA: the answers' lookup needs it, WORKSPACE.md)."""
  return {"model.hidden_size": width, "model.intermediate_size": 4 * width,
          "model.num_heads": width // 32, "model.num_kv_heads": width // 32}


def get_sweep(arg: str = ""):
  if arg == "smoke":
    return {"name": "model_size_smoke", "config": f"{RECIPE}:smoke",
            "fixed": smoke_fixed(num_steps=40, evaluate=False),
            "points": [_shape(32, 1), _shape(64, 1), _shape(96, 2), _shape(128, 2)]}
  reader_stage = {"num_steps": 2_000, "batch_size": 128, "data.memory_tokens": 320,
                  "data.memory_curriculum": (), "data.batch_curriculum": (),
                  "eval.at_end": False, "checkpoint.every_steps": 1_000,
                  "log_every_steps": 20, "tensorboard": False, "data.worker_count": 3}
  widths = (64, 128, 192, 256, 384, 512)
  if arg == "seeds":
    # The same six widths with seeds 1 and 2 (the plain sweep is seed 0): how much of the
    # loss against size is the seed's. 12 runs side by side on one H200: --parallel=12,
    # XLA_PYTHON_CLIENT_MEM_FRACTION=0.06, 1 example worker a run.
    return {"name": "model_size_seeds", "config": f"{RECIPE}:tiny",
            "fixed": {**reader_stage, "data.worker_count": 1},
            "points": [{**_reader_shape(w), "seed": seed} for seed in (1, 2) for w in widths],
            "resources": {"gpus_per_node": 1, "time": "01:00:00"}}
  if arg:
    raise ValueError(f"model_size.py:{arg}: the argument is '', 'smoke' or 'seeds'")
  return {"name": "model_size", "config": f"{RECIPE}:tiny", "fixed": reader_stage,
          "points": [_reader_shape(w) for w in widths],
          "resources": {"gpus_per_node": 1, "time": "01:00:00"}}
