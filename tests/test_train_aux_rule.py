"""SPEC §4's aux-loss rule when no router layer lies in the upper half: no aux term, a warning.

The routing loss covers the upper-half router layers only. A config whose router layers
are all in the lower half therefore trains with ``aux_loss == 0``, its router projections
get no gradient (the LM loss cannot reach them through the hard top-k), and the run says so.
"""
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msa_jax import losses
from msa_jax.config import ModelConfig
from msa_jax.train_step import compute_losses

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()


def _cfg():
  return ml_collections.ConfigDict({
      "loss": {"infonce_temperature": 0.1},
      "optim": {"warmup_phase_steps": 10, "warmup_lm_weight": 0.1, "warmup_aux_weight": 1.0,
                "main_lm_weight": 1.0, "main_aux_weight": 0.1}})


def _model_cfg(router_layers):
  return ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=4,
                     num_heads=2, num_kv_heads=1, head_dim=8, router_layers=router_layers,
                     pooling_chunk_size=2, top_k=1, initializer_range=0.3)


def _batch():
  return R.make_batch(np.random.default_rng(0), vocab=32, prefix_lens=[1, 0],
                      doc_lens=[[3, 4, 2], [2, 3, 0]], active_lens=[4, 3],
                      question_lens=[2, 2])


def _setup(router_layers):
  cfg = _model_cfg(router_layers)
  batch = _batch()
  model, variables = R.init_model(cfg, batch, seed=1)
  return model, variables, batch


def test_no_upper_half_router_layer_means_no_aux_term_and_a_warning(caplog):
  model, variables, batch = _setup((0, 1))   # 4 layers: the upper half is layers 2, 3
  fn = jax.jit(jax.value_and_grad(
      lambda p: compute_losses(model, p, batch, jnp.int32(0), _cfg()), has_aux=True))
  with caplog.at_level(logging.WARNING):
    (_, metrics), grads = fn(variables["params"])
  assert float(metrics["aux_loss"]) == 0.0 and float(metrics["routing_pairs"]) == 0.0
  # warm-up weights 0.1·LM + 1.0·aux: the total is the LM term alone.
  np.testing.assert_allclose(float(metrics["loss"]), 0.1 * float(metrics["lm_loss"]), rtol=1e-6)
  for i in (0, 1):
    for proj in ("router_q_proj", "router_k_proj"):
      assert not np.any(np.asarray(grads[f"layers_{i}"][proj]["kernel"])), (i, proj)
  assert "no router layer in the upper half" in caplog.text
  assert "router_layers [0, 1] of 4 layers" in caplog.text and "index >= 2" in caplog.text


def test_upper_half_router_layers_alone_carry_the_aux_term():
  model, variables, batch = _setup((1, 3))
  metrics = jax.jit(lambda p: compute_losses(model, p, batch, jnp.int32(0), _cfg())[1])(
      variables["params"])
  out = jax.jit(model.apply)(variables, batch)
  # router layer 3 (position 1 of the R axis) is the only one in the upper half.
  want, pairs = losses.infonce_decoupled(out.doc_scores_brn[:, 1:], batch.positive_docs,
                                         losses.doc_valid(batch.doc_mask))
  assert float(pairs) == 2.0 and float(metrics["routing_pairs"]) == 2.0
  np.testing.assert_allclose(float(metrics["aux_loss"]), float(want), rtol=1e-6)
