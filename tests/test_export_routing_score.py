"""``routing_score``: cosine (SPEC §3, default) or the released engine's scaled dot product.

The authors' inference engine (EverMind-AI/MSA, ``aux_loss_method="INFONCE_DECOUPLE"``)
normalises neither the routing query nor the pooled router keys and multiplies the query by
``1/sqrt(D)``. The reference below is that formula in float64 numpy, written from the issue
text; the model with ``routing_score="scaled_dot"`` must match it end to end.
"""
import jax
import numpy as np
import pytest

from msa_jax import routing
from msa_jax.config import ModelConfig

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()


def engine_score(rq_thd, kr_chunks_cgd, route_t):
  """``max_c max_t mean_h (RQ[t,h] / sqrt(D)) · K̄R[c, h // (H/Hkv)]``, K̄R the raw chunk mean."""
  h, d = rq_thd.shape[1:]
  r = h // kr_chunks_cgd.shape[1]
  tokens = np.nonzero(route_t)[0]
  if tokens.size == 0:
    return -np.inf
  q = rq_thd / np.sqrt(d)
  return max(np.mean([q[t, hh] @ kr_chunks_cgd[c, hh // r] for hh in range(h)])
             for c in range(kr_chunks_cgd.shape[0]) for t in tokens)


def _config(routing_score):
  return ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=8, router_layers=(1, 2),
                     pooling_chunk_size=3, top_k=2, initializer_range=0.3,
                     routing_score=routing_score)


def _batch(seed=0):
  return R.make_batch(np.random.default_rng(seed), vocab=40, prefix_lens=[2, 0],
                      doc_lens=[[5, 0, 7, 2, 4], [4, 4, 0, 1, 0]], active_lens=[6, 4],
                      question_lens=[3, 2])


def test_scores_of_the_pure_functions_match_the_engine_formula():
  rng = np.random.default_rng(0)
  b, m, h, g, d, c = 2, 3, 4, 2, 8, 5
  rq = rng.normal(size=(b, m, h, d)) * 3.0
  kr = rng.normal(size=(c, g, d)) * 2.0
  mask = np.array([[True, True, False], [False, True, True]])
  rq_bmf = routing.group_sum_queries(rq.astype(np.float32), g, "scaled_dot")
  kr_cf = routing.router_keys(kr.astype(np.float32), "scaled_dot").reshape(c, g * d)
  got = np.asarray(routing.chunk_scores(rq_bmf, mask, kr_cf))
  for bb in range(b):
    for cc in range(c):
      want = engine_score(rq[bb], kr[cc:cc + 1], mask[bb])
      np.testing.assert_allclose(got[bb, cc], want, rtol=1e-5)
  # cosine on the same inputs is bounded by 1 and differs.
  cos = np.asarray(routing.chunk_scores(routing.group_sum_queries(rq.astype(np.float32), g),
                                        mask, routing.router_keys(kr.astype(np.float32))
                                        .reshape(c, g * d)))
  assert np.all(np.abs(cos) <= 1 + 1e-6) and np.max(np.abs(got)) > 1.5


@pytest.mark.parametrize("routing_score", ["cosine", "scaled_dot"])
def test_model_forward_matches_reference_for_each_routing_score(routing_score, monkeypatch):
  """Logits, per-layer document scores and selections of the training forward."""
  if routing_score == "scaled_dot":
    monkeypatch.setattr(R, "routing_score", engine_score)
  cfg = _config(routing_score)
  batch = _batch()
  model, variables = R.init_model(cfg, batch, 3)
  out = jax.jit(model.apply)(variables, batch)
  ref = R.msa_forward(R.to_numpy_params(variables), cfg, batch)
  for b, r in enumerate(ref):
    am = np.asarray(batch.active_mask[b], bool)
    assert R.rel_err(np.asarray(out.logits_bmv[b])[am], r["logits"]) < 1e-5, b
    for j, layer in enumerate(cfg.router_layer_ids):
      scores = np.asarray(out.doc_scores_brn[b, j])
      for slot, s in r["scores"][layer].items():
        np.testing.assert_allclose(scores[slot], s, rtol=1e-5, atol=1e-6)
      sel = np.asarray(out.selected_brk[b, j])[np.asarray(out.selected_valid_brk[b, j])]
      np.testing.assert_array_equal(sel, r["selected"][layer])


def test_scaled_dot_changes_the_scores_of_the_same_params():
  batch = _batch(1)
  model, variables = R.init_model(_config("cosine"), batch, 5)
  cos = jax.jit(model.apply)(variables, batch).doc_scores_brn
  dot = jax.jit(type(model)(_config("scaled_dot")).apply)(variables, batch).doc_scores_brn
  finite = np.isfinite(np.asarray(cos))
  np.testing.assert_array_equal(finite, np.isfinite(np.asarray(dot)))
  assert not np.allclose(np.asarray(cos)[finite], np.asarray(dot)[finite], atol=1e-3)


def test_unknown_routing_score_is_a_clear_error():
  with pytest.raises(ValueError, match=r"routing_score must be 'cosine'.*'scaled_dot'.*'dot'"):
    _config("dot")
  with pytest.raises(ValueError, match="set ModelConfig.routing_score"):
    routing.router_keys(np.ones((2, 4), np.float32), "dot")
