"""A run makes its state (fresh, loaded from ``init_from``, or restored from its newest
checkpoint) in another thread while the step compiles for the first batch
(``trainer._restore_or_init`` through ``msa_jax.overlap.beside``): the same state, the same
first batch, and a step compiled ahead of time that computes what the jitted step does (CPU)."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import checkpointing, sharding, trainer
from msa_jax.data import from_config
from train_common import small_cfg


def _iterator(cfg, setup):
  return from_config.make_train_iterator(
      cfg.data, seed=cfg.seed, batch_size=cfg.batch_size,
      chunk_size=setup.model_cfg.pooling_chunk_size, process_index=0, process_count=1)


def _new_run(cfg, setup, workdir):
  """``trainer._restore_or_init`` in an empty workdir: ``(state, first host batch)``."""
  manager = checkpointing.make_manager(str(workdir), 1, 1000, False)
  try:
    start, state, first = trainer._restore_or_init(cfg, setup, manager, _iterator(cfg, setup),
                                                   fallback=False)
  finally:
    manager.close()
  assert start == 0 and first is not None
  return state, first


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
  cfg = small_cfg()
  setup = trainer.TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape))
  state, first = _new_run(cfg, setup, tmp_path_factory.mktemp("fresh"))
  return cfg, setup, state, first


def test_same_state_and_first_batch(fresh):
  cfg, setup, state, first = fresh
  want_state = setup.init_state(cfg.seed)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  want_first = next(_iterator(cfg, setup))
  for got, want in zip(jax.tree.leaves(first), jax.tree.leaves(want_first)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_step_runs_the_compiled_step_and_matches_the_jitted(fresh, monkeypatch):
  cfg, setup, state, first = fresh
  batch = setup.put_batch(first)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the step donates its state)
  with sharding.mesh_context(setup.mesh):
    want_state, want_metrics = setup._step(copy(state), batch)   # the jitted step
  jitted = setup._step

  def no_jit(*_):
    raise AssertionError("the jitted step ran for shapes compiled ahead of time")
  monkeypatch.setattr(setup, "_step", no_jit)
  got_state, got_metrics = setup.step(copy(state), batch)
  assert float(got_metrics["loss"]) == float(want_metrics["loss"])
  for got, want in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # another shape goes to the jitted step
  other = jax.tree.map(lambda x: np.concatenate([x, x]), first)   # twice the batch
  with pytest.raises(AssertionError, match="jitted step ran"):
    setup.step(copy(state), setup.put_batch(other))
  monkeypatch.setattr(setup, "_step", jitted)
  assert setup.compile_step(batch) == 0.0   # already compiled: nothing again


def test_init_from_loads_beside_the_first_compile(fresh, tmp_path):
  """``init_from``: the checkpoint's parameters (not a fresh draw), a fresh optimizer state,
  the first batch unchanged, and the step compiled ahead of time for it."""
  import flax.linen as nn
  from msa_jax.export.msa_jax_checkpoint import save_msa_jax_checkpoint
  first_fresh = fresh[3]
  cfg = small_cfg()
  setup = trainer.TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape))
  params = jax.tree.map(lambda x: np.asarray(x) + 0.5,
                        jax.device_get(nn.unbox(setup.init_state(1).params)))
  cfg.init_from = save_msa_jax_checkpoint(setup.model, params, str(tmp_path / "ckpt"))
  state, first = _new_run(cfg, setup, tmp_path / "run")
  assert int(state.step) == 0
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-6)
  want_opt = setup.state_from_params(params).opt_state
  for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(want_opt)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for got, want in zip(jax.tree.leaves(first), jax.tree.leaves(first_fresh)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert trainer._shapes_key(setup.put_batch(first)) in setup._compiled


def test_init_from_that_is_not_a_directory_fails_before_any_compile(tmp_path, monkeypatch):
  """A wrong ``init_from`` is said at once, not after the first step's compile."""
  cfg = small_cfg()
  cfg.init_from = str(tmp_path / "no_such_checkpoint")
  setup = trainer.TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape))

  def no_compile(*_):
    raise AssertionError("compiled before checking init_from")
  monkeypatch.setattr(setup, "compile_step", no_compile)
  with pytest.raises(ValueError, match="init_from=.*no_such_checkpoint: not a directory"):
    _new_run(cfg, setup, tmp_path / "run")


def _saved_run(tmp_path, steps: int):
  """``(cfg, setup, workdir, state, batches)``: a run stepped ``steps`` times and saved at
  that step, and the batches an unbroken iterator gives (the first ``steps + 1``)."""
  cfg = small_cfg()
  setup = trainer.TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape))
  data_iter = _iterator(cfg, setup)
  state = setup.init_state(cfg.seed)
  batches = []
  for _ in range(steps):
    batches.append(next(data_iter))
    state, _ = setup.step(state, setup.put_batch(batches[-1]))
  workdir = tmp_path / "run"
  manager = checkpointing.make_manager(str(workdir), 1, 1000, False)
  checkpointing.save(manager, steps, state, data_iter, force=True)
  manager.close()
  batches.append(next(data_iter))
  return cfg, setup, workdir, state, batches


def _resume(cfg, setup, workdir):
  manager = checkpointing.make_manager(str(workdir), 1, 1000, False)
  try:
    return trainer._restore_or_init(cfg, setup, manager, _iterator(cfg, setup), fallback=False)
  finally:
    manager.close()


def test_resume_reads_the_state_beside_the_first_compile(tmp_path, monkeypatch):
  """A resumed run: the saved state bit for bit, the batch after the saved step first, the
  step compiled ahead of time for it, and the state read while that compile ran: the read
  here cannot finish until the compile has started (a read before the compile would time
  out)."""
  cfg, setup, workdir, saved, batches = _saved_run(tmp_path, 2)
  compiling = threading.Event()
  compile_step, read = setup.compile_step, checkpointing._read

  def compile_and_say(batch):
    compiling.set()
    return compile_step(batch)

  def read_state_after_compile_starts(manager, step, path, **items):
    if "state" in items:
      assert compiling.wait(timeout=120), "the state was read before the step's compile began"
    return read(manager, step, path, **items)
  monkeypatch.setattr(setup, "compile_step", compile_and_say)
  monkeypatch.setattr(checkpointing, "_read", read_state_after_compile_starts)
  start, state, first = _resume(cfg, setup, workdir)
  assert start == 2 and int(state.step) == 2
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for got, want in zip(jax.tree.leaves(first), jax.tree.leaves(batches[2])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert trainer._shapes_key(setup.put_batch(first)) in setup._compiled


def test_resume_with_no_step_left_draws_and_compiles_nothing(tmp_path, monkeypatch):
  cfg, setup, workdir, saved, _ = _saved_run(tmp_path, 1)
  cfg.num_steps = 1

  def no_compile(*_):
    raise AssertionError("compiled a step for a run with no step left")
  monkeypatch.setattr(setup, "compile_step", no_compile)
  start, state, first = _resume(cfg, setup, workdir)
  assert start == 1 and first is None and int(state.step) == 1
