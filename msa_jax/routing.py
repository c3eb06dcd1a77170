"""Document routing (SPEC §3 steps 2-3) as pure functions.

Routing is a function of (routing queries, pooled router keys, chunk→document
map). Nothing here knows about the model: the training forward, the inference
engine, a Pallas kernel (``pallas_kernels.block_routing``) or a ``shard_map``
over a chunk-sharded bank all call or replace these functions.

Names: ``F = Hkv * D`` (one routing dot product per (token, chunk), thanks to
the group-sum identity), ``C`` chunks, ``N`` documents.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """Unit-norm ``x`` over ``axis`` in float32 (a zero vector stays zero)."""
  x = x.astype(jnp.float32)
  norm_sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(norm_sq, eps * eps))


ROUTING_SCORES = ("cosine", "scaled_dot")


def _check_routing_score(routing_score: str) -> None:
  if routing_score not in ROUTING_SCORES:
    raise ValueError(f"routing_score must be one of {ROUTING_SCORES}, got {routing_score!r}; "
                     "set ModelConfig.routing_score")


def routing_queries(rq_bmhd, routing_score: str = "cosine"):
  """Per-head routing queries in float32, as the score ``routing_score`` wants them.

  ``"cosine"`` (SPEC §3, the paper, the authors' training forward): unit norm
  over D. ``"scaled_dot"`` (what the authors' released inference engine computes
  for ``aux_loss_method="INFONCE_DECOUPLE"``): the raw projection times
  ``1/sqrt(D)``, not normalised.
  """
  _check_routing_score(routing_score)
  if routing_score == "cosine":
    return l2_normalize(rq_bmhd)
  return rq_bmhd.astype(jnp.float32) * (rq_bmhd.shape[-1] ** -0.5)


def router_keys(pooled_rk, routing_score: str = "cosine"):
  """Pooled router keys ``K̄R`` (per kv head, ``[..., D]``) as the score wants them.

  ``"cosine"``: unit norm over D; ``"scaled_dot"``: the chunk means as they are.
  """
  _check_routing_score(routing_score)
  if routing_score == "cosine":
    return l2_normalize(pooled_rk)
  return pooled_rk.astype(jnp.float32)


def group_sum_queries(rq_bmhd, num_kv_heads: int, routing_score: str = "cosine"):
  """Prepare router queries (:func:`routing_queries`) and fold the head mean into one vector.

  ``mean_h RQ[t,h]·K̄R[c,g(h)] = (1/H) Σ_g K̄R[c,g]·Σ_{h∈g} RQ[t,h]``, so the
  returned ``[B, M, Hkv*D]`` vector, dotted with a flattened ``K̄R[c]``, is the
  head-mean score of SPEC §3 (cosine, or the released engine's scaled dot
  product with ``routing_score="scaled_dot"``).

  Args:
    rq_bmhd: raw ``router_q_proj`` outputs, ``[B, M, H, D]``.
    num_kv_heads: Hkv; H must be a multiple of it.
    routing_score: ``"cosine"`` or ``"scaled_dot"``; the keys must come from
      :func:`router_keys` with the same value.
  Returns:
    float32 ``[B, M, Hkv*D]``, already divided by H.
  """
  b, m, h, d = rq_bmhd.shape
  if h % num_kv_heads:
    raise ValueError(f"{h} query heads are not a multiple of {num_kv_heads} kv heads")
  rq = routing_queries(rq_bmhd, routing_score)
  rq_bmgrd = rq.reshape(b, m, num_kv_heads, h // num_kv_heads, d)
  return (rq_bmgrd.sum(axis=3) / h).reshape(b, m, num_kv_heads * d)


def chunk_scores(rq_bmf, query_mask_bm, kr_cf):
  """Per-chunk routing scores: max over the routing tokens of ``rq · K̄R``.

  Args:
    rq_bmf: group-summed queries from :func:`group_sum_queries`, ``[B, M, F]``.
    query_mask_bm: which tokens route (question tokens, padding excluded).
    kr_cf: pooled router keys from :func:`router_keys`, flattened per chunk, ``[C, F]``.
  Returns:
    float32 ``[B, C]``; ``-inf`` for an example with no routing token.
  """
  s_bmc = jnp.einsum("bmf,cf->bmc", rq_bmf.astype(jnp.float32),
                     kr_cf.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  s_bmc = jnp.where(query_mask_bm[:, :, None], s_bmc, NEG_INF)
  return jnp.max(s_bmc, axis=1)


def document_scores(chunk_scores_bc, chunk_doc_c, num_docs: int):
  """A document's score is the max over its chunks (SPEC §3 step 2).

  Args:
    chunk_scores_bc: ``[B, C]`` from :func:`chunk_scores`.
    chunk_doc_c: int ``[C]`` document index of each chunk; ``-1`` marks a
      padding chunk (ignored).
    num_docs: N, the number of document slots.
  Returns:
    float32 ``[B, N]``; ``-inf`` for a document with no chunk.
  """
  # A segment id of num_docs collects padding chunks and is dropped.
  seg_c = jnp.where(chunk_doc_c < 0, num_docs, chunk_doc_c)
  per_doc = jax.vmap(lambda s: jax.ops.segment_max(s, seg_c, num_segments=num_docs + 1))(
      chunk_scores_bc)
  return per_doc[:, :num_docs]


def pair_scores(rq_bmf, kr_bncf):
  """float32 ``[B, M, N, C]``: ``rq · K̄R`` of every (routing token, chunk) pair of each
  example's own documents (training layout), at HIGHEST precision as :func:`chunk_scores`."""
  return jnp.einsum("bmf,bncf->bmnc", rq_bmf.astype(jnp.float32), kr_bncf.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def batch_pair_scores(rq_bmf, kr_xcf):
  """float32 ``[B, M, X, C]``: ``rq · K̄R`` of each example's routing tokens against every
  chunk of ``X`` documents shared by the batch (the routing loss's in-batch negatives:
  ``X = B·N``, every example's documents), at HIGHEST precision as :func:`pair_scores`."""
  return jnp.einsum("bmf,xcf->bmxc", rq_bmf.astype(jnp.float32), kr_xcf.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def _valid_pairs(query_mask_bm, chunk_mask_bnc):
  """bool ``[B, M, N, C]``: routing token ``m`` and chunk ``(n, c)`` both present."""
  return (jnp.asarray(query_mask_bm, bool)[:, :, None, None]
          & jnp.asarray(chunk_mask_bnc, bool)[:, None])


def hard_chunk_scores(s_bmnc, query_mask_bm, chunk_mask_bnc):
  """float32 ``[B, N, C]``: each chunk's max of :func:`pair_scores` over the routing tokens
  (:func:`chunk_scores` in the training layout), ``-inf`` for a missing chunk or an
  example without a routing token."""
  return jnp.max(jnp.where(_valid_pairs(query_mask_bm, chunk_mask_bnc), s_bmnc, NEG_INF), axis=1)


def hard_document_scores(s_bmnc, query_mask_bm, chunk_mask_bnc):
  """float32 ``[B, N]``: the max of :func:`pair_scores` over a document's valid (routing
  token, chunk) pairs, ``-inf`` where there is none: :func:`chunk_scores` then
  :func:`document_scores` for the training layout, from scores already computed."""
  return hard_chunk_scores(s_bmnc, query_mask_bm, chunk_mask_bnc).max(axis=-1)


def smooth_document_scores(rq_bmf, query_mask_bm, kr_bncf, chunk_mask_bnc, temperature: float,
                           s_bmnc=None):
  """A smooth maximum of the routing scores of each document, for the routing loss only.

  ``τ·log mean exp(s/τ)`` over the document's valid (routing token, chunk) pairs, ``s``
  the scores whose hard maximum is :func:`document_scores`. Its gradient reaches every
  pair in proportion to ``softmax(s/τ)``, where the hard max's reaches one. Subtracting
  ``τ·log(count)`` (a mean, not a sum, of the exponentials) keeps it between the mean
  and the maximum score, so a document with more chunks is not scored higher for that
  alone; as ``τ → 0`` it tends to the hard maximum.

  Args:
    rq_bmf: group-summed queries (:func:`group_sum_queries`), ``[B, M, F]``.
    query_mask_bm: which tokens route.
    kr_bncf: pooled router keys (:func:`router_keys`) of each example's own documents,
      ``[B, N, C, F]``.
    chunk_mask_bnc: which chunks exist.
    temperature: ``τ > 0``.
    s_bmnc: :func:`pair_scores` of ``rq_bmf`` and ``kr_bncf`` when already computed (the
      training forward shares them with :func:`hard_document_scores`).
  Returns:
    float32 ``[B, N]``; ``-inf`` for a document with no chunk (or no routing token).
  """
  if not temperature > 0:
    raise ValueError(f"the smooth maximum needs a temperature > 0, got {temperature}; "
                     "0 means the hard maximum (document_scores)")
  if s_bmnc is None:
    s_bmnc = pair_scores(rq_bmf, kr_bncf)
  valid_bmnc = _valid_pairs(query_mask_bm, chunk_mask_bnc)
  # Finite filler, not -inf: an empty document's logsumexp and its gradient stay finite
  # (the gradient is then masked to 0), where -inf would give NaN.
  x_bmnc = jnp.where(valid_bmnc, s_bmnc / temperature, -1e30)
  count_bn = jnp.sum(valid_bmnc, axis=(1, 3))
  lse_bn = jax.nn.logsumexp(x_bmnc, axis=(1, 3))
  mean_bn = temperature * (lse_bn - jnp.log(jnp.maximum(count_bn, 1)))
  return jnp.where(count_bn > 0, mean_bn, NEG_INF)


class Selection(NamedTuple):
  """Top-k documents of one routing step, in document (ascending index) order."""

  doc_idx_bk: jax.Array    # int32 [B, k]; padding entries hold 0
  valid_bk: jax.Array      # bool  [B, k]; False where fewer than k documents exist


def select_top_k(doc_scores_bn, k: int) -> Selection:
  """The ``min(k, N)`` highest-scoring valid documents, ties to the lower index.

  Documents scored ``-inf`` (padding, empty) are never selected. The result is
  re-sorted into document order so memory is laid out as SPEC §3 step 4 says.
  The choice is hard: no gradient flows through it.
  """
  scores = jax.lax.stop_gradient(doc_scores_bn)
  n = scores.shape[-1]
  kk = min(k, n)
  top_val, top_idx = jax.lax.top_k(scores, kk)   # stable: equal scores keep index order
  valid = top_val > NEG_INF
  # Sort chosen documents by index; invalid entries go last.
  sort_key = jnp.where(valid, top_idx, n + jnp.arange(kk))
  order = jnp.argsort(sort_key, axis=-1)
  idx = jnp.take_along_axis(top_idx, order, axis=-1)
  valid = jnp.take_along_axis(valid, order, axis=-1)
  idx = jnp.where(valid, idx, 0)
  if kk < k:  # fewer document slots than k: pad the selection
    pad = k - kk
    idx = jnp.pad(idx, ((0, 0), (0, pad)))
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
  return Selection(idx.astype(jnp.int32), valid)


def select_with_gold(doc_scores_bn, gold_bn, k: int) -> Selection:
  """:func:`select_top_k` with the gold documents forced in (oracle routing in training,
  ``loss.oracle_routing``): every valid gold document is selected, the remaining slots go
  to the router's highest-scoring others. A row without gold documents is routed as usual;
  with more than ``k`` gold ones, the ``k`` best-scored of them are taken."""
  scores = jax.lax.stop_gradient(doc_scores_bn)
  forced = jnp.asarray(gold_bn, bool) & (scores > NEG_INF)
  # Above every finite score, and gold documents keep their order among themselves.
  lift = jnp.max(jnp.where(scores > NEG_INF, jnp.abs(scores), 0.0)) * 2 + 1
  return select_top_k(jnp.where(forced, scores + lift, scores), k)


def route_documents(rq_bmf, query_mask_bm, kr_cf, chunk_doc_c, num_docs: int, k: int):
  """Scores every document of one bank and picks the top k (reference path).

  Returns ``(doc_scores [B, N], Selection)``.
  """
  s_bc = chunk_scores(rq_bmf, query_mask_bm, kr_cf)
  doc_s = document_scores(s_bc, chunk_doc_c, num_docs)
  return doc_s, select_top_k(doc_s, k)
