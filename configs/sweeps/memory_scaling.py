"""Issue 14 (2): train on 16K-token memories, evaluate at 1× → 6104× (100M tokens).

Full (one H200 per point): the ``tiny`` recipe at two training memory sizes, evaluated
at 1, 16, 256, 1024 and 6104 × the training memory. ``:smoke``: the CPU smoke recipe
at two memory sizes (16 and 32 documents), 40 steps, evaluated at 1, 4, 16 and 64 ×.
Fit: ``python -m launch.fit --results=runs/memory_scaling/results.jsonl
--x=memory_tokens --y=answer_exact_match --group_by=data.memory_tokens``.
"""
from configs.sweeps._common import RECIPE, smoke_fixed


def get_sweep(arg: str = ""):
  if arg == "smoke":
    return {"name": "memory_scaling_smoke", "config": f"{RECIPE}:smoke",
            "fixed": {**smoke_fixed(), "eval.memory_multipliers": (1, 4, 16, 64)},
            "grid": {"data.num_docs": [16, 32]}}
  return {
      "name": "memory_scaling", "config": f"{RECIPE}:tiny",
      "fixed": {"eval.memory_multipliers": (1, 16, 256, 1024, 6104)},
      "grid": {"data.memory_tokens": [4_096, 16_384]},
      "resources": {"gpus_per_node": 1, "time": "06:00:00"},
  }
