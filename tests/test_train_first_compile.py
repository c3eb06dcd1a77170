"""A fresh run initialises its state in another thread while the step compiles for the
first batch (``trainer._init_beside_first_compile``): the same state, the same first batch,
and a step compiled ahead of time that computes what the jitted step does (CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import sharding, trainer
from msa_jax.data import from_config
from train_common import small_cfg


def _iterator(cfg, setup):
  return from_config.make_train_iterator(
      cfg.data, seed=cfg.seed, batch_size=cfg.batch_size,
      chunk_size=setup.model_cfg.pooling_chunk_size, process_index=0, process_count=1)


@pytest.fixture(scope="module")
def fresh():
  cfg = small_cfg()
  setup = trainer.TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape))
  state, first = trainer._init_beside_first_compile(cfg, setup, _iterator(cfg, setup))
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
