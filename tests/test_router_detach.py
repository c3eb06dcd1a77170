"""``model.router_detach``: the routing loss trains the router projections only.

With the switch off (SPEC's joint training) the aux loss's gradient reaches the shared
layers (embeddings, lower layers); with it on, only ``router_q_proj``/``router_k_proj``
get it, and the forward (scores, logits) is unchanged.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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


def test_router_detach_keeps_the_aux_gradient_out_of_the_shared_layers():
  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=8, router_layers=(1,),
                    pooling_chunk_size=2, top_k=1, initializer_range=0.3)
  batch = R.make_batch(np.random.default_rng(0), vocab=32, prefix_lens=[1, 0],
                       doc_lens=[[3, 4, 2], [2, 3, 2]], active_lens=[4, 3],
                       question_lens=[2, 2])
  model, variables = R.init_model(cfg, batch, seed=1)
  params = variables["params"]
  grads, hidden = {}, {}
  for detach in (False, True):
    m = MSAModel(dataclasses.replace(cfg, router_detach=detach))
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
