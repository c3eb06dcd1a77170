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

from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from msa_jax import batched_init
from msa_jax import positions as positions_lib
from msa_jax.batch import MSABatch
from msa_jax.config import ModelConfig
from msa_jax.decoder_layer import BATCH_LENGTH_EMBED, DecoderLayer
from msa_jax.layer_memory import (  # noqa: F401  (re-exported: the model's public types)
    ExampleLayerMemory, ExampleMemory, LayerContext, LayerKV, LayerMemory, Routing,
    pool_layer_memory, prefix_context, routing_mask)
from msa_jax.layer_runs import (  # noqa: F401
    LayerRun, kernels_in, layer_param_axes, layer_runs, pure_layer, remat_policy_fn)
from msa_jax.layers import Embed, RMSNorm, dense, rope_tables


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
  # float32 [B, R, N, C]: chunk scores for the chunk-level routing loss (``forward_train``'s
  # ``chunk_scores``); None otherwise.
  chunk_scores_brnc: Optional[jax.Array] = None
  # float32 [B, R, B*N]: each example's routing-loss scores of every document of the batch
  # (``forward_train``'s ``batch_negatives``); None otherwise.
  batch_scores_brx: Optional[jax.Array] = None


class MSAModel(nn.Module):
  """Qwen3 + Memory Sparse Attention.

  ``model.apply(vars, input_ids)`` → float32 logits ``[B, T, vocab]`` (plain
  Qwen3, positions ``0..T-1`` unless given). ``model.apply(vars, batch)`` with
  an :class:`MSABatch` → :class:`MSAOutput`.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
        grad=cfg.embed_grad,
        embedding_init=nn.with_logical_partitioning(
            batched_init.normal(cfg.initializer_range), ("vocab", "embed")),
        name="embed_tokens")
    layer_cls = (nn.remat(DecoderLayer, methods=["encode", "active"],
                          policy=remat_policy_fn(cfg.remat_policy))
                 if cfg.remat_policy != "none" else DecoderLayer)
    router_ids = set(cfg.router_layer_ids)
    self.layers = [layer_cls(cfg, is_router=i in router_ids, name=f"layers_{i}")
                   for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype,
                        vjp=cfg.rms_norm_vjp, name="norm")
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

  def _rope(self, positions):
    """What every layer's q/k paths take for RoPE: the positions, or with
    ``config.rope_tables`` their cos/sin computed here once (:func:`layers.rope_tables`)."""
    cfg = self.config
    if cfg.rope_tables:
      return rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    return positions

  def _causal_stream(self, tokens_bt, positions_bt, mask_bt):
    x = self._embed(tokens_bt)
    positions_bt = self._rope(positions_bt)
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
    pos = self._rope(doc_pos_bnl.reshape(b * n, l))
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
    prefix_pos_bt = self._rope(prefix_pos_bt)
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
    active_pos_bm = self._rope(active_pos_bm)
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

  def forward_train(self, batch: MSABatch, aux_softmax: float = 0.0,
                    chunk_scores: bool = False, oracle_routing: bool = False,
                    batch_negatives: bool = False) -> "MSATrainOutput":
    """The training forward: :meth:`forward_memory` without the LM head.

    Returns the final-normed hidden states of the active slots; the loss applies
    the LM head itself, in chunks over target positions (``losses.lm_loss_chunked``),
    so ``[B, M, vocab]`` logits never exist. ``aux_softmax`` > 0 (``loss.aux_softmax``)
    also returns the routing loss's smooth document scores at that temperature
    (``routing.smooth_document_scores``); selection and ``doc_scores_brn`` keep the max.
    ``chunk_scores`` also returns every chunk's score (``routing.hard_chunk_scores``) for
    the chunk-level routing loss. ``oracle_routing`` (``loss.oracle_routing``) puts each
    example's gold documents (``batch.positive_docs``) into every router layer's top-k
    (``routing.select_with_gold``); scores, recall and the routing loss stay the router's.
    ``batch_negatives`` (``loss.aux_batch_negatives``) also returns each example's
    routing-loss scores of every document of the batch (``ExampleLayerMemory.batch_scores``).
    """
    gold_bn = jnp.asarray(batch.positive_docs, bool) if oracle_routing else None
    x, decisions = self._forward_active_hidden(batch, aux_softmax, chunk_scores, gold_bn,
                                               batch_negatives)
    aux = chunks = batch_scores = None
    if aux_softmax > 0:
      aux = jnp.stack([d.aux_scores_bn for d in decisions], axis=1)
    if chunk_scores:
      chunks = jnp.stack([d.chunk_scores_bnc for d in decisions], axis=1)
    if batch_negatives:
      batch_scores = jnp.stack([d.batch_scores_bx for d in decisions], axis=1)
    return MSATrainOutput(hidden_bmd=self.norm(x), aux_scores_brn=aux, chunk_scores_brnc=chunks,
                          batch_scores_brx=batch_scores, **_stack_decisions(decisions))

  def _forward_active_hidden(self, batch: MSABatch, aux_softmax: float = 0.0,
                             chunk_scores: bool = False, gold_bn=None,
                             batch_negatives: bool = False):
    cfg = self.config
    prefix_pos, doc_pos, active_pos = positions_lib.stream_positions(
        jnp.asarray(batch.prefix_mask, bool), jnp.asarray(batch.doc_mask, bool),
        jnp.asarray(batch.active_mask, bool), top_k=cfg.top_k, rope_mode=cfg.rope_mode,
        doc_gaps_bn1=batch.doc_position_gaps)
    if self._scanning():
      params = self._stacked_params()   # stacked once, used by the three passes
      memory = self._encode_documents_scanned(jnp.asarray(batch.doc_tokens), batch.doc_mask,
                                              doc_pos, params)
      prefix_kv = self._encode_prefix_scanned(batch.prefix_tokens, batch.prefix_mask,
                                              prefix_pos, params)
      return self._active_hidden_scanned(batch.active_tokens, active_pos, batch.active_mask,
                                         routing_mask(batch, cfg), batch.prefix_mask,
                                         prefix_kv, memory, params, aux_softmax,
                                         chunk_scores, gold_bn, batch_negatives)
    memory = ExampleMemory(
        self.encode_documents(jnp.asarray(batch.doc_tokens), batch.doc_mask, doc_pos),
        aux_softmax=aux_softmax, chunk_scores=chunk_scores, gold_bn=gold_bn,
        batch_negatives=batch_negatives)
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
    return kernels_in(nn.unbox(self.variables["params"][f"layers_{i}"]),
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
    axes = layer_param_axes(self.config, run.is_router)
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
    pos = self._rope(doc_pos_bnl.reshape(b * n, l))   # outside the scans: computed once
    x = self._embed(doc_tokens_bnl.reshape(b * n, l))
    runs = layer_runs(cfg, stop=max(cfg.router_layer_ids) + 1)
    out = []
    for r, run in enumerate(runs):
      encode = pure_layer(cfg, run.is_router, "encode")

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
        peeled = pure_layer(cfg, True, "encode", in_scan=False)
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
    prefix_pos_bt = self._rope(prefix_pos_bt)
    out = []
    for run in layer_runs(self.config):
      encode = pure_layer(self.config, run.is_router, "encode")

      def body(x, p):
        x, k, v, _ = encode(p, x, prefix_pos_bt, mask)
        return x, (k, v)

      x, kv = jax.lax.scan(body, x, stacked[run.start])
      out.append((run, kv))
    return out

  def _active_hidden_scanned(self, active_tokens_bm, active_pos_bm, active_mask_bm,
                             route_mask_bm, prefix_mask_bt, prefix_kv, memory, stacked,
                             aux_softmax: float = 0.0, chunk_scores: bool = False,
                             gold_bn=None, batch_negatives: bool = False):
    """:meth:`_active_hidden` over per-example memory, scanned: each layer's prefix
    context and (router runs) memory are scanned inputs, its routing a stacked output
    (with the smooth aux scores when ``aux_softmax`` > 0, as ``ExampleMemory``'s).
    Returns ``(x [B, M, D] before the final norm, decisions)`` like the unrolled path."""
    cfg = self.config
    x = self._embed(active_tokens_bm)
    mask = jnp.asarray(active_mask_bm, bool)
    active_pos_bm = self._rope(active_pos_bm)
    prefix_mask = jnp.asarray(prefix_mask_bt, bool)
    memory_of = {run.start: stacked for run, stacked in memory}
    decisions = []
    for run, (k_lbtgd, v_lbtgd) in prefix_kv:
      active = pure_layer(cfg, run.is_router, "active")

      def body(x, xs):
        p, k, v, mem = xs
        layer_memory = None if mem is None else ExampleLayerMemory(
            mem, aux_softmax=aux_softmax, chunk_scores=chunk_scores, gold_bn=gold_bn,
            batch_negatives=batch_negatives)
        x, _, _, decision, _ = active(p, x, active_pos_bm, mask,
                                      LayerContext(k, v, prefix_mask), layer_memory,
                                      route_mask_bm)
        return x, decision

      mem = memory_of.get(run.start) if run.is_router else None
      x, decision = jax.lax.scan(body, x, (stacked[run.start], k_lbtgd, v_lbtgd, mem))
      if decision is not None:
        decisions += [jax.tree.map(lambda a, j=j: a[j], decision) for j in range(len(run))]
    return x, decisions


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
