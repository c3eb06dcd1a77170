"""Issue 14 (3): Memory Interleave on and off on multi-hop questions (paper: −19% on
HotpotQA without it). Exact match of each run is in its ``eval.json``.

``:smoke``: the CPU smoke recipe on the 2-hop task, 40 steps, both settings.
"""
from configs.sweeps._common import RECIPE, smoke_fixed


def get_sweep(arg: str = ""):
  grid = {"data.interleave": [True, False]}
  if arg == "smoke":
    return {"name": "interleave_smoke", "config": f"{RECIPE}:smoke",
            "fixed": {**smoke_fixed(), "data.task": "multihop", "eval.memory_multipliers": (1,)},
            "grid": grid}
  return {"name": "interleave", "config": f"{RECIPE}:tiny",
          "fixed": {"data.task": "multihop", "eval.memory_multipliers": (1, 16)},
          "grid": grid, "resources": {"gpus_per_node": 1, "time": "04:00:00"}}
