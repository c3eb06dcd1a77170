"""The chunk-level routing loss: its positives (the chunks holding the routing query
verbatim), its InfoNCE, and its place in the training step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import losses, routing


def _evidence_reference(docs, dmask, query, positive, p):
  """Plain Python: chunks of positive documents overlapping a verbatim run of the query."""
  b, n, l = docs.shape
  c = -(-l // p)
  out = np.zeros((b, n, c), bool)
  for bi in range(b):
    q = list(query[bi])
    for ni in range(n):
      if not positive[bi, ni] or not q:
        continue
      toks = [int(t) for t, m in zip(docs[bi, ni], dmask[bi, ni]) if m]
      for t in range(len(toks) - len(q) + 1):
        if toks[t:t + len(q)] == q:
          for u in range(t, t + len(q)):
            out[bi, ni, u // p] = True
  return out


def test_evidence_chunks_match_the_query_verbatim():
  rng = np.random.default_rng(0)
  b, n, l, p, m = 3, 4, 20, 4, 6
  docs = rng.integers(10, 14, (b, n, l)).astype(np.int32)      # few symbols: many near misses
  dmask = np.ones((b, n, l), bool)
  dmask[:, 3, 15:] = False                                        # a shorter document
  queries = [[50, 51, 52], [60, 61], []]                          # example 2: no routing token
  docs[0, 1, 6:9] = [50, 51, 52]                                  # straddles chunks 1 and 2
  docs[0, 2, 0:3] = [50, 51, 52]                                  # not a positive document
  docs[1, 3, 14:16] = [60, 61]                                    # the 2nd token is padding
  docs[1, 0, 18:20] = [60, 61]                                    # the slot's last tokens
  tokens = np.zeros((b, m), np.int32)
  qmask = np.zeros((b, m), bool)
  for i, q in enumerate(queries):
    tokens[i, 1:1 + len(q)] = q                                   # not left-aligned
    qmask[i, 1:1 + len(q)] = True
  positive = np.array([[0, 1, 0, 0], [1, 0, 0, 1], [1, 0, 0, 0]], bool)
  got = np.asarray(losses.evidence_chunks(docs, dmask, tokens, qmask, positive, p))
  want = _evidence_reference(docs, dmask, [[50, 51, 52], [60, 61], []], positive, p)
  np.testing.assert_array_equal(got, want)
  assert got[0, 1].tolist() == [False, True, True, False, False]
  assert not got[0, 2].any() and not got[1, 3].any() and got[1, 0, 4] and not got[2].any()


def test_chunk_infonce_is_the_document_loss_over_chunks():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  valid = rng.random((2, 4, 5)) > 0.2
  ev = np.zeros((2, 4, 5), bool)
  ev[0, 1, 2] = valid[0, 1, 2] = True
  loss, pairs = losses.chunk_infonce(jnp.asarray(s), jnp.asarray(ev), jnp.asarray(valid), 0.5)
  assert float(pairs) == 3                                        # example 1 has no evidence
  logits = s[0, :, valid[0]] / 0.5                                 # [valid chunks, layers]
  pos = np.flatnonzero(ev[0][valid[0]])[0]
  want = np.mean([-(logits[pos, r] - np.log(np.exp(logits[:, r]).sum())) for r in range(3)])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_hard_chunk_scores_are_the_chunk_scores():
  rng = np.random.default_rng(2)
  rq = jnp.asarray(rng.normal(size=(2, 3, 8)).astype(np.float32))
  kr = jnp.asarray(rng.normal(size=(2, 4, 2, 8)).astype(np.float32))
  qmask = jnp.array([[True, True, False], [False, False, False]])
  cmask = jnp.asarray(rng.random((2, 4, 2)) > 0.3)
  got = np.asarray(routing.hard_chunk_scores(routing.pair_scores(rq, kr), qmask, cmask))
  want = np.asarray(routing.chunk_scores(rq[:1], qmask[:1], kr[0].reshape(8, 8))).reshape(4, 2)
  m0 = np.asarray(cmask[0])
  np.testing.assert_allclose(got[0][m0], want[m0], rtol=1e-6)
  assert np.all(np.isneginf(got[0][~m0])) and np.all(np.isneginf(got[1]))


@pytest.mark.parametrize("scan", [False, True])
def test_training_step_adds_the_chunk_loss_only_when_asked(scan):
  """``loss.aux_chunk_weight``: 0 leaves the loss as before (no chunk scores computed);
  > 0 adds the chunk InfoNCE at the aux weight (its pairs counted: the smoke questions'
  keys sit verbatim in their gold documents) and its gradient reaches the router."""
  from msa_jax.model import MSAModel
  from msa_jax.train_step import compute_losses
  from tests.test_router_aux_softmax import SMOKE, _case, _train_cfg
  batch, params = _case()
  # plant each example's question (its routing tokens) in a positive document, mid-slot
  docs = np.array(batch.doc_tokens)
  planted = 0
  for b in range(docs.shape[0]):
    q = np.asarray(batch.active_tokens)[b][np.asarray(batch.question_mask)[b]]
    for n in np.flatnonzero(np.asarray(batch.positive_docs)[b]):
      if np.asarray(batch.doc_mask)[b, n].sum() >= len(q) + 2:
        docs[b, n, 2:2 + len(q)] = q
        planted += 1
        break
  assert planted
  batch = batch.replace(doc_tokens=jnp.asarray(docs))
  model = MSAModel(SMOKE.replace(scan_layers=scan))
  cfg = _train_cfg()
  base, m0 = jax.jit(lambda p: compute_losses(model, p, batch, jnp.int32(0), cfg))(params)
  assert "chunk_aux_loss" not in m0
  cfg.loss.aux_chunk_weight = 0.5

  def loss(p):
    return compute_losses(model, p, batch, jnp.int32(0), cfg)
  (total, m1), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert float(m1["chunk_routing_pairs"]) > 0 and float(m1["chunk_aux_loss"]) > 0
  np.testing.assert_allclose(float(total), float(base) + 0.5 * float(m1["aux_weight"])
                             * float(m1["chunk_aux_loss"]), rtol=1e-5)
  top = f"layers_{SMOKE.num_layers - 1}"
  assert float(jnp.max(jnp.abs(grads[top]["router_k_proj"]["kernel"]))) > 0


def test_the_chunk_weight_refuses_negatives():
  from msa_jax.train_step import aux_chunk_weight
  from tests.test_router_aux_softmax import _train_cfg
  cfg = _train_cfg()
  assert aux_chunk_weight(cfg) == 0.0
  cfg.loss.aux_chunk_weight = -1.0
  with pytest.raises(ValueError, match="loss.aux_chunk_weight"):
    aux_chunk_weight(cfg)
