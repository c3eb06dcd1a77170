"""``model.router_trunk_grad``: the share of the routing loss's gradient that reaches the
shared layers; at 0 the routing loss trains the router projections only.

With 1 (SPEC's joint training) the aux loss's gradient reaches the shared layers
(embeddings, lower layers); with 0, only ``router_q_proj``/``router_k_proj`` get it, and
the forward (scores, logits) is unchanged. Configs saved with the older ``router_detach``
switch load as ``router_trunk_grad`` 0 (True) or unchanged (False).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import losses
from msa_jax.config import ModelConfig
from msa_jax.model import MSAModel

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()


def _aux_loss(model, params, batch):
  out = model.apply({"params": params}, batch, method=MSAModel.forward_train)
  valid = losses.doc_valid(batch.doc_mask)
  aux, _ = losses.infonce_decoupled(out.doc_scores_brn, batch.positive_docs, valid, 0.1)
  return aux, out.hidden_bmd


def _case():
  """A one-router-layer model, a batch with positives, and its initial parameters."""
  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=8, router_layers=(1,),
                    pooling_chunk_size=2, top_k=1, initializer_range=0.3)
  batch = R.make_batch(np.random.default_rng(0), vocab=32, prefix_lens=[1, 0],
                       doc_lens=[[3, 4, 2], [2, 3, 2]], active_lens=[4, 3],
                       question_lens=[2, 2])
  _, variables = R.init_model(cfg, batch, seed=1)
  return cfg, batch, variables["params"]


def test_router_trunk_grad_zero_keeps_the_aux_gradient_out_of_the_shared_layers():
  cfg, batch, params = _case()
  grads, hidden = {}, {}
  for detach in (False, True):
    m = MSAModel(dataclasses.replace(cfg, router_trunk_grad=0.0 if detach else 1.0))
    (aux, hidden[detach]), grads[detach] = jax.jit(jax.value_and_grad(
        lambda p: _aux_loss(m, p, batch), has_aux=True))(params)
    assert float(aux) > 0
  np.testing.assert_array_equal(np.asarray(hidden[False]), np.asarray(hidden[True]))
  norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))
  for detach in (False, True):
    g = grads[detach]
    router = {k: v for k, v in jax.tree_util.tree_leaves_with_path(g)
              if "router_" in jax.tree_util.keystr(k)}
    shared = {k: v for k, v in jax.tree_util.tree_leaves_with_path(g)
              if "router_" not in jax.tree_util.keystr(k)}
    assert norm(list(router.values())) > 1e-4, detach
    if detach:
      assert norm(list(shared.values())) == 0.0
    else:
      assert norm(list(shared.values())) > 1e-4


def test_router_trunk_grad_scales_the_aux_gradient_into_the_shared_layers():
  cfg, batch, params = _case()
  grads, hidden, aux = {}, {}, {}
  for scale in (1.0, 0.25):
    m = MSAModel(dataclasses.replace(cfg, router_trunk_grad=scale))
    (aux[scale], hidden[scale]), grads[scale] = jax.jit(jax.value_and_grad(
        lambda p: _aux_loss(m, p, batch), has_aux=True))(params)
  np.testing.assert_array_equal(np.asarray(hidden[1.0]), np.asarray(hidden[0.25]))
  assert float(aux[1.0]) == float(aux[0.25]) > 0
  flat = {s: {jax.tree_util.keystr(k): np.asarray(v)
              for k, v in jax.tree_util.tree_leaves_with_path(grads[s])} for s in grads}
  checked_shared = 0
  for name, g1 in flat[1.0].items():
    g = flat[0.25][name]
    # Router projections keep their whole gradient; everything below them gets a quarter.
    want = g1 if "router_" in name else 0.25 * g1
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7, err_msg=name)
    checked_shared += "router_" not in name and np.abs(g1).max() > 1e-4
  assert checked_shared >= 3


def test_router_trunk_grad_outside_zero_one_is_refused():
  with pytest.raises(ValueError, match="router_trunk_grad must be in"):
    ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                num_heads=2, num_kv_heads=1, head_dim=8, router_trunk_grad=1.5)


def test_a_saved_router_detach_loads_as_router_trunk_grad():
  base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
              num_heads=2, num_kv_heads=1, head_dim=8)
  assert ModelConfig.from_dict({**base, "router_detach": True}).router_trunk_grad == 0.0
  assert ModelConfig.from_dict({**base, "router_detach": False,
                                "router_trunk_grad": 0.1}).router_trunk_grad == 0.1
  assert "router_detach" not in ModelConfig.from_dict(base).to_dict()
  with pytest.raises(ValueError, match="router_detach=True and router_trunk_grad=0.1 disagree"):
    ModelConfig.from_dict({**base, "router_detach": True, "router_trunk_grad": 0.1})
