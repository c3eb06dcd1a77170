"""Shared by tests/test_train_*.py: the recipe loader, a small fast training config and
the training setups (compiled steps) shared by the training runs of one test module."""
import copy
import functools
import json
import os

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, "configs", "16k_to_100m.py")
NUM_STEPS, WARMUP = 12, 4


def get_config(variant: str):
  """``configs/16k_to_100m.py:<variant>`` as the CLI loads it."""
  from msa_jax.run_config import load_config_file
  return load_config_file(f"{CONFIG_FILE}:{variant}")


def small_reading_model(vocab_size: int, batch):
  """``(model, params)``: a 2-layer model (router layer 1, width 32) initialised on
  ``batch``, for checks of the training losses on a few reading-task samples."""
  from msa_jax.config import ModelConfig
  from msa_jax.model import MSAModel
  model = MSAModel(ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                               num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                               pooling_chunk_size=8, top_k=1, router_layers=(1,)))
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]


def small_cfg():
  """The smoke recipe cut to 1 layer (a router layer) and 12 steps, logging every step.

  The warm-up phase ends after step 4 and the lr ramp after step 2, so a run
  shows both phases. ``checkpoint.every_steps`` is larger than the run: only the
  final (and a SIGTERM) save happen unless a test lowers it. The training tests use
  this exact config, so within a module the compiled step is shared through
  ``shared_train_setups``.
  """
  cfg = get_config("smoke")
  cfg.model.num_layers = 1
  cfg.model.router_layers = (0,)
  cfg.batch_size = 8
  cfg.num_steps = NUM_STEPS
  cfg.log_every_steps = 1
  cfg.tensorboard = False
  cfg.eval.at_end = False
  cfg.optim.warmup_phase_steps = WARMUP
  cfg.optim.warmup_lm_weight = 0.1   # the paper's warm-up weights (the smoke recipe uses 0)
  cfg.optim.lr_ramp_steps = 2
  cfg.checkpoint.every_steps = 1000
  return cfg


# Config fields the run loop reads and ``TrainSetup`` (its init and step programs) never
# does: runs differing only in these share one compiled step. (``seed`` reaches the init
# program as an argument, ``optim.max_update_ratio`` only the loop's save guard.)
NOT_IN_THE_STEP = ("seed", "log_every_steps", "tensorboard", "checkpoint", "eval",
                   "data.worker_count", "optim.max_update_ratio")


def _step_config_json(cfg) -> str:
  """``cfg`` as JSON less the fields :data:`NOT_IN_THE_STEP` (where present)."""
  step_cfg = copy.deepcopy(cfg)
  for path in NOT_IN_THE_STEP:
    *parents, leaf = path.split(".")
    node = functools.reduce(lambda n, name: n.get(name) if n is not None else None,
                            parents, step_cfg)
    if node is not None and leaf in node:
      del node[leaf]
  return step_cfg.to_json_best_effort(sort_keys=True)


@pytest.fixture(scope="module")
def shared_train_setups():
  """``train_and_evaluate`` in the module reuses the ``TrainSetup`` (and so the jitted,
  already compiled step) of any earlier run of the module with an equal config and mesh,
  so a config's step compiles once a module (~15-40 s on 2 cores).

  In-process, so nothing is traced again or read back from disk (XLA's persistent cache
  did this before). Sharing is safe because a ``TrainSetup`` holds no run state: the key is
  the config (JSON) less the fields :data:`NOT_IN_THE_STEP` (the run loop's, never read by
  ``TrainSetup``) with the model config and the mesh, and the setup is built from a copy
  of the config, so a test changing its config afterwards cannot reach a shared step.
  Module-wide only: ``conftest._free_compiled_programs`` frees the compiled programs after
  each module.
  """
  from msa_jax import trainer
  build = trainer.TrainSetup
  setups = {}

  def shared(cfg, mesh, model_cfg=None):
    key = (_step_config_json(cfg), repr(model_cfg), mesh.axis_names,
           mesh.devices.shape, tuple(d.id for d in mesh.devices.flat))
    if key not in setups:
      setups[key] = build(copy.deepcopy(cfg), mesh, model_cfg)
    return setups[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, "TrainSetup", shared)
    yield setups


def read_rows(workdir):
  """The rows of a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def saved_steps(workdir):
  """The checkpoint steps a run kept."""
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
