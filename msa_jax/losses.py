"""Training objective (SPEC §4): LM cross entropy and the decoupled InfoNCE routing loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp

_BIG_NEG = -1e30


def lm_loss(logits_bmv, targets_bm, loss_mask_bm):
  """Mean next-token cross entropy over the target positions.

  Returns ``(loss, num_target_tokens)``; the loss is 0 when there is no target.
  """
  logp = jax.nn.log_softmax(logits_bmv.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_bm[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = jnp.asarray(loss_mask_bm, jnp.float32)
  count = jnp.sum(w)
  return jnp.sum(nll * w) / jnp.maximum(count, 1.0), count


def next_token_target_mask(mask_bl):
  """Which positions of token rows ``[..., L]`` are next-token targets inside each row: a
  valid token that follows a valid one (``[..., L-1]``, aligned with ``tokens[..., 1:]``).
  The document LM loss's targets (``train_step.doc_lm_loss``), also counted by
  ``microbatch.doc_lm_targets``."""
  mask = jnp.asarray(mask_bl, bool)
  return mask[..., 1:] & mask[..., :-1]


def lm_loss_chunked(hidden_bmd, head_vd, targets_bm, loss_mask_bm, chunk_size: int = 64):
  """:func:`lm_loss` from final hidden states, never forming ``[B, M, vocab]`` logits.

  Returns ``(loss, num_target_tokens)``; :func:`lm_nll_rows_chunked` computes it, with
  each row's summed NLL.
  """
  return mean_nll(*lm_nll_rows_chunked(hidden_bmd, head_vd, targets_bm, loss_mask_bm,
                                       chunk_size))


def mean_nll(nll_b, count_b, rows_b=None):
  """``(mean NLL per target token, target count)`` over the rows ``rows_b`` (bool ``[B]``;
  None: all) from per-row sums and counts; the mean is 0 when there is no target."""
  if rows_b is not None:
    nll_b, count_b = jnp.where(rows_b, nll_b, 0.0), jnp.where(rows_b, count_b, 0.0)
  count = jnp.sum(count_b)
  return jnp.sum(nll_b) / jnp.maximum(count, 1.0), count


def lm_nll_rows_chunked(hidden_bmd, head_vd, targets_bm, loss_mask_bm, chunk_size: int = 64):
  """Each row's summed next-token NLL over its target positions, and its target count.

  Each row's target positions are moved to its front (a stable sort, so the sum is
  over the same positions), then a scan over chunks of ``chunk_size``
  positions computes ``logsumexp`` and the target logit from ``hidden @ head_vd.T``
  (float32 accumulation); chunks past the longest row's target count are skipped
  (``lax.cond``), so the LM head costs ``B x ceil(max targets / chunk) x chunk`` rows,
  not ``B x M``. The backward (a ``custom_vjp``) recomputes each chunk's logits, so
  peak memory is one chunk's ``[B, chunk_size, vocab]`` float32 logits plus a float32
  head gradient, in the forward and the backward.

  Args:
    hidden_bmd: ``[B, M, D]`` after the final norm (``MSAModel.forward_train``).
    head_vd: the LM head ``[vocab, D]`` (``model.lm_head_weight_vd``).
    targets_bm, loss_mask_bm: as in :func:`lm_loss`.
    chunk_size: positions per chunk (per example).
  Returns float32 ``(nll_b, count_b)``, both ``[B]``; a row without targets has 0, 0.
  """
  if chunk_size < 1:
    raise ValueError(f"LM loss chunk size must be >= 1, got {chunk_size}; set "
                     "--config.loss.lm_chunk_size")
  b, m, d = hidden_bmd.shape
  mask_bm = jnp.asarray(loss_mask_bm, bool)
  order_bm = jnp.argsort(~mask_bm, axis=-1, stable=True)   # targets first, in order
  take = lambda x: jnp.take_along_axis(x, order_bm.reshape(order_bm.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
  h_bmd, t_bm = take(hidden_bmd), take(jnp.asarray(targets_bm, jnp.int32))
  w_bm = take(mask_bm).astype(jnp.float32)
  chunk = min(chunk_size, m)
  nc = -(-m // chunk)
  pad = nc * chunk - m
  if pad:
    h_bmd = jnp.pad(h_bmd, ((0, 0), (0, pad), (0, 0)))
    t_bm, w_bm = jnp.pad(t_bm, ((0, 0), (0, pad))), jnp.pad(w_bm, ((0, 0), (0, pad)))
  per_chunk = lambda x: jnp.moveaxis(x.reshape(b, nc, chunk, *x.shape[2:]), 1, 0)
  longest = jnp.max(jnp.sum(mask_bm, axis=-1))

  live_n = jnp.arange(nc) * chunk < longest   # chunks holding any row's target
  nll_b = _chunked_nll(per_chunk(h_bmd), head_vd, per_chunk(t_bm), per_chunk(w_bm), live_n)
  return nll_b, jnp.sum(mask_bm.astype(jnp.float32), axis=-1)


def _chunk_logits(h_bcd, head_vd):
  return jnp.einsum("bcd,vd->bcv", h_bcd, head_vd, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _chunked_nll(h_nbcd, head_vd, t_nbc, w_nbc, live_n):
  """Per row ``b``: ``sum w (logsumexp(h @ head.T) - h . head[t])`` over chunks ``n`` and
  their positions (float32 ``[B]``); chunks with ``live_n`` False are skipped (they hold
  no target)."""
  return _chunked_nll_fwd(h_nbcd, head_vd, t_nbc, w_nbc, live_n)[0]


def _chunked_nll_fwd(h_nbcd, head_param_vd, t_nbc, w_nbc, live_n):
  head_vd = head_param_vd.astype(h_nbcd.dtype)   # the compute dtype, as the model's own LM head

  def one(h_bcd, t_bc, w_bc):
    lse = jax.nn.logsumexp(_chunk_logits(h_bcd, head_vd), axis=-1)
    target = jnp.einsum("bcd,bcd->bc", h_bcd, head_vd[t_bc], preferred_element_type=jnp.float32)
    return jnp.sum((lse - target) * w_bc, axis=-1), lse

  def skip(h_bcd, t_bc, w_bc):
    return jnp.zeros(t_bc.shape[:1], jnp.float32), jnp.zeros(t_bc.shape, jnp.float32)

  def body(total, xs):
    live, h_bcd, t_bc, w_bc = xs
    nll, lse = jax.lax.cond(live, one, skip, h_bcd, t_bc, w_bc)
    return total + nll, lse

  total, lse_nbc = jax.lax.scan(body, jnp.zeros(t_nbc.shape[1:2], jnp.float32),
                                (live_n, h_nbcd, t_nbc, w_nbc))
  # Kept for the backward: the inputs and the per-position logsumexp ([n, B, chunk]).
  return total, (h_nbcd, head_param_vd, t_nbc, w_nbc, live_n, lse_nbc)


def _chunked_nll_bwd(res, g):
  """One chunk at a time: recompute the logits, ``d logits = g w (softmax - onehot)``;
  the head gradient accumulates in the scan carry, so only one chunk's
  ``[B, chunk, vocab]`` softmax exists and nothing per chunk of head size is stacked."""
  h_nbcd, head_param_vd, t_nbc, w_nbc, live_n, lse_nbc = res
  head_vd = head_param_vd.astype(h_nbcd.dtype)

  def one(dhead_vd, h_bcd, t_bc, w_bc, lse_bc):
    gw_bc = g[:, None] * w_bc   # g: the cotangent of each row's total
    probs = jnp.exp(_chunk_logits(h_bcd, head_vd) - lse_bc[..., None])
    dlogits = (probs * gw_bc[..., None]).astype(h_bcd.dtype)
    dh = (jnp.einsum("bcv,vd->bcd", dlogits, head_vd, preferred_element_type=jnp.float32)
          - gw_bc[..., None] * head_vd[t_bc].astype(jnp.float32))
    dhead_vd = dhead_vd + jnp.einsum("bcv,bcd->vd", dlogits, h_bcd,
                                     preferred_element_type=jnp.float32)
    dhead_vd = dhead_vd.at[t_bc].add(-gw_bc[..., None] * h_bcd.astype(jnp.float32))
    return dhead_vd, dh.astype(h_bcd.dtype)

  def skip(dhead_vd, h_bcd, t_bc, w_bc, lse_bc):
    return dhead_vd, jnp.zeros_like(h_bcd)

  def body(dhead_vd, xs):
    live, h_bcd, t_bc, w_bc, lse_bc = xs
    return jax.lax.cond(live, one, skip, dhead_vd, h_bcd, t_bc, w_bc, lse_bc)

  dhead_vd, dh_nbcd = jax.lax.scan(body, jnp.zeros(head_vd.shape, jnp.float32),
                                   (live_n, h_nbcd, t_nbc, w_nbc, lse_nbc))
  # The head gradient stays float32 until it meets the parameter's dtype.
  return dh_nbcd, dhead_vd.astype(head_param_vd.dtype), None, jnp.zeros_like(w_nbc), None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def infonce_decoupled(doc_scores_brn, positive_bn, doc_valid_bn, temperature: float = 0.1):
  """Supervised contrastive routing loss with the other positives left out.

  ``L = -(1/|Pos|) Σ_{i∈Pos} log(e^{s_i/τ} / (e^{s_i/τ} + Σ_{j∉Pos} e^{s_j/τ}))`` per
  (example, router layer), averaged over the pairs whose example has a positive.
  Padding documents take no part. Returns ``(loss, number_of_pairs)``.
  """
  pos = jnp.asarray(positive_bn, bool) & jnp.asarray(doc_valid_bn, bool)
  neg = jnp.asarray(doc_valid_bn, bool) & ~pos
  pos_brn = jnp.broadcast_to(pos[:, None, :], doc_scores_brn.shape)
  neg_brn = jnp.broadcast_to(neg[:, None, :], doc_scores_brn.shape)
  finite = jnp.isfinite(doc_scores_brn)
  logits = jnp.where(finite, doc_scores_brn.astype(jnp.float32), 0.0) / temperature
  neg_lse = jax.nn.logsumexp(jnp.where(neg_brn & finite, logits, _BIG_NEG), axis=-1,
                             keepdims=True)
  per_pos = -(logits - jnp.logaddexp(logits, neg_lse))
  pos_w = (pos_brn & finite).astype(jnp.float32)
  n_pos = jnp.sum(pos_w, axis=-1)
  per_pair = jnp.sum(per_pos * pos_w, axis=-1) / jnp.maximum(n_pos, 1.0)
  has_pos = (n_pos > 0).astype(jnp.float32)
  pairs = jnp.sum(has_pos)
  return jnp.sum(per_pair * has_pos) / jnp.maximum(pairs, 1.0), pairs


# Odd multipliers of the two document fingerprints (uint32 arithmetic wraps).
_FINGERPRINT_SEEDS = (0x9E3779B1, 0x85EBCA77)


def _doc_fingerprints(doc_tokens_bnl, doc_mask_bnl):
  """Two uint32 ``[B, N]`` hashes of each document's tokens (position-weighted sums):
  equal documents get equal pairs; unequal ones rarely share both (a collision would only
  leave one negative out of the loss, never make a wrong positive)."""
  tok = jnp.asarray(doc_tokens_bnl).astype(jnp.uint32) + jnp.uint32(1)
  mask = jnp.asarray(doc_mask_bnl, bool)
  pos = jnp.arange(tok.shape[-1], dtype=jnp.uint32)
  out = []
  for seed in _FINGERPRINT_SEEDS:
    w = (pos + jnp.uint32(1)) * jnp.uint32(seed) ^ jnp.uint32(seed >> 7)
    weighted = tok * (w | jnp.uint32(1))[None, None]
    out.append(jnp.sum(jnp.where(mask, weighted, jnp.uint32(0)), axis=-1, dtype=jnp.uint32))
  return out


def batch_negative_targets(positive_bn, doc_valid_bn, doc_tokens_bnl, doc_mask_bnl):
  """Positives and candidates of the routing loss over every document of the batch
  (``loss.aux_batch_negatives``; scores ``[B, R, B*N]``, example-major).

  Row ``b``'s positives are its own gold documents (block ``b``); its candidates are every
  valid document of the batch, except another example's copy of one of its gold
  documents (same tokens: e.g. the retrieval and answer samples of one question share
  their memory), which is neither positive nor negative. Returns bool ``(pos_bx, valid_bx)``.
  """
  b, n = jnp.shape(positive_bn)
  pos = jnp.asarray(positive_bn, bool) & jnp.asarray(doc_valid_bn, bool)
  own_bx = jnp.eye(b, dtype=bool)[:, :, None].repeat(n, axis=2).reshape(b, b * n)
  pos_bx = own_bx & jnp.tile(pos, (1, b))
  h1, h2 = _doc_fingerprints(doc_tokens_bnl, doc_mask_bnl)
  same_bnx = ((h1[:, :, None] == h1.reshape(1, 1, b * n))
              & (h2[:, :, None] == h2.reshape(1, 1, b * n)))
  gold_copy_bx = jnp.any(pos[:, :, None] & same_bnx, axis=1) & ~own_bx
  valid_bx = jnp.asarray(doc_valid_bn, bool).reshape(1, b * n) & ~gold_copy_bx
  return pos_bx, valid_bx


EVIDENCE_MAX_QUERY = 32   # longest routing query matched verbatim by evidence_chunks


def evidence_chunks(doc_tokens_bnl, doc_mask_bnl, query_tokens_bm, query_mask_bm, positive_bn,
                    chunk_size: int):
  """bool ``[B, N, C]``: the chunks of each positive document that hold the routing query
  verbatim (all its tokens, in order, contiguous), ``C = ceil(L / P)`` as the pooling's.

  The chunk-level routing loss's positives: in the reading task a retrieval question is a
  key, and the chunk(s) holding that key, not the document's other facts, are what the
  router should find. An example whose query is longer than ``EVIDENCE_MAX_QUERY`` tokens,
  or appears in none of its positive documents, has no evidence chunk.
  """
  doc = jnp.asarray(doc_tokens_bnl, jnp.int32)
  dmask = jnp.asarray(doc_mask_bnl, bool)
  qmask = jnp.asarray(query_mask_bm, bool)
  b, n, l = doc.shape
  w = min(qmask.shape[1], EVIDENCE_MAX_QUERY)
  qlen = jnp.sum(qmask, axis=1)
  order = jnp.argsort(~qmask, axis=1, stable=True)       # the query's tokens, left-aligned
  query = jnp.take_along_axis(jnp.asarray(query_tokens_bm, jnp.int32), order, axis=1)
  match = jnp.broadcast_to(((qlen > 0) & (qlen <= w))[:, None, None], (b, n, l))
  for i in range(w):                                     # query token i at document t + i
    tok = jnp.pad(doc[..., i:], ((0, 0), (0, 0), (0, i)), constant_values=-1)
    ok = jnp.pad(dmask[..., i:], ((0, 0), (0, 0), (0, i))) & (tok == query[:, i, None, None])
    match = match & (ok | (i >= qlen)[:, None, None])
  cover = jnp.zeros((b, n, l), bool)
  for i in range(w):                                     # tokens t .. t + qlen - 1 of a match
    shifted = jnp.pad(match[..., :l - i], ((0, 0), (0, 0), (i, 0))) if i else match
    cover = cover | (shifted & (i < qlen)[:, None, None])
  c = -(-l // chunk_size)
  cover = jnp.pad(cover, ((0, 0), (0, 0), (0, c * chunk_size - l)))
  return cover.reshape(b, n, c, chunk_size).any(-1) & jnp.asarray(positive_bn, bool)[..., None]


def chunk_infonce(chunk_scores_brnc, evidence_bnc, chunk_valid_bnc, temperature: float = 0.1):
  """:func:`infonce_decoupled` over chunks: each evidence chunk against every other valid
  chunk of the example's memory (the positive document's other chunks included).
  Returns ``(loss, number of (example, layer) pairs with an evidence chunk)``."""
  b, r, n, c = chunk_scores_brnc.shape
  return infonce_decoupled(chunk_scores_brnc.reshape(b, r, n * c), evidence_bnc.reshape(b, n * c),
                           jnp.asarray(chunk_valid_bnc, bool).reshape(b, n * c), temperature)


def recall_at_k(doc_scores_brn, positive_bn, doc_valid_bn, k: int):
  """Per example and router layer, ``|Pos ∩ top-K scored valid documents| / |Pos|``: ``[B, R]``.

  Documents scored ``-inf`` (padding, or no routing token) are never in the top K;
  an example without a positive gets 0.
  """
  pos = jnp.asarray(positive_bn, bool) & jnp.asarray(doc_valid_bn, bool)
  n_pos_b = jnp.sum(pos, axis=-1).astype(jnp.float32)
  valid = jnp.asarray(doc_valid_bn, bool)[:, None, :]
  scores = jnp.where(valid & jnp.isfinite(doc_scores_brn), doc_scores_brn, -jnp.inf)
  top_val, top_idx = jax.lax.top_k(scores, min(k, scores.shape[-1]))
  hit = jnp.take_along_axis(jnp.broadcast_to(pos[:, None, :], scores.shape), top_idx, axis=-1)
  hit = hit & (top_val > -jnp.inf)
  return jnp.sum(hit, axis=-1) / jnp.maximum(n_pos_b[:, None], 1.0)


def router_metrics(doc_scores_brn, selected_brk, selected_valid_brk, positive_bn, doc_valid_bn,
                   ks=(1, 5, 10)):
  """Router recall@K (gold documents among the K best scored) and precision@k.

  Recall@K = |Pos ∩ topK| / |Pos|; precision@k = |Pos ∩ selected| / |selected|,
  each averaged over the examples that have a positive. Returns a dict of
  per-layer arrays ``[R]`` (keys ``recall@K``, ``precision@k``).
  """
  pos = jnp.asarray(positive_bn, bool) & jnp.asarray(doc_valid_bn, bool)
  has_pos = jnp.any(pos, axis=-1).astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(has_pos), 1.0)
  n = doc_scores_brn.shape[-1]
  out = {}
  for k in ks:
    recall_br = recall_at_k(doc_scores_brn, positive_bn, doc_valid_bn, k)
    out[f"recall@{k}"] = jnp.sum(recall_br * has_pos[:, None], axis=0) / denom
  sel_pos = jnp.take_along_axis(jnp.broadcast_to(pos[:, None, :], doc_scores_brn.shape[:2] + (n,)),
                                selected_brk, axis=-1) & selected_valid_brk
  n_sel = jnp.maximum(jnp.sum(selected_valid_brk, axis=-1), 1)
  prec_br = jnp.sum(sel_pos, axis=-1) / n_sel
  out["precision@k"] = jnp.sum(prec_br * has_pos[:, None], axis=0) / denom
  return out


def doc_valid(doc_mask_bnl):
  """A document slot is valid when it holds at least one token."""
  return jnp.any(jnp.asarray(doc_mask_bnl, bool), axis=-1)
