r"""Trains an MSA model.

  python -m msa_jax.train --config=configs/16k_to_100m.py:smoke --workdir=/tmp/msa_smoke

Without ``--config`` the CPU smoke variant runs. The config is saved in the
workdir; a second run with the same workdir resumes from its last checkpoint
(refused if its config differs in more than the fields that may change, unless
``--allow_config_change``). A failure ends with its cause as the last lines.

Multi-host: start the same command on every host (or every GPU); under SLURM,
Open MPI or on a Cloud TPU slice the processes find each other by themselves,
elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` (see ``msa_jax.distributed``).
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
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume even though the config differs from the run's saved "
    "one in fields that change what the saved steps mean (e.g. a learning rate after a NaN "
    "stop); the new config is recorded as config.<step>.json, config.json is kept.")
_RESTORE_FALLBACK = flags.DEFINE_bool(
    "restore_fallback", False, "When the newest checkpoint cannot be read, move it to "
    "checkpoints.set_aside/ and resume from the previous complete one.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "On a known error (bad config or data, a "
                               "refused resume, a NaN stop), print the Python traceback too.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of "
                                   "process 0 (default: from the cluster environment).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: jax.distributed.initialize when the flags above or the "
                                 "environment (SLURM, Open MPI, TPU slice) name > 1 process.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:   # keep orbax's per-save INFO lines off the console
    logging.set_verbosity(logging.WARNING)
  from msa_jax import distributed
  from msa_jax.trainer import apply_xla_flags
  apply_xla_flags(_CONFIG.value.get("xla_flags", ""))   # before any backend starts
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         mode=_DISTRIBUTED.value)
  from msa_jax.cli import exit_with_error
  from msa_jax.trainer import train_and_evaluate
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                       allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                       restore_fallback=_RESTORE_FALLBACK.value)
  except Exception as e:  # noqa: BLE001 - every failure ends with its cause, then exit 1
    exit_with_error(e, "msa_jax.train", _TRACEBACK.value)


if __name__ == "__main__":
  app.run(main)
