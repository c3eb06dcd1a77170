r"""Trains an MSA model.

  python -m msa_jax.train --config=configs/16k_to_100m.py:smoke --workdir=/tmp/msa_smoke

Without ``--config`` the CPU smoke variant runs. The config is saved in the
workdir; a second run with the same workdir resumes from its last checkpoint.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(os.path.dirname(_HERE), "configs", "16k_to_100m.py") + ":smoke"

_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training recipe.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/msa_smoke", "Where checkpoints, metrics.jsonl, "
                               "TensorBoard events and eval.json go.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:   # keep orbax's per-save INFO lines off the console
    logging.set_verbosity(logging.WARNING)
  from msa_jax.trainer import train_and_evaluate
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
