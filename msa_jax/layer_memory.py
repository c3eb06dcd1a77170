"""The memory a layer reads: per-example pooled memory, what a layer attends before its
own tokens, and the routing decision of a router layer.

``pool_layer_memory`` turns one router layer's per-token K, V and router keys of the
documents into :class:`LayerMemory` (stage 1 of SPEC §5); a *memory source* answers
``layer(i)`` with something whose ``select`` routes and returns the selected documents'
chunks: :class:`ExampleMemory` in training (each example against its own documents), the
inference engine's shared bank (``msa_jax.inference.memory``) at inference.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from msa_jax import pooling
from msa_jax import routing
from msa_jax.batch import MSABatch
from msa_jax.config import ModelConfig


@flax.struct.dataclass
class LayerMemory:
  """One router layer's pooled memory for a batch of per-example banks."""

  k_bncgd: jax.Array        # pooled post-norm post-RoPE keys   [B, N, C, Hkv, D]
  v_bncgd: jax.Array        # pooled values                       [B, N, C, Hkv, D]
  kr_bncf: jax.Array        # pooled router keys (routing.router_keys) [B, N, C, Hkv*D]
  chunk_mask_bnc: jax.Array  # chunk present                      [B, N, C]


@flax.struct.dataclass
class Routing:
  """What one router layer decided for the active tokens."""

  doc_scores_bn: jax.Array   # float32 [B, N]; -inf for padding / empty documents
  doc_idx_bk: jax.Array      # int32 [B, k] selected documents in document order
  valid_bk: jax.Array        # bool [B, k]
  # float32 [B, N]: the routing loss's smooth scores (routing.smooth_document_scores),
  # only where the training forward asks for them; None otherwise.
  aux_scores_bn: Optional[jax.Array] = None
  # float32 [B, N, C]: each chunk's score (max over the routing tokens; -inf for a missing
  # chunk), for the chunk-level routing loss (loss.aux_chunk_weight); None otherwise.
  chunk_scores_bnc: Optional[jax.Array] = None
  # float32 [B, B*N]: each example's routing-loss score (hard or smooth, as aux_scores_bn)
  # of every document of the batch, example-major (loss.aux_batch_negatives); None otherwise.
  batch_scores_bx: Optional[jax.Array] = None


@flax.struct.dataclass
class LayerContext:
  """What one layer's active tokens see before their own tokens: ``[prefix ; memory ; cache]``.

  Built from the prefix K/V (``prefix_context``); in decoding it also holds the selected
  memory slots and the KV cache of earlier active tokens.

  ``own_slot_b`` (a decoding step's KV cache buffer, one active token a row): the token
  writes its K/V into the buffer at this slot (``with_own``) and attends to the buffer
  alone; ``mask_bs`` already marks the slot valid. None: own tokens are attended apart.
  """

  k_bsgd: jax.Array     # [B, S, Hkv, D]
  v_bsgd: jax.Array     # [B, S, Hkv, D]
  mask_bs: jax.Array    # bool [B, S]
  own_slot_b: Optional[jax.Array] = None   # int32 [B]

  def with_own(self, k_bmgd, v_bmgd) -> "LayerContext":
    """The buffer with the active token's K/V written at ``own_slot_b`` (cast to the
    buffer's dtype; in place where the buffer is donated)."""
    if k_bmgd.shape[1] != 1:
      raise ValueError(f"own_slot_b takes one active token a row, got {k_bmgd.shape[1]}")
    write = jax.vmap(lambda buf, x, i: jax.lax.dynamic_update_slice_in_dim(buf, x, i, axis=0))
    return LayerContext(write(self.k_bsgd, k_bmgd.astype(self.k_bsgd.dtype), self.own_slot_b),
                        write(self.v_bsgd, v_bmgd.astype(self.v_bsgd.dtype), self.own_slot_b),
                        self.mask_bs, self.own_slot_b)

  def extend(self, k_bsgd, v_bsgd, mask_bs) -> "LayerContext":
    """This context followed by more slots (cast to this context's dtype)."""
    return LayerContext(jnp.concatenate([self.k_bsgd, k_bsgd.astype(self.k_bsgd.dtype)], 1),
                        jnp.concatenate([self.v_bsgd, v_bsgd.astype(self.v_bsgd.dtype)], 1),
                        jnp.concatenate([self.mask_bs, jnp.asarray(mask_bs, bool)], 1))


