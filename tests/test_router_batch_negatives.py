"""``loss.aux_batch_negatives``: the routing loss over every document of the batch.

The targets (own gold documents positive; another example's copy of a gold document left
out) against a brute-force numpy reference with exact token comparison; the training
forward's batch scores: their own-example block is the usual routing score (hard and
smooth, unrolled and scanned), another example's block is the score the example would get
with that example's documents as its memory; the loss is a float64 numpy InfoNCE over those
scores, with a finite gradient that reaches the router; a batch of one example gives the
usual loss.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msa_jax import losses
from msa_jax.model import MSAModel
from msa_jax.train_step import aux_batch_negatives, aux_loss_layers, compute_losses

from tests import reference_numpy as R
from tests.test_router_aux_softmax import _train_cfg
from tests.test_scan_layers import SMOKE, _batch

fast_compile = R.fast_compile_fixture()


def _targets_numpy(positive, valid, tokens, mask):
  b, n = positive.shape
  pos = np.zeros((b, b * n), bool)
  ok = np.zeros((b, b * n), bool)
  docs = [tuple(tokens[e, d][mask[e, d]]) for e in range(b) for d in range(n)]
  for i in range(b):
    gold = {docs[i * n + d] for d in range(n) if positive[i, d] and valid[i, d]}
    for x in range(b * n):
      e, d = divmod(x, n)
      pos[i, x] = e == i and positive[i, d] and valid[i, d]
      ok[i, x] = valid[e, d] and (e == i or docs[x] not in gold)
  return pos, ok


def test_targets_match_reference_and_leave_out_copies_of_gold():
  rng = np.random.default_rng(0)
  b, n, l = 4, 5, 6
  tokens = rng.integers(1, 50, size=(b, n, l))
  mask = np.arange(l)[None, None, :] < rng.integers(1, l + 1, size=(b, n))[..., None]
  mask[2, 4] = False                                   # an empty (padding) document
  positive = np.zeros((b, n), bool)
  positive[[0, 1, 2, 3], [1, 0, 3, 2]] = True
  positive[3] = False                                  # an example without a positive
  tokens[1, 3], mask[1, 3] = tokens[0, 1], mask[0, 1]  # example 1 holds example 0's gold
  tokens[2, 0], mask[2, 0] = tokens[0, 4], mask[0, 4]  # and a copy of a non-gold document
  # Example 3 holds example 2's gold with other padding tokens: the same document.
  tokens[3, 1] = np.where(mask[2, 3], tokens[2, 3], tokens[2, 3] + 7)
  mask[3, 1] = mask[2, 3]
  valid = np.asarray(losses.doc_valid(mask))
  pos, ok = losses.batch_negative_targets(positive, valid, tokens, mask)
  want_pos, want_ok = _targets_numpy(positive, valid, tokens, mask)
  np.testing.assert_array_equal(np.asarray(pos), want_pos)
  np.testing.assert_array_equal(np.asarray(ok), want_ok)
  assert not bool(ok[0, 1 * n + 3]) and bool(ok[1, 0 * n + 1])   # the copy is not a negative
  assert bool(ok[0, 2 * n + 0])                                  # a copy of a non-gold is
  assert not bool(ok[0, 2 * n + 4])                              # padding is no candidate
  assert not bool(ok[2, 3 * n + 1])                              # padding tokens ignored


def _cfg(batch_negatives=True):
  cfg = _train_cfg()   # the router warm-up's weights (LM 0, aux 1 at step 0)
  cfg.loss.aux_batch_negatives = batch_negatives
  return cfg


def test_config_field_defaults_off_and_refuses_non_bools():
  assert aux_batch_negatives(ml_collections.ConfigDict({"loss": {}})) is False
  assert aux_batch_negatives(_cfg(True)) is True
  with pytest.raises(ValueError, match="loss.aux_batch_negatives"):
    aux_batch_negatives(_cfg("yes"))


@functools.lru_cache(maxsize=None)
def _forward(model_cfg, tau):
  model = MSAModel(model_cfg)
  return jax.jit(lambda v, b, neg: model.apply(v, b, tau, False, False, neg,
                                               method=MSAModel.forward_train),
                 static_argnums=2)


@pytest.mark.parametrize("scan,tau", [(False, 0.0), (True, 0.2)])
def test_batch_scores_are_each_memorys_routing_scores(scan, tau):
  model_cfg = SMOKE.replace(scan_layers=scan)
  batch = _batch(4, b=3, n=4)
  variables = R.init_model(SMOKE, batch, seed=4)[1]
  fwd = _forward(model_cfg, tau)
  out = fwd(variables, batch, True)
  b, r = 3, len(SMOKE.router_layer_ids)
  n = np.asarray(batch.doc_mask).shape[1]
  scores = np.asarray(out.batch_scores_brx)
  assert scores.shape == (b, r, b * n)
  own = np.asarray(out.doc_scores_brn if out.aux_scores_brn is None else out.aux_scores_brn)
  for i in range(b):
    np.testing.assert_allclose(scores[i, :, i * n:(i + 1) * n], own[i], rtol=1e-5, atol=1e-6)
  # The first router layer's query does not depend on the memory: example 0 scored against
  # example e's documents is example 0 routed with e's documents as its own memory.
  for e in (1, 2):
    swapped = dataclasses.replace(
        batch, doc_tokens=np.asarray(batch.doc_tokens).copy(),
        doc_mask=np.asarray(batch.doc_mask).copy())
    swapped.doc_tokens[0], swapped.doc_mask[0] = batch.doc_tokens[e], batch.doc_mask[e]
    alone = fwd(variables, swapped, False)
    alone_s = np.asarray(alone.doc_scores_brn if alone.aux_scores_brn is None
                         else alone.aux_scores_brn)
    np.testing.assert_allclose(scores[0, 0, e * n:(e + 1) * n], alone_s[0, 0],
                               rtol=1e-5, atol=1e-6)
  plain = fwd(variables, batch, False)
  assert plain.batch_scores_brx is None


@functools.lru_cache(maxsize=None)
def _loss_and_grads(neg):
  model = MSAModel(SMOKE)
  cfg = _cfg(neg)

  def step(params, batch):   # router warm-up: LM weight 0, the loss is the aux loss
    fn = lambda p: compute_losses(model, p, batch, jnp.int32(0), cfg)
    (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(params)
    return loss, metrics, grads
  return jax.jit(step)


def test_loss_is_infonce_over_the_batch_and_reaches_the_router():
  batch = _batch(5, b=3, n=4)
  positive = np.zeros((3, 4), bool)
  positive[[0, 1, 2], [1, 2, 0]] = True
  mask = np.asarray(batch.doc_mask).copy()
  mask[:, :, 0] = True                         # every gold document has a token
  tokens = np.asarray(batch.doc_tokens).copy()
  tokens[1, 3], mask[1, 3] = tokens[0, 1], mask[0, 1]   # example 1 holds example 0's gold
  batch = dataclasses.replace(batch, positive_docs=positive, doc_mask=mask, doc_tokens=tokens)
  params = R.init_model(SMOKE, batch, seed=5)[1]["params"]
  loss, metrics, grads = _loss_and_grads(True)(params, batch)
  out = _forward(SMOKE, 0.0)({"params": params}, batch, True)
  layers = list(aux_loss_layers(SMOKE))
  valid = np.asarray(losses.doc_valid(mask))
  want_pos, want_ok = _targets_numpy(positive, valid, tokens, mask)
  want, pairs = R.infonce_decoupled(np.asarray(out.batch_scores_brx)[:, layers], want_pos,
                                    want_ok)
  np.testing.assert_allclose(float(metrics["aux_loss"]), want, rtol=1e-5)
  assert float(metrics["routing_pairs"]) == pairs == 3 * len(layers)
  usual_loss, usual_metrics, _ = _loss_and_grads(False)(params, batch)
  assert float(loss) > float(usual_loss) + 1e-3   # more negatives, a larger loss here
  g = np.asarray(grads[f"layers_{SMOKE.router_layer_ids[-1]}"]["router_q_proj"]["kernel"])
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  # One example: its own documents are the whole batch, the usual loss.
  one = jax.tree.map(lambda a: np.asarray(a)[:1], batch)
  one_loss = _loss_and_grads(True)(params, one)[0]
  np.testing.assert_allclose(float(one_loss), float(_loss_and_grads(False)(params, one)[0]),
                             rtol=1e-6)
