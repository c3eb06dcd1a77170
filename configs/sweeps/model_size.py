"""Issue 14 (5): ≥ 4 model sizes on the same data and token budget; loss against compute.

Fit: ``python -m launch.fit --results=runs/model_size/results.jsonl --x=compute --y=loss``.
Full: ``tiny``-family shapes from width 64 to 512 on one H200 each (the largest two get
two GPUs: per-point resources). ``:smoke``: widths 32-128 (1-2 layers), 40 CPU steps each,
no evaluation: the example sweep of WORKSPACE.md.
"""
from configs.sweeps._common import RECIPE, smoke_fixed


def _shape(width: int, layers: int) -> dict:
  return {"model.hidden_size": width, "model.intermediate_size": 4 * width,
          "model.num_layers": layers}   # router layers: the upper half (the default)


def get_sweep(arg: str = ""):
  if arg == "smoke":
    return {"name": "model_size_smoke", "config": f"{RECIPE}:smoke",
            "fixed": smoke_fixed(num_steps=40, evaluate=False),
            "points": [_shape(32, 1), _shape(64, 1), _shape(96, 2), _shape(128, 2)]}
  big = {"gpus_per_node": 2}
  return {"name": "model_size", "config": f"{RECIPE}:tiny",
          "fixed": {"num_steps": 2_000},
          "points": [_shape(64, 2), _shape(128, 4), _shape(192, 4),
                     {"overrides": _shape(256, 6), "resources": big},
                     {"overrides": _shape(512, 8), "resources": big}],
          "resources": {"gpus_per_node": 1, "time": "04:00:00"}}
