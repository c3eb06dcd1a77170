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
