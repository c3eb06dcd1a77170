"""Issue 14 (2): document-wise vs global RoPE, each evaluated from 1× to 6104× its
16K-token training memory (paper: < 9% relative degradation to 100M with document-wise).

``:smoke``: the CPU smoke recipe, 40 steps, both modes, evaluated at 1, 4, 16, 64 ×.
"""
from configs.sweeps._common import RECIPE, smoke_fixed


def get_sweep(arg: str = ""):
  modes = {"model.rope_mode": ["document", "global"]}
  if arg == "smoke":
    return {"name": "rope_mode_smoke", "config": f"{RECIPE}:smoke",
            "fixed": {**smoke_fixed(), "eval.memory_multipliers": (1, 4, 16, 64)}, "grid": modes}
  return {"name": "rope_mode", "config": f"{RECIPE}:tiny",
          "fixed": {"data.memory_tokens": 16_384,
                    "eval.memory_multipliers": (1, 16, 256, 1024, 6104)},
          "grid": modes, "resources": {"gpus_per_node": 1, "time": "06:00:00"}}
