"""Issue 14 (4): training cost against memory length (MSA), 4K to 128K tokens: step time
from ``tokens_per_sec`` / ``tokens_per_step`` in each run's metrics (results.csv).

Peak memory and the full-attention baseline over the same tokens are measured by
``python -m benchmarks.memory_cost`` (one example per length, the real training step
of each; WORKSPACE.md "Issue 14 on one H200"), not by this sweep. ``:smoke``: 8 and 32 documents, 20 steps on
CPU, no evaluation.
"""
from configs.sweeps._common import RECIPE, smoke_fixed


def get_sweep(arg: str = ""):
  if arg == "smoke":
    return {"name": "memory_cost_smoke", "config": f"{RECIPE}:smoke",
            "fixed": smoke_fixed(num_steps=20, evaluate=False),
            "grid": {"data.num_docs": [8, 32]}}
  return {"name": "memory_cost", "config": f"{RECIPE}:tiny",
          # One stage at the grid's memory: without these the recipe's curricula (1-fact
          # documents, then a reader stage of 8-document memories at batch 256) would be
          # what the 60 timed steps run.
          "fixed": {"num_steps": 60, "log_every_steps": 20, "eval.at_end": False,
                    "checkpoint.every_steps": 1_000_000, "data.memory_curriculum": (),
                    "data.batch_curriculum": (), "data.facts_curriculum": (),
                    # the recipe's 150 warm-up and 1,000 anneal steps exceed 60 steps
                    "optim.warmup_phase_steps": 10, "optim.decay_steps": 0},
          "grid": {"data.memory_tokens": [4_096, 8_192, 16_384, 32_768, 65_536, 131_072]},
          "resources": {"gpus_per_node": 1, "time": "01:00:00"}}
