"""The MSA model: a Qwen3 decoder whose router layers read a document memory.

The training forward is literally the three inference stages of SPEC §5 in one
jit: documents never see the prefix or the query and the prefix never sees
anything else, so

  ``encode_documents``  (stage 1: per router layer, pooled K̄, V̄, K̄R per chunk)
  ``encode_prefix``     (the prefix K, V of every layer)
  ``decode_active``     (stage 2: route, assemble ``[prefix; chunks; active]``)

compose into the exact forward, and the memory bank of the inference engine is
the output of ``encode_documents``. With ``ModelConfig.scan_layers`` the training
forward runs each run of consecutive identical layers (router or not) as one
``lax.scan`` (compile time independent of depth); the parameters stay per layer. With no memory, ``__call__`` on token ids is
exactly Qwen3 (SPEC §1).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from msa_jax import attention as attention_lib
from msa_jax import pooling
from msa_jax import positions as positions_lib
from msa_jax import routing
from msa_jax.batch import MSABatch
from msa_jax.config import ModelConfig
from msa_jax.layers import MLP, RMSNorm, apply_rope, dense

BATCH_LENGTH_EMBED = ("batch", "length", "embed")
BATCH_LENGTH_HEADS = ("batch", "length", "heads", "head_dim")
BATCH_LENGTH_KV = ("batch", "length", "kv_heads", "head_dim")


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


@flax.struct.dataclass
class MSAOutput:
  """Forward result on an :class:`MSABatch`; ``R`` = number of router layers."""

  logits_bmv: jax.Array       # float32 [B, M, vocab]
  doc_scores_brn: jax.Array   # float32 [B, R, N]
  selected_brk: jax.Array     # int32 [B, R, k]
  selected_valid_brk: jax.Array  # bool [B, R, k]


@flax.struct.dataclass
class MSATrainOutput:
  """The training forward's result: final-normed hidden states instead of logits."""

  hidden_bmd: jax.Array       # [B, M, D] in the compute dtype, after the final RMSNorm
  doc_scores_brn: jax.Array   # float32 [B, R, N]
  selected_brk: jax.Array     # int32 [B, R, k]
  selected_valid_brk: jax.Array  # bool [B, R, k]
  # float32 [B, R, N]: the smooth scores for the routing loss (``forward_train``'s
  # ``aux_softmax`` > 0); None: the loss uses ``doc_scores_brn``.
  aux_scores_brn: Optional[jax.Array] = None


