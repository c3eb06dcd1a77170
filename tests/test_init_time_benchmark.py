"""``benchmarks/init_time.py`` at the recipes' tiny structure, and the grouped draws of
``msa_jax.batched_init``: the trainer's init program gives the same parameters as drawing
each alone (``model.init``), from fewer kernels."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks import init_time
from benchmarks import train_step as ts
from msa_jax import batched_init, sharding, trainer


def _setup(variant="0.6b", tiny=True):
  cfg = ts.recipe(variant, 16384, tiny, "1,-1,1")
  return trainer.TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape),
                            trainer.resolve_model_config(cfg))


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_time_rows(tmp_path):
  out = tmp_path / "init_time.json"
  result = init_time.main(["--tiny", "--impls", "threefry2x32,rbg", "--out", str(out)])
  assert out.exists()
  rows = result["rows"]
  assert [(r["impl"], r["draws"]) for r in rows] == [
      ("threefry2x32", "grouped"), ("threefry2x32", "per_param"), ("rbg", "grouped"),
      ("rbg", "per_param")]
  assert len({r["params"] for r in rows}) == 1 and rows[0]["params"] > 0
  assert all(r["compile_s"] > 0 and r["run_s"] > 0 for r in rows)
  assert rows[0]["fusions"] < rows[1]["fusions"]


def test_grouped_program_is_the_trainers_and_draws_the_same_values():
  setup = _setup()
  _, grouped = init_time.time_init(setup, "threefry2x32", seed=3)
  _assert_same(grouped.params, setup.init_state(3).params)
  _, per_param = init_time.time_init(setup, "threefry2x32", seed=3, grouped=False)
  _assert_same(grouped.params, per_param.params)
  _, other = init_time.time_init(setup, "rbg", seed=3)
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
             zip(jax.tree.leaves(other.params), jax.tree.leaves(grouped.params)))


def test_grouped_draws_outside_a_lifted_transform_only(caplog):
  """Inside ``nn.remat`` a parameter leaves the transform as another array: the grouping is
  abandoned (a warning) and ``init`` runs again, so the values stay the plain ones."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8, kernel_init=batched_init.normal(0.5), name="a")(x)
      return nn.remat(nn.Dense)(8, kernel_init=batched_init.normal(0.5), name="b")(x)
  net, key, x = Net(), jax.random.key(1), jnp.ones((2, 8))
  want = jax.jit(net.init)(key, x)
  with caplog.at_level(logging.WARNING):
    got = jax.jit(lambda k: batched_init.grouped_draws(lambda: net.init(k, x)))(key)
  assert "1 of 2 deferred parameter draws did not reach" in caplog.text
  _assert_same(got, want)
  # without the lifted transform both kernels are one group of two, the same values
  flat = nn.Sequential([nn.Dense(8, kernel_init=batched_init.normal(0.5)),
                        nn.Dense(8, kernel_init=batched_init.normal(0.5))])
  _assert_same(jax.jit(lambda k: batched_init.grouped_draws(lambda: flat.init(k, x)))(key),
               jax.jit(flat.init)(key, x))
  assert not np.array_equal(*[np.asarray(v["kernel"]) for v in
                              jax.jit(flat.init)(key, x)["params"].values()])