@flax.struct.dataclass
class LayerKV:
  """One layer's result for the active tokens, for a KV cache (``decode_active(return_kv)``)."""

  context: LayerContext   # what the tokens attended before themselves (prefix ; memory)
  k_bmgd: jax.Array       # the active tokens' own keys   [B, M, Hkv, D]
  v_bmgd: jax.Array       # the active tokens' own values [B, M, Hkv, D]


def prefix_context(prefix_kv, prefix_mask_bt) -> list[LayerContext]:
  """``encode_prefix``'s per-layer ``(k, v)`` as the active tokens' starting context."""
  mask = jnp.asarray(prefix_mask_bt, bool)
  return [LayerContext(k, v, mask) for k, v in prefix_kv]


class ExampleMemory:
  """A memory source over per-example banks (the training layout, ``encode_documents``).

  A memory source answers ``layer(i)``: None when layer ``i`` has no memory, else a
  pytree whose ``select(rq_bmf, route_mask_bm, top_k)`` routes and returns
  ``(decision, k [B, S, Hkv, D], v, mask [B, S])``, the selected documents' pooled
  chunks in document order. Here each example routes against its own documents;
  ``forced`` (a ``routing.Selection``) replaces the router's choice in every layer
  (oracle routing) while scores are still computed; ``gold_bn`` ([B, N] bool, training's
  ``loss.oracle_routing``) forces each example's gold documents into the router's top-k
  (``routing.select_with_gold``), the scores and their metrics still the router's. ``aux_softmax`` > 0 adds the routing
  loss's smooth scores to each decision (``routing.smooth_document_scores`` at that
  temperature; training only), ``chunk_scores`` every chunk's score (the chunk-level
  routing loss's, ``routing.hard_chunk_scores``), ``batch_negatives`` each example's
  routing-loss scores of every document of the batch (``Routing.batch_scores_bx``; the
  routing loss's in-batch negatives, ``loss.aux_batch_negatives``). The inference engine's
  shared bank is another source (``msa_jax.inference.engine``).
  """

  def __init__(self, memory: dict, forced: Optional[routing.Selection] = None,
               aux_softmax: float = 0.0, chunk_scores: bool = False, gold_bn=None,
               batch_negatives: bool = False):
    self.memory, self.forced, self.aux_softmax = memory, forced, aux_softmax
    self.chunk_scores, self.gold_bn = chunk_scores, gold_bn
    self.batch_negatives = batch_negatives

  def layer(self, i: int) -> Optional["ExampleLayerMemory"]:
    if i not in self.memory:
      return None
    return ExampleLayerMemory(self.memory[i], self.forced, self.aux_softmax, self.chunk_scores,
                              self.gold_bn, self.batch_negatives)


@flax.struct.dataclass
class ExampleLayerMemory:
  """One router layer of :class:`ExampleMemory` (a pytree, so it passes through remat)."""

  memory: "LayerMemory"
  forced: Optional[routing.Selection] = None
  aux_softmax: float = flax.struct.field(pytree_node=False, default=0.0)
  chunk_scores: bool = flax.struct.field(pytree_node=False, default=False)
  gold_bn: Optional[jax.Array] = None
  batch_negatives: bool = flax.struct.field(pytree_node=False, default=False)

  def batch_scores(self, rq_bmf, route_mask_bm):
    """float32 ``[B, B*N]``: each example's routing tokens scored against every document of
    the batch (example-major), as the routing loss scores its own documents: the smooth
    maximum at ``aux_softmax`` > 0, else the hard one. Training only: ``[B, M, B*N, C]``
    pair scores exist for it."""
    kr_bncf, chunk_mask_bnc = self.memory.kr_bncf, self.memory.chunk_mask_bnc
    b, n, c, f = kr_bncf.shape
    s_bmxc = routing.batch_pair_scores(rq_bmf, kr_bncf.reshape(b * n, c, f))
    mask_bxc = jnp.broadcast_to(chunk_mask_bnc.reshape(1, b * n, c), (b, b * n, c))
    if self.aux_softmax > 0:
      return routing.smooth_document_scores(rq_bmf, route_mask_bm, None, mask_bxc,
                                            self.aux_softmax, s_bmnc=s_bmxc)
    return routing.hard_document_scores(s_bmxc, route_mask_bm, mask_bxc)

  def select(self, rq_bmf, route_mask_bm, top_k: int):
    aux_scores = chunk_scores = None
    if self.aux_softmax > 0 or self.chunk_scores:   # one [B, M, N, C] tensor feeds them all
      chunk_mask = self.memory.chunk_mask_bnc
      s_bmnc = routing.pair_scores(rq_bmf, self.memory.kr_bncf)
      chunk_s = routing.hard_chunk_scores(s_bmnc, route_mask_bm, chunk_mask)
      doc_scores = chunk_s.max(axis=-1)               # routing.hard_document_scores
      selection = routing.select_top_k(doc_scores, top_k)
      if self.aux_softmax > 0:
        aux_scores = routing.smooth_document_scores(rq_bmf, route_mask_bm, self.memory.kr_bncf,
                                                    chunk_mask, self.aux_softmax, s_bmnc=s_bmnc)
      if self.chunk_scores:
        chunk_scores = chunk_s
    else:
      doc_scores, selection = route_in_memory(rq_bmf, route_mask_bm, self.memory, top_k)
    if self.gold_bn is not None:
      selection = routing.select_with_gold(doc_scores, self.gold_bn, top_k)
    if self.forced is not None:
      selection = self.forced
    k, v, mask = gather_selected_memory(self.memory, selection)
    batch_scores = self.batch_scores(rq_bmf, route_mask_bm) if self.batch_negatives else None
    return (Routing(doc_scores, selection.doc_idx_bk, selection.valid_bk, aux_scores,
                    chunk_scores, batch_scores), k, v, mask)