@flax.struct.dataclass
class LayerContext:
  """What one layer's active tokens see before their own tokens: ``[prefix ; memory ; cache]``.

  Built from the prefix K/V (``prefix_context``); in decoding it also holds the selected
  memory slots and the KV cache of earlier active tokens.
  """

  k_bsgd: jax.Array     # [B, S, Hkv, D]
  v_bsgd: jax.Array     # [B, S, Hkv, D]
  mask_bs: jax.Array    # bool [B, S]

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
  (oracle routing) while scores are still computed. ``aux_softmax`` > 0 adds the routing
  loss's smooth scores to each decision (``routing.smooth_document_scores`` at that
  temperature; training only). The inference engine's shared bank is another source
  (``msa_jax.inference.engine``).
  """

  def __init__(self, memory: dict, forced: Optional[routing.Selection] = None,
               aux_softmax: float = 0.0):
    self.memory, self.forced, self.aux_softmax = memory, forced, aux_softmax

  def layer(self, i: int) -> Optional["ExampleLayerMemory"]:
    if i not in self.memory:
      return None
    return ExampleLayerMemory(self.memory[i], self.forced, self.aux_softmax)


@flax.struct.dataclass
class ExampleLayerMemory:
  """One router layer of :class:`ExampleMemory` (a pytree, so it passes through remat)."""

  memory: "LayerMemory"
  forced: Optional[routing.Selection] = None
  aux_softmax: float = flax.struct.field(pytree_node=False, default=0.0)

  def select(self, rq_bmf, route_mask_bm, top_k: int):
    doc_scores, selection = route_in_memory(rq_bmf, route_mask_bm, self.memory, top_k)
    if self.forced is not None:
      selection = self.forced
    aux_scores = None
    if self.aux_softmax > 0:
      aux_scores = routing.smooth_document_scores(rq_bmf, route_mask_bm, self.memory.kr_bncf,
                                                  self.memory.chunk_mask_bnc, self.aux_softmax)
    k, v, mask = gather_selected_memory(self.memory, selection)
    return Routing(doc_scores, selection.doc_idx_bk, selection.valid_bk, aux_scores), k, v, mask


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


class DecoderLayer(nn.Module):
  """One Qwen3 block; a router layer also owns ``router_q_proj``/``router_k_proj``."""

  cfg: ModelConfig
  is_router: bool = False

  def setup(self):
    cfg = self.cfg
    norm = lambda name, axis="norm": RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype,
                                            cfg.jnp_param_dtype, axis, name=name)
    hd = cfg.num_heads * cfg.head_dim
    kvd = cfg.num_kv_heads * cfg.head_dim
    self.input_layernorm = norm("input_layernorm")
    self.q_proj = dense(hd, cfg, ("embed", "q_heads"), "q_proj")
    self.k_proj = dense(kvd, cfg, ("embed", "kv_heads"), "k_proj")
    self.v_proj = dense(kvd, cfg, ("embed", "kv_heads"), "v_proj")
    self.o_proj = dense(cfg.hidden_size, cfg, ("q_heads", "embed"), "o_proj")
    self.q_norm = norm("q_norm", "head_dim")
    self.k_norm = norm("k_norm", "head_dim")
    if self.is_router:
      self.router_q_proj = dense(hd, cfg, ("embed", "q_heads"), "router_q_proj")
      self.router_k_proj = dense(kvd, cfg, ("embed", "kv_heads"), "router_k_proj")
    self.post_attention_layernorm = norm("post_attention_layernorm")
    self.mlp = MLP(cfg, name="mlp")

  def _heads(self, x, n):
    return x.reshape(*x.shape[:-1], n, self.cfg.head_dim)

  def _project(self, x_btd, pos_bt):
    cfg = self.cfg
    h = self.input_layernorm(x_btd)
    q = apply_rope(self.q_norm(self._heads(self.q_proj(h), cfg.num_heads)), pos_bt, cfg.rope_theta)
    h_kv, t = _gemm_rows(h), h.shape[1]
    k = apply_rope(self.k_norm(self._heads(self.k_proj(h_kv)[:, :t], cfg.num_kv_heads)), pos_bt,
                   cfg.rope_theta)
    v = self._heads(self.v_proj(h_kv)[:, :t], cfg.num_kv_heads)
    q = nn.with_logical_constraint(q, BATCH_LENGTH_HEADS)
    k = nn.with_logical_constraint(k, BATCH_LENGTH_KV)
    v = nn.with_logical_constraint(v, BATCH_LENGTH_KV)
    return h, q, k, v

  def _finish(self, x_btd, attn_bthd):
    b, t, h, d = attn_bthd.shape
    x = x_btd + self.o_proj(attn_bthd.reshape(b, t, h * d))   # no -1: T may be 0 (no prefix)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)

  def _attend(self, *args):
    """Attention through the configured implementation (``kernels``: auto | pallas | xla)."""
    # The Mosaic GPU kernel tiles head_dim by 64: "auto" falls back to XLA elsewhere.
    if self.cfg.kernels == "xla" or (self.cfg.kernels == "auto" and self.cfg.head_dim % 64):
      return attention_lib.attend(*args)
    from pallas_kernels import sparse_attention  # GPU kernels load only when asked for
    return sparse_attention.attend(*args, implementation=self.cfg.kernels)

  def encode(self, x_btd, pos_bt, mask_bt):
    """A causal, self-contained stream (a document or the prefix).

    Returns ``(x_out, k, v, rk)``; ``rk`` (router keys ``[B, T, Hkv, D]``) is
    None outside router layers.
    """
    h, q, k, v = self._project(x_btd, pos_bt)
    attn = self._attend(q, k, v, mask_bt)
    rk = None
    if self.is_router:
      rk = self._heads(self.router_k_proj(h), self.cfg.num_kv_heads)
      if self.is_initializing():  # create router_q_proj even from a plain-LM init
        self.router_q_proj(h)
    return self._finish(x_btd, attn), k, v, rk

  def active(self, x_bmd, pos_bm, mask_bm, context: Optional[LayerContext], memory,
             route_mask_bm):
    """Active tokens: attend ``[context ; selected chunks ; own causal]``.

    ``memory`` (one layer of a memory source, see ``ExampleMemory``) is routed in a
    router layer; ``None`` means no routing here (e.g. a decoding step whose
    context already holds the selected chunks). Returns ``(x_out, k, v, decision, ctx)``:
    ``ctx`` is what the tokens attended before themselves (None if nothing).
    """
    cfg = self.cfg
    h, q, k, v = self._project(x_bmd, pos_bm)
    decision = None
    if self.is_router and memory is not None:
      rq = self._heads(self.router_q_proj(h), cfg.num_heads)
      rq_bmf = routing.group_sum_queries(rq, cfg.num_kv_heads, cfg.routing_score)
      decision, mem_k, mem_v, mem_mask = memory.select(rq_bmf, route_mask_bm, cfg.top_k)
      mem_k, mem_v = mem_k.astype(k.dtype), mem_v.astype(v.dtype)
      context = (LayerContext(mem_k, mem_v, mem_mask) if context is None
                 else context.extend(mem_k, mem_v, mem_mask))
    if context is None:
      attn = self._attend(q, k, v, mask_bm)
    else:
      attn = self._attend(q, k, v, mask_bm, context.k_bsgd.astype(k.dtype),
                          context.v_bsgd.astype(v.dtype), context.mask_bs)
    return self._finish(x_bmd, attn), k, v, decision, context


_GEMM_MIN_ROWS = 8


def _gemm_rows(h_btd):
  """``h_btd`` with its token axis zero-padded to at least 8 rows (``B·T``) in all.

  For the K/V projections of a decoding step: XLA's GPU simplifier rewrites a dot of under
  10M multiply-adds as a multiply and a reduce that write and read a weight-sized product.
  A one-token K or V projection at the 4B shape (1 × 2560 × 1024) took ~21 µs a layer that
  way on the H200 (0.75 ms of a 4.9 ms decoding step); with 8 rows it is a GEMM reading
  the weights once. Rows are independent: the real rows' outputs are unchanged.
  """
  b, t, _ = h_btd.shape
  if b * t >= _GEMM_MIN_ROWS or b * t == 0:
    return h_btd
  return jnp.pad(h_btd, ((0, 0), (0, -(-_GEMM_MIN_ROWS // b) - t), (0, 0)))


class MSAModel(nn.Module):
  """Qwen3 + Memory Sparse Attention.

  ``model.apply(vars, input_ids)`` → float32 logits ``[B, T, vocab]`` (plain
  Qwen3, positions ``0..T-1`` unless given). ``model.apply(vars, batch)`` with
  an :class:`MSABatch` → :class:`MSAOutput`.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
        name="embed_tokens")
    layer_cls = (nn.remat(DecoderLayer, methods=["encode", "active"],
                          policy=remat_policy_fn(cfg.remat_policy))
                 if cfg.remat_policy != "none" else DecoderLayer)
    router_ids = set(cfg.router_layer_ids)
    self.layers = [layer_cls(cfg, is_router=i in router_ids, name=f"layers_{i}")
                   for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name="norm")
    if not cfg.tie_word_embeddings:
      self.lm_head = dense(cfg.vocab_size, cfg, ("embed", "vocab"), "lm_head")

  def _embed(self, tokens):
    x = self.embed_tokens(jnp.asarray(tokens, jnp.int32))
    return nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)

  def _logits(self, x_btd):
    x = self.norm(x_btd)
    if self.config.tie_word_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, inputs: Any, positions=None, mask=None):
    """Plain causal LM on token ids, or the full MSA forward on an MSABatch."""
    if isinstance(inputs, MSABatch):
      return self.forward_memory(inputs)
    tokens = jnp.asarray(inputs, jnp.int32)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask, bool)
    return self._logits(self._causal_stream(tokens, positions, mask))

  def lm_hidden(self, tokens_bt, mask_bt):
    """The plain causal LM's final-normed hidden states ``[B, T, D]`` (positions
    ``0..T-1``): what ``model.apply(vars, tokens)`` applies the LM head to. The training
    step's document LM loss (``loss.doc_lm_weight``) runs each document through it."""
    tokens = jnp.asarray(tokens_bt, jnp.int32)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return self.norm(self._causal_stream(tokens, positions, jnp.asarray(mask_bt, bool)))

  def _causal_stream(self, tokens_bt, positions_bt, mask_bt):
    x = self._embed(tokens_bt)
    for layer in self.layers:
      x, _, _, _ = layer.encode(x, positions_bt, mask_bt)
    return x

  def encode_documents(self, doc_tokens_bnl, doc_mask_bnl, doc_pos_bnl) -> dict[int, LayerMemory]:
    """Stage 1: runs each document alone and pools every router layer's memory.

    Returns ``{layer_index: LayerMemory}`` for the router layers.
    """
    if self._scanning():
      memory = {}
      params = self._stacked_params()
      for run, stacked in self._encode_documents_scanned(doc_tokens_bnl, doc_mask_bnl,
                                                         doc_pos_bnl, params):
        memory.update({i: jax.tree.map(lambda a, j=j: a[j], stacked)
                       for j, i in enumerate(range(run.start, run.stop))})
      return memory
    cfg = self.config
    b, n, l = doc_tokens_bnl.shape
    mask = jnp.asarray(doc_mask_bnl, bool).reshape(b * n, l)
    pos = doc_pos_bnl.reshape(b * n, l)
    x = self._embed(doc_tokens_bnl.reshape(b * n, l))
    memory = {}
    last_router = max(cfg.router_layer_ids)
    for i, layer in enumerate(self.layers[: last_router + 1]):
      x, k, v, rk = layer.encode(x, pos, mask)
      if rk is not None:
        memory[i] = pool_layer_memory(k, v, rk, mask, cfg.pooling_chunk_size, b, n,
                                      cfg.routing_score)
    return memory

  def encode_prefix(self, prefix_tokens_bt, prefix_mask_bt, prefix_pos_bt):
    """The prefix's K, V in every layer: a list of ``(k, v)`` ``[B, T, Hkv, D]``."""
    if self._scanning():
      kv = []
      for run, (k_lbtgd, v_lbtgd) in self._encode_prefix_scanned(
          prefix_tokens_bt, prefix_mask_bt, prefix_pos_bt, self._stacked_params()):
        kv += [(k_lbtgd[j], v_lbtgd[j]) for j in range(len(run))]
      return kv
    x = self._embed(prefix_tokens_bt)
    mask = jnp.asarray(prefix_mask_bt, bool)
    kv = []
    for layer in self.layers:
      x, k, v, _ = layer.encode(x, prefix_pos_bt, mask)
      kv.append((k, v))
    return kv

  def decode_active(self, active_tokens_bm, active_pos_bm, active_mask_bm, route_mask_bm,
                    context: Sequence[Optional[LayerContext]], memory=None, *,
                    return_kv: bool = False):
    """Stage 2 (and each decoding step of stage 3): the active tokens through all layers.

    Args:
      context: per layer, what the tokens see before themselves: the prefix
        (``prefix_context``) and, when decoding with a KV cache, the selected
        memory slots and earlier active tokens; None for nothing.
      memory: a memory source (``ExampleMemory`` over ``encode_documents``' output,
        or the engine's bank), routed in every router layer it covers; a plain
        ``{layer: LayerMemory}`` dict is wrapped in ``ExampleMemory``; None: no
        routing (the context already holds the memory).
      return_kv: also return each layer's ``LayerKV`` (context used, the tokens'
        own K and V) to build a KV cache.
    Returns ``(logits [B, M, vocab], [decision per routed layer])`` and, with
    ``return_kv``, the list of ``LayerKV``.
    """
    x, decisions, kv = self._active_hidden(active_tokens_bm, active_pos_bm, active_mask_bm,
                                           route_mask_bm, context, memory, return_kv)
    logits = self._logits(x)
    return (logits, decisions, kv) if return_kv else (logits, decisions)

  def _active_hidden(self, active_tokens_bm, active_pos_bm, active_mask_bm, route_mask_bm,
                     context, memory, return_kv: bool):
    """The active tokens through all layers: ``(x [B, M, D] before the final norm,
    decisions, [LayerKV] if return_kv)``."""
    if isinstance(memory, dict):
      memory = ExampleMemory(memory)
    x = self._embed(active_tokens_bm)
    mask = jnp.asarray(active_mask_bm, bool)
    decisions, kv = [], []
    for i, layer in enumerate(self.layers):
      layer_memory = None if memory is None else memory.layer(i)
      x, k, v, decision, ctx = layer.active(x, active_pos_bm, mask, context[i], layer_memory,
                                            route_mask_bm)
      if decision is not None:
        decisions.append(decision)
      if return_kv:
        kv.append(LayerKV(ctx, k, v))
    return x, decisions, kv

  def forward_memory(self, batch: MSABatch) -> MSAOutput:
    """The forward on one padded batch (SPEC §3), with the logits of every active slot."""
    x, decisions = self._forward_active_hidden(batch)
    return MSAOutput(logits_bmv=self._logits(x), **_stack_decisions(decisions))

  def forward_train(self, batch: MSABatch, aux_softmax: float = 0.0) -> "MSATrainOutput":
    """The training forward: :meth:`forward_memory` without the LM head.

    Returns the final-normed hidden states of the active slots; the loss applies
    the LM head itself, in chunks over target positions (``losses.lm_loss_chunked``),
    so ``[B, M, vocab]`` logits never exist. ``aux_softmax`` > 0 (``loss.aux_softmax``)
    also returns the routing loss's smooth document scores at that temperature
    (``routing.smooth_document_scores``); selection and ``doc_scores_brn`` keep the max.
    """
    x, decisions = self._forward_active_hidden(batch, aux_softmax)
    aux = None
    if aux_softmax > 0:
      aux = jnp.stack([d.aux_scores_bn for d in decisions], axis=1)
    return MSATrainOutput(hidden_bmd=self.norm(x), aux_scores_brn=aux,
                          **_stack_decisions(decisions))

  def _forward_active_hidden(self, batch: MSABatch, aux_softmax: float = 0.0):
    cfg = self.config
    prefix_pos, doc_pos, active_pos = positions_lib.stream_positions(
        jnp.asarray(batch.prefix_mask, bool), jnp.asarray(batch.doc_mask, bool),
        jnp.asarray(batch.active_mask, bool), top_k=cfg.top_k, rope_mode=cfg.rope_mode)
    if self._scanning():
      params = self._stacked_params()   # stacked once, used by the three passes
      memory = self._encode_documents_scanned(jnp.asarray(batch.doc_tokens), batch.doc_mask,
                                              doc_pos, params)
      prefix_kv = self._encode_prefix_scanned(batch.prefix_tokens, batch.prefix_mask,
                                              prefix_pos, params)
      return self._active_hidden_scanned(batch.active_tokens, active_pos, batch.active_mask,
                                         routing_mask(batch, cfg), batch.prefix_mask,
                                         prefix_kv, memory, params, aux_softmax)
    memory = ExampleMemory(
        self.encode_documents(jnp.asarray(batch.doc_tokens), batch.doc_mask, doc_pos),
        aux_softmax=aux_softmax)
    prefix_kv = self.encode_prefix(batch.prefix_tokens, batch.prefix_mask, prefix_pos)
    x, decisions, _ = self._active_hidden(batch.active_tokens, active_pos, batch.active_mask,
                                          routing_mask(batch, cfg),
                                          prefix_context(prefix_kv, batch.prefix_mask), memory,
                                          return_kv=False)
    return x, decisions

  # -- The scanned training forward (cfg.scan_layers): each run of identical layers is one
  # lax.scan over the run's stacked parameters, so the step's HLO holds one copy of each
  # kind of layer per pass, whatever the depth. The parameter tree stays per layer
  # (``layers_{i}``: checkpoints, export, inference); the stacking is per step.

  def _scanning(self) -> bool:
    return self.config.scan_layers and not self.is_initializing()

  def _layer_params(self, i: int):
    """Layer ``i``'s parameters (unboxed), kernels in the compute dtype."""
    return _kernels_in(nn.unbox(self.variables["params"][f"layers_{i}"]),
                       self.config.jnp_dtype)

  def _run_params(self, run: "LayerRun"):
    """The run's parameters stacked on a leading ``layers`` axis, sharded like each layer's.

    The stacking is a per-step copy of the layers' parameters (their matmul kernels cast
    to the compute dtype first; ``nn.Dense`` casts them anyway, so the values are
    identical), plus a stacked gradient buffer of the same size in the backward. In the
    bf16 recipes that is 0.97 GB each for 0.6b (484M layer parameters; ~6 GB of HBM
    traffic with the float32 reads and writes, ~1.3 ms at 4.8 TB/s, against a step of
    seconds) and 7.7 GB each for 4b (3.87B; ~15 GB more peak memory, ~10 ms).
    """
    trees = [self._layer_params(i) for i in range(run.start, run.stop)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    axes = _layer_param_axes(self.config, run.is_router)
    return jax.tree.map(lambda box, x: nn.with_logical_constraint(x, ("layers",) + box.names),
                        axes, stacked, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))

  def _stacked_params(self) -> dict:
    """``{run.start: the run's stacked parameters}`` for every run (``_run_params``); a
    pass that does not reach a run leaves its stacking unused (XLA drops it)."""
    return {run.start: self._run_params(run) for run in layer_runs(self.config)}

  def _encode_documents_scanned(self, doc_tokens_bnl, doc_mask_bnl, doc_pos_bnl, stacked):
    """Stage 1, scanned: ``[(router run, LayerMemory stacked [run length, B, ...])]``;
    ``stacked`` is ``_stacked_params()``."""
    cfg = self.config
    b, n, l = doc_tokens_bnl.shape
    mask = jnp.asarray(doc_mask_bnl, bool).reshape(b * n, l)
    pos = doc_pos_bnl.reshape(b * n, l)
    x = self._embed(doc_tokens_bnl.reshape(b * n, l))
    runs = layer_runs(cfg, stop=max(cfg.router_layer_ids) + 1)
    out = []
    for r, run in enumerate(runs):
      encode = _pure_layer(cfg, run.is_router, "encode")

      def pool(k, v, rk):
        return pool_layer_memory(k, v, rk, mask, cfg.pooling_chunk_size, b, n,
                                 cfg.routing_score)

      def body(x, p):
        x, k, v, rk = encode(p, x, pos, mask)
        return x, (pool(k, v, rk) if run.is_router else None)

      params = stacked[run.start]
      if r < len(runs) - 1:
        x, memory = jax.lax.scan(body, x, params)
      else:
        # The last (router) layer's output stream is unused: peel it off the scan, so
        # XLA drops its o_proj and MLP over every document token (a scanned last layer
        # would compute them, and their zero gradients).
        if len(run) > 1:
          x, memory = jax.lax.scan(body, x, jax.tree.map(lambda a: a[:-1], params))
        peeled = _pure_layer(cfg, True, "encode", in_scan=False)
        _, k, v, rk = peeled(jax.tree.map(lambda a: a[-1], params), x, pos, mask)
        last = jax.tree.map(lambda a: a[None], pool(k, v, rk))
        memory = last if len(run) == 1 else jax.tree.map(
            lambda a, c: jnp.concatenate([a, c]), memory, last)
      if run.is_router:
        out.append((run, memory))
    return out

  def _encode_prefix_scanned(self, prefix_tokens_bt, prefix_mask_bt, prefix_pos_bt, stacked):
    """The prefix, scanned: ``[(run, (k, v) stacked [run length, B, T, Hkv, D])]``."""
    x = self._embed(prefix_tokens_bt)
    mask = jnp.asarray(prefix_mask_bt, bool)
    out = []
    for run in layer_runs(self.config):
      encode = _pure_layer(self.config, run.is_router, "encode")

      def body(x, p):
        x, k, v, _ = encode(p, x, prefix_pos_bt, mask)
        return x, (k, v)

      x, kv = jax.lax.scan(body, x, stacked[run.start])
      out.append((run, kv))
    return out

  def _active_hidden_scanned(self, active_tokens_bm, active_pos_bm, active_mask_bm,
                             route_mask_bm, prefix_mask_bt, prefix_kv, memory, stacked,
                             aux_softmax: float = 0.0):
    """:meth:`_active_hidden` over per-example memory, scanned: each layer's prefix
    context and (router runs) memory are scanned inputs, its routing a stacked output
    (with the smooth aux scores when ``aux_softmax`` > 0, as ``ExampleMemory``'s).
    Returns ``(x [B, M, D] before the final norm, decisions)`` like the unrolled path."""
    cfg = self.config
    x = self._embed(active_tokens_bm)
    mask = jnp.asarray(active_mask_bm, bool)
    prefix_mask = jnp.asarray(prefix_mask_bt, bool)
    memory_of = {run.start: stacked for run, stacked in memory}
    decisions = []
    for run, (k_lbtgd, v_lbtgd) in prefix_kv:
      active = _pure_layer(cfg, run.is_router, "active")

      def body(x, xs):
        p, k, v, mem = xs
        layer_memory = None if mem is None else ExampleLayerMemory(mem, aux_softmax=aux_softmax)
        x, _, _, decision, _ = active(p, x, active_pos_bm, mask,
                                      LayerContext(k, v, prefix_mask), layer_memory,
                                      route_mask_bm)
        return x, decision

      mem = memory_of.get(run.start) if run.is_router else None
      x, decision = jax.lax.scan(body, x, (stacked[run.start], k_lbtgd, v_lbtgd, mem))
      if decision is not None:
        decisions += [jax.tree.map(lambda a, j=j: a[j], decision) for j in range(len(run))]
    return x, decisions


