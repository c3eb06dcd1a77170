"""``loss.aux_softmax``: the routing loss's smooth document score.

``routing.smooth_document_scores`` against a float64 numpy reference (padding tokens and
chunks, an empty document, an example with no routing token); it tends to the hard max
as its temperature goes to 0; its gradient reaches several chunks of the positive
document where the hard max's reaches one; in the training step, ``aux_softmax=0``
(the default) is the hard-max loss of ``forward_memory``'s scores with the same
gradients, and (slow) the scanned forward gives the unrolled one's smooth scores and gradients.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msa_jax import losses, routing
from msa_jax.model import MSAModel
from msa_jax.train_step import aux_loss_layers, aux_softmax, compute_losses

from tests import reference_numpy as R
from tests.test_scan_layers import SMOKE, _batch

fast_compile = R.fast_compile_fixture()


def _routing_case(seed=0, b=3, m=5, n=4, c=3, f=8):
  """Group-summed queries, unit router keys, and masks with padding tokens, padding
  chunks, an empty document (example 0, document 2) and an example with no routing token
  (example 2)."""
  rng = np.random.default_rng(seed)
  rq = rng.normal(size=(b, m, f)).astype(np.float32)
  kr = rng.normal(size=(b, n, c, f)).astype(np.float32)
  kr /= np.linalg.norm(kr, axis=-1, keepdims=True)
  query_mask = np.arange(m)[None, :] < np.array([3, 5, 0])[:b, None]
  chunk_mask = np.arange(c)[None, None, :] < rng.integers(1, c + 1, size=(b, n))[..., None]
  chunk_mask[0, 2] = False
  return rq, query_mask, kr, chunk_mask


def _smooth_reference(rq, query_mask, kr, chunk_mask, tau):
  """float64: ``τ·log mean exp(s/τ)`` over each document's valid (token, chunk) pairs."""
  b, _, _ = rq.shape
  n = kr.shape[1]
  out = np.full((b, n), -np.inf)
  for i in range(b):
    for d in range(n):
      s = rq[i][query_mask[i]].astype(np.float64) @ kr[i, d][chunk_mask[i, d]].astype(
          np.float64).T
      if s.size:
        top = s.max()
        out[i, d] = top + tau * np.log(np.mean(np.exp((s - top) / tau)))
  return out


def _hard_scores(rq, query_mask, kr, chunk_mask):
  """The hard max over tokens and chunks, as ``model.route_in_memory`` computes it."""
  b, n, c, f = kr.shape
  chunk_doc = jnp.where(chunk_mask, jnp.arange(n)[None, :, None], -1).reshape(b, n * c)
  return jax.vmap(lambda q, qm, k, cd: routing.document_scores(
      routing.chunk_scores(q[None], qm[None], k), cd, n)[0])(
          rq, query_mask, kr.reshape(b, n * c, f), chunk_doc)


@pytest.mark.parametrize("tau", [0.05, 0.3, 2.0])
def test_smooth_scores_match_float64_reference(tau):
  rq, query_mask, kr, chunk_mask = _routing_case()
  got = np.asarray(routing.smooth_document_scores(rq, query_mask, kr, chunk_mask, tau))
  want = _smooth_reference(rq, query_mask, kr, chunk_mask, tau)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  assert np.isneginf(got[0, 2]) and np.all(np.isneginf(got[2]))
  finite = np.isfinite(want)
  assert finite.sum() >= 7
  np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)
  # Between the mean and the max of the document's pairs (a mean of exponentials).
  hard = np.asarray(_hard_scores(rq, query_mask, kr, chunk_mask))
  assert np.all(got[finite] <= hard[finite] + 1e-6)
  assert np.all(got[finite] < hard[finite] - 1e-4) or tau < 0.1


def test_small_temperature_gives_the_hard_max():
  rq, query_mask, kr, chunk_mask = _routing_case(seed=1)
  hard = np.asarray(_hard_scores(rq, query_mask, kr, chunk_mask))
  smooth = np.asarray(routing.smooth_document_scores(rq, query_mask, kr, chunk_mask, 1e-3))
  np.testing.assert_array_equal(np.isneginf(smooth), np.isneginf(hard))
  finite = np.isfinite(hard)
  # |smooth - max| <= τ·log(pairs) = 1e-3·log(15) for 5 tokens × 3 chunks.
  np.testing.assert_allclose(smooth[finite], hard[finite], atol=3e-3)
  assert not np.allclose(smooth[finite], hard[finite], atol=1e-6)


