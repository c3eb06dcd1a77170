"""One training step on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices equals the
single-device step: parameters are sharded, the numbers are not changed by it.

The model is the smoke recipe's width (hidden 64, 4 query / 2 kv heads, MLP 128,
vocab 576: every sharded dimension divides by 2) with 1 layer (a router layer) to keep compiling
short. Two steps are taken on the same batch because the first step's learning
rate is 0 (the linear ramp starts at 0), so only the second moves the params.

Tolerances (float32; the sharded step reduces in a different order):
  * initial params: bitwise equal (threefry is partitionable, init is jitted
    into its sharding);
  * metrics: rtol 1e-5 (losses ~4, recall values are exact fractions);
  * updated params: every entry within atol 3e-5 (1% of the lr 3e-3 the step
    moves them by), and all but 0.5% of the entries within 2e-6. Adam's first
    moves are lr·g/(|g| + eps) ≈ ±lr, so a wrong or missing update is off by
    ~3e-3; only entries with |g| ~ eps (1e-8) show the reduction order, by up
    to ~1e-5 (seen: 1 of 2048 entries of a kernel).
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from msa_jax import sharding
from msa_jax.data import from_config
from msa_jax.trainer import TrainSetup

from train_common import get_config


def small_cfg():
  cfg = get_config("smoke")
  cfg.model.num_layers = 1
  cfg.model.router_layers = (0,)
  cfg.batch_size = 8
  cfg.optim.lr_ramp_steps = 1          # step 0 at lr 0, step 1 at the full 3e-3
  cfg.optim.warmup_phase_steps = 1     # step 1 already in the main phase (LM + 0.1·aux)
  return cfg


@pytest.fixture(scope="module")
def runs():
  cfg = small_cfg()
  data = from_config.make_train_iterator(
      cfg.data, seed=0, batch_size=cfg.batch_size, chunk_size=cfg.model.pooling_chunk_size)
  batch = next(data)
  out = {}
  for name, mesh in (("single", sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])),
                     ("mesh8", sharding.make_mesh((2, 2, 2)))):
    setup = TrainSetup(cfg, mesh)
    state = setup.init_state(cfg.seed)
    init_params = jax.device_get(state.params)
    metrics = []
    for _ in range(2):
      state, m = setup.step(state, setup.put_batch(batch))
      metrics.append(jax.device_get(m))
    out[name] = dict(setup=setup, state=state, init=init_params, metrics=metrics)
  return out


def test_params_are_sharded_over_fsdp_and_tensor(runs):
  state = runs["mesh8"]["state"]
  layer = state.params["layers_0"]
  q = layer["q_proj"]["kernel"]
  assert q.shape == (64, 64)
  assert q.sharding.spec == P("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (32, 32)      # embed/2 × heads·dim/2
  assert len(q.sharding.device_set) == 8
  assert layer["mlp"]["down_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
  assert state.params["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert state.params["layers_0"]["router_k_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
  # Adam moments follow their parameters.
  mu = state.opt_state[1][0].mu["layers_0"]["q_proj"]["kernel"]
  assert mu.sharding.spec == P("fsdp", "tensor")
  single = runs["single"]["state"].params["layers_0"]["q_proj"]["kernel"]
  assert len(single.sharding.device_set) == 1


def test_init_is_identical(runs):
  a, b = runs["single"]["init"], runs["mesh8"]["init"]
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_metrics_match(runs):
  for step in range(2):
    a, b = runs["single"]["metrics"][step], runs["mesh8"]["metrics"][step]
    assert set(a) == set(b)
    for k in sorted(a):
      np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-5, atol=1e-7,
                                 err_msg=f"step {step} metric {k}")
  first, second = runs["single"]["metrics"]
  assert float(first["learning_rate"]) == 0.0
  assert float(second["learning_rate"]) == pytest.approx(3e-3, rel=1e-6)
  assert float(second["lm_weight"]) == 1.0
  assert float(second["aux_weight"]) == pytest.approx(0.1)
  assert np.isfinite(float(second["loss"])) and float(second["lm_loss"]) > 1.0


def test_updated_params_match(runs):
  a = jax.device_get(runs["single"]["state"].params)
  b = jax.device_get(runs["mesh8"]["state"].params)
  moved = max(float(np.max(np.abs(x - x0)))
              for x, x0 in zip(jax.tree.leaves(a), jax.tree.leaves(runs["single"]["init"])))
  assert 1e-3 < moved <= 3.1e-3, f"the second step should move params by ~lr, moved {moved}"
  loose = total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(a)[0]:
    y = b
    for key in path:
      y = y[key.key]
    np.testing.assert_allclose(y, x, rtol=0, atol=3e-5, err_msg=jax.tree_util.keystr(path))
    loose += int(np.sum(np.abs(y - x) > 2e-6))
    total += x.size
  assert loose <= 0.005 * total, f"{loose} of {total} params differ by more than 2e-6"
  assert int(runs["mesh8"]["state"].step) == int(runs["single"]["state"].step) == 2