@dataclasses.dataclass(frozen=True)
class LayerRun:
  """Layers ``start..stop-1``: consecutive, all router layers or none."""

  start: int
  stop: int
  is_router: bool

  def __len__(self) -> int:
    return self.stop - self.start


def layer_runs(cfg: ModelConfig, stop: Optional[int] = None) -> list[LayerRun]:
  """The maximal runs of consecutive identical layers (same ``is_router``) of layers
  ``0..stop-1`` (default: all)."""
  stop = cfg.num_layers if stop is None else stop
  router = set(cfg.router_layer_ids)
  runs, start = [], 0
  for i in range(1, stop + 1):
    if i == stop or (i in router) != (start in router):
      runs.append(LayerRun(start, i, start in router))
      start = i
  return runs


def remat_policy_fn(name: str):
  """``jax.checkpoint``'s policy for ``ModelConfig.remat_policy`` ("none" has none)."""
  return {"none": None, "full": None,
          "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


def _pure_layer(cfg: ModelConfig, is_router: bool, method: str, in_scan: bool = True):
  """``fn(params, *args)``: one layer's ``method`` as a pure function of its parameters,
  checkpointed by ``cfg.remat_policy`` (a scan body unless ``in_scan=False``)."""
  layer = DecoderLayer(cfg, is_router=is_router, parent=None)

  def fn(params, *args):
    return layer.apply({"params": params}, *args, method=getattr(DecoderLayer, method))
  if cfg.remat_policy == "none":
    return fn
  # Inside a scan, XLA cannot merge the recomputation with the forward anyway: the
  # barriers of prevent_cse would only cost; outside one they keep the remat.
  return jax.checkpoint(fn, policy=remat_policy_fn(cfg.remat_policy), prevent_cse=not in_scan)


def _kernels_in(params, dtype):
  """``params`` with every matmul ``kernel`` cast to ``dtype`` (norm scales kept)."""
  return {k: (_kernels_in(v, dtype) if isinstance(v, collections.abc.Mapping)
              else v.astype(dtype) if k == "kernel" else v)
          for k, v in params.items()}


@functools.lru_cache(maxsize=None)
def _layer_param_axes(cfg: ModelConfig, is_router: bool):
  """A layer's parameter tree of ``nn.LogicallyPartitioned`` boxes (logical axis names)."""
  # The names do not depend on the attention implementation; XLA's traces anywhere.
  layer = DecoderLayer(cfg.replace(kernels="xla"), is_router=is_router, parent=None)
  x = jax.ShapeDtypeStruct((1, 1, cfg.hidden_size), cfg.jnp_dtype)
  pos = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  return jax.eval_shape(lambda x, pos, mask: layer.init(jax.random.PRNGKey(0), x, pos, mask,
                                                        method=DecoderLayer.encode),
                        x, pos, mask)["params"]


def _stack_decisions(decisions: Sequence[Routing]) -> dict:
  return dict(doc_scores_brn=jnp.stack([d.doc_scores_bn for d in decisions], axis=1),
              selected_brk=jnp.stack([d.doc_idx_bk for d in decisions], axis=1),
              selected_valid_brk=jnp.stack([d.valid_bk for d in decisions], axis=1))


def lm_head_weight_vd(params, cfg: ModelConfig):
  """The LM head as ``[vocab, D]`` from a parameter tree (boxed or not): the tied
  embedding, or ``lm_head``'s kernel transposed."""
  if cfg.tie_word_embeddings:
    return nn.unbox(params["embed_tokens"]["embedding"])
  return nn.unbox(params["lm_head"]["kernel"]).T


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
