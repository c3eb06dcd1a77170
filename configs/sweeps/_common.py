"""Shared by the sweep files: the recipe and the CPU-minutes settings of ``:smoke`` sweeps."""
RECIPE = "configs/16k_to_100m.py"


def smoke_fixed(num_steps: int = 40, evaluate: bool = True) -> dict:
  """Overrides that make the smoke recipe a short CPU run (minutes, 2 cores)."""
  fixed = {"num_steps": num_steps, "batch_size": 8, "log_every_steps": 10,
           "optim.warmup_phase_steps": num_steps // 4, "optim.lr_ramp_steps": num_steps // 8,
           "checkpoint.every_steps": num_steps, "tensorboard": False,
           "eval.at_end": evaluate}
  if evaluate:
    fixed.update({"eval.num_examples": 8, "eval.batch_size": 8})
  return fixed