def test_a_zero_or_negative_temperature_is_refused():
  rq, query_mask, kr, chunk_mask = _routing_case()
  with pytest.raises(ValueError, match="temperature > 0"):
    routing.smooth_document_scores(rq, query_mask, kr, chunk_mask, 0.0)


def _chunks_with_gradient(score_fn):
  """Per example, how many chunks of its positive document get a nonzero key gradient
  from the InfoNCE loss on ``score_fn(kr)``'s scores."""
  rq, query_mask, kr, chunk_mask = _routing_case(seed=2, b=2, m=4, n=5, c=4)
  query_mask = np.ones_like(query_mask)
  chunk_mask = np.ones_like(chunk_mask)
  positive = np.zeros((2, 5), bool)
  positive[:, 1] = True
  valid = np.ones((2, 5), bool)

  def loss(kr):
    scores = score_fn(rq, query_mask, kr, chunk_mask)
    return losses.infonce_decoupled(scores[:, None], positive, valid, 0.1)[0]

  g = np.asarray(jax.grad(loss)(jnp.asarray(kr)))
  return (np.abs(g[:, 1]).max(axis=-1) > 0).sum(axis=-1)


def test_gradient_reaches_every_chunk_of_the_positive_only_with_the_smooth_score():
  np.testing.assert_array_equal(_chunks_with_gradient(_hard_scores), [1, 1])
  smooth = functools.partial(routing.smooth_document_scores, temperature=0.1)
  np.testing.assert_array_equal(
      _chunks_with_gradient(lambda *a: smooth(*a)), [4, 4])


def _train_cfg(tau=None):
  cfg = ml_collections.ConfigDict({
      "loss": {"infonce_temperature": 0.1, "lm_chunk_size": 4},
      "optim": {"warmup_phase_steps": 10, "warmup_lm_weight": 0.0, "warmup_aux_weight": 1.0,
                "main_lm_weight": 1.0, "main_aux_weight": 0.1}})
  if tau is not None:
    cfg.loss.aux_softmax = tau
  return cfg


def test_the_config_field_defaults_to_the_hard_max_and_refuses_negatives():
  assert aux_softmax(_train_cfg()) == 0.0 and aux_softmax(_train_cfg(0.3)) == 0.3
  with pytest.raises(ValueError, match="loss.aux_softmax"):
    aux_softmax(_train_cfg(-0.1))


@functools.lru_cache(maxsize=None)
def _loss_and_grads(model_cfg, tau):
  """Jitted ``params, batch -> (aux loss, grads, train output)`` in the router warm-up
  (LM weight 0, so the loss is the aux loss alone)."""
  model = MSAModel(model_cfg)
  cfg = _train_cfg(tau)

  def step(params, batch):
    fn = lambda p: compute_losses(model, p, batch, jnp.int32(0), cfg)[0]
    loss, grads = jax.value_and_grad(fn)(params)
    out = model.apply({"params": params}, batch, tau, method=MSAModel.forward_train)
    return loss, grads, out
  return jax.jit(step)


def _case(seed=3):
  batch = _batch(seed)
  return batch, R.init_model(SMOKE, batch, seed=seed)[1]["params"]