def routing_mask(batch: MSABatch, cfg: ModelConfig):
  """The active tokens that route (SPEC §3 ``routing_tokens``), padding excluded."""
  active = jnp.asarray(batch.active_mask, bool)
  if cfg.routing_tokens == "question":
    return active & jnp.asarray(batch.question_mask, bool)
  return active


def gather_selected_memory(memory: LayerMemory, selection: routing.Selection):
  """Pooled K̄, V̄ of the selected documents, in document order, as context slots.

  Returns ``(k [B, k*C, Hkv, D], v [B, k*C, Hkv, D], mask [B, k*C])``.
  """
  take = jax.vmap(lambda x, i: x[i])
  k = take(memory.k_bncgd, selection.doc_idx_bk)
  v = take(memory.v_bncgd, selection.doc_idx_bk)
  mask = take(memory.chunk_mask_bnc, selection.doc_idx_bk) & selection.valid_bk[..., None]
  b, kk, c, g, d = k.shape
  return k.reshape(b, kk * c, g, d), v.reshape(b, kk * c, g, d), mask.reshape(b, kk * c)


def route_in_memory(rq_bmf, route_mask_bm, memory: LayerMemory, k: int):
  """Routes each example against its own bank (training layout) with the reference ops."""
  b, n, c, f = memory.kr_bncf.shape
  chunk_doc_bc = jnp.where(memory.chunk_mask_bnc,
                           jnp.arange(n, dtype=jnp.int32)[None, :, None], -1).reshape(b, n * c)

  def one(rq_mf, mask_m, kr_cf, chunk_doc_c):
    scores_1c = routing.chunk_scores(rq_mf[None], mask_m[None], kr_cf)
    return routing.document_scores(scores_1c, chunk_doc_c, n)[0]

  doc_scores_bn = jax.vmap(one)(rq_bmf, route_mask_bm, memory.kr_bncf.reshape(b, n * c, f),
                                chunk_doc_bc)
  return doc_scores_bn, routing.select_top_k(doc_scores_bn, k)


def pool_layer_memory(k_btgd, v_btgd, rk_btgd, mask_bt, chunk_size: int, b: int, n: int,
                      routing_score: str = "cosine"):
  """Pools one router layer's per-token K, V, RK of ``b*n`` documents into chunks."""
  k_p, chunk_mask = pooling.mean_pool_chunks(k_btgd, mask_bt, chunk_size)
  v_p, _ = pooling.mean_pool_chunks(v_btgd, mask_bt, chunk_size)
  rk_p, _ = pooling.mean_pool_chunks(rk_btgd, mask_bt, chunk_size)
  rk_p = routing.router_keys(rk_p, routing_score)   # cosine: L2 over D, per kv head
  c, g, d = k_p.shape[1:]
  return LayerMemory(
      k_bncgd=k_p.reshape(b, n, c, g, d).astype(k_btgd.dtype),
      v_bncgd=v_p.reshape(b, n, c, g, d).astype(v_btgd.dtype),
      kr_bncf=rk_p.reshape(b, n, c, g * d),
      chunk_mask_bnc=chunk_mask.reshape(b, n, c))
