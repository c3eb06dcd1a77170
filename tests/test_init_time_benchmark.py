"""``benchmarks/init_time.py`` at the recipes' tiny structure: a row per key implementation,
and the threefry program is the trainer's own (the same parameters as ``init_state``)."""
import jax
import numpy as np

from benchmarks import init_time
from benchmarks import train_step as ts
from msa_jax import sharding, trainer


def test_init_time_rows(tmp_path):
  out = tmp_path / "init_time.json"
  result = init_time.main(["--tiny", "--impls", "threefry2x32,rbg", "--out", str(out)])
  assert out.exists()
  rows = result["rows"]
  assert [r["impl"] for r in rows] == ["threefry2x32", "rbg"]
  assert rows[0]["params"] == rows[1]["params"] > 0
  assert all(r["compile_s"] > 0 and r["run_s"] > 0 for r in rows)


def test_threefry_program_is_the_trainers():
  cfg = ts.recipe("0.6b", 16384, True, "1,-1,1")
  setup = trainer.TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape),
                             trainer.resolve_model_config(cfg))
  _, state = init_time.time_init(setup, "threefry2x32", seed=3)
  want = setup.init_state(3)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, other = init_time.time_init(setup, "rbg", seed=3)
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
             zip(jax.tree.leaves(other.params), jax.tree.leaves(want.params)))