def test_zero_is_the_hard_max_loss_with_the_same_gradients():
  batch, params = _case()
  model = MSAModel(SMOKE)
  layers = jnp.asarray(aux_loss_layers(SMOKE))

  def hard_loss(p):   # forward_memory never computes smooth scores
    out = model.apply({"params": p}, batch)
    return losses.infonce_decoupled(out.doc_scores_brn[:, layers], batch.positive_docs,
                                    losses.doc_valid(batch.doc_mask), 0.1)[0]

  want_loss, want_grads = jax.jit(jax.value_and_grad(hard_loss))(params)
  loss, grads, out = _loss_and_grads(SMOKE, 0.0)(params, batch)
  assert out.aux_scores_brn is None
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  flat = dict(jax.tree_util.tree_leaves_with_path(grads))
  for path, g in jax.tree_util.tree_leaves_with_path(want_grads):
    # Two jitted graphs (with and without the LM head): float32 rounding differs.
    scale = float(jnp.max(jnp.abs(g))) + 1e-12
    np.testing.assert_allclose(flat[path], g, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert float(jnp.max(jnp.abs(grads["layers_2"]["router_q_proj"]["kernel"]))) > 0


@pytest.mark.slow   # three compiles of the training step: ~40 s on a shared CPU core
def test_scanned_forward_gives_the_unrolled_smooth_scores_and_gradients():
  batch, params = _case()
  hard_loss = _loss_and_grads(SMOKE, 0.0)(params, batch)[0]
  loss_u, grads_u, out_u = _loss_and_grads(SMOKE, 0.2)(params, batch)
  assert abs(float(loss_u) - float(hard_loss)) > 1e-4   # the config's τ is used
  loss_s, grads_s, out_s = _loss_and_grads(SMOKE.replace(scan_layers=True), 0.2)(params, batch)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  np.testing.assert_allclose(out_s.aux_scores_brn, out_u.aux_scores_brn, rtol=1e-5, atol=1e-6)
  flat_s = dict(jax.tree_util.tree_leaves_with_path(grads_s))
  for path, g in jax.tree_util.tree_leaves_with_path(grads_u):
    scale = float(jnp.max(jnp.abs(g))) + 1e-12
    np.testing.assert_allclose(flat_s[path], g, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  # Smooth scores lie below the hard max and are -inf exactly where it is.
  hard, smooth = np.asarray(out_u.doc_scores_brn), np.asarray(out_u.aux_scores_brn)
  np.testing.assert_array_equal(np.isneginf(smooth), np.isneginf(hard))
  finite = np.isfinite(hard)
  assert finite.sum() > 0 and np.all(smooth[finite] <= hard[finite] + 1e-6)
  assert out_u.aux_scores_brn.shape == out_u.doc_scores_brn.shape
  # The router projections get a gradient from the smooth aux loss.
  top = f"layers_{SMOKE.num_layers - 1}"
  assert float(jnp.max(jnp.abs(grads_u[top]["router_q_proj"]["kernel"]))) > 0


def test_shared_pair_scores_give_the_hard_and_smooth_maxima():
  """The training forward computes the [B, M, N, C] scores once for both maxima: the hard
  one equals chunk_scores + document_scores (-inf where a document or example has no
  valid pair), the smooth one its own computation; and a memory's selection agrees."""
  from msa_jax.layer_memory import ExampleLayerMemory, LayerMemory
  rq, query_mask, kr, chunk_mask = _routing_case()
  s = routing.pair_scores(rq, kr)
  hard = np.asarray(routing.hard_document_scores(s, query_mask, chunk_mask))
  want = np.asarray(_hard_scores(rq, query_mask, kr, chunk_mask))
  np.testing.assert_array_equal(np.isneginf(hard), np.isneginf(want))
  assert np.isneginf(hard).any()
  np.testing.assert_allclose(hard[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(routing.smooth_document_scores(rq, query_mask, kr, chunk_mask, 0.1, s_bmnc=s)),
      np.asarray(routing.smooth_document_scores(rq, query_mask, kr, chunk_mask, 0.1)))
  b, n, c, f = kr.shape
  mem = LayerMemory(jnp.zeros((b, n, c, 1, 2)), jnp.zeros((b, n, c, 1, 2)), kr, chunk_mask)
  shared, *_ = ExampleLayerMemory(mem, aux_softmax=0.1).select(rq, query_mask, 2)
  plain, *_ = ExampleLayerMemory(mem).select(rq, query_mask, 2)
  np.testing.assert_array_equal(np.asarray(shared.doc_idx_bk), np.asarray(plain.doc_idx_bk))
  np.testing.assert_array_equal(np.asarray(shared.valid_bk), np.asarray(plain.valid_bk))
  np.testing.assert_allclose(np.asarray(shared.doc_scores_bn)[np.isfinite(want)],
                             want[np.isfinite(want)], rtol=1e-6)
