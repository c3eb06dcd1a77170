"""The FLOPs one training step does, component by component (for MFU).

Counted from the model config and the batch's masks, the way the step computes:

* documents run layers ``0..last router`` (``encode_documents``); in the last router
  layer only K, V and the router keys are used, so XLA drops its attention, ``o_proj``
  and MLP (and ``q_proj``) and so does this count;
* the prefix runs every layer, the last one for K, V only;
* active tokens run every layer and attend ``[prefix ; k selected documents' chunks ;
  own causal]`` (chunks only in router layers), plus ``router_q_proj``;
* routing scores: routing tokens x chunks x ``Hkv*D`` per router layer;
* the LM head on the positions ``losses.lm_loss_chunked`` computes.

``useful``: valid tokens only, causal attention as ``i+1`` keys for the ``i``-th token,
the real number of selected chunks and routing tokens, LM head on target tokens.
``executed``: the padded shapes as the XLA reference computes them (every slot, full
``L x L`` masked attention, ``B*M`` routing rows, the LM head on whole chunks up to the
longest row's target count): what ``compiled.cost_analysis()`` sees, for checking.
The backward is 2x the forward (a gradient for the input and for the weight of every
matmul); ``nn.remat`` recomputes each layer's forward once more (``remat_recompute``,
reported apart: it is work done, not model FLOPs); with ``remat_policy="dots"`` only the
attention's and the routing's batched products are recomputed; with ``"mlp_input"`` all
but ``o_proj``.
"""
from __future__ import annotations

import math

import numpy as np

from msa_jax.config import ModelConfig


def _layer_matmul_per_token(cfg: ModelConfig) -> dict[str, float]:
  """Forward FLOPs per token of one layer's projections and MLP (2 per multiply-add)."""
  d, hd = cfg.hidden_size, cfg.head_dim
  q = 2 * d * cfg.num_heads * hd
  kv = 2 * 2 * d * cfg.num_kv_heads * hd
  o = 2 * cfg.num_heads * hd * d
  mlp = 3 * 2 * d * cfg.intermediate_size
  return {"q": q, "kv": kv, "o": o, "mlp": mlp,
          "router_q": q, "router_k": 2 * d * cfg.num_kv_heads * hd}


def _attn(cfg: ModelConfig, query_key_pairs: float) -> float:
  """QK^T and PV for ``query_key_pairs`` (query, key) pairs, all heads."""
  return 2 * 2 * cfg.num_heads * cfg.head_dim * query_key_pairs


def _doc_forward(cfg: ModelConfig, doc_tokens: float, doc_pairs: float) -> float:
  """Documents' forward: layers 0..last_router-1 in full, the last router layer for K, V
  only, router keys in every router layer."""
  per = _layer_matmul_per_token(cfg)
  full = per["q"] + per["kv"] + per["o"] + per["mlp"]
  routers = cfg.router_layer_ids
  return (max(routers) * (doc_tokens * full + _attn(cfg, doc_pairs))
          + doc_tokens * per["kv"] + len(routers) * doc_tokens * per["router_k"])


def encode_flops(cfg: ModelConfig, doc_lengths) -> float:
  """Useful forward FLOPs of encoding documents of these lengths into a bank (stage 1:
  the same per-document computation as training's document stream)."""
  lengths = np.asarray(doc_lengths, np.float64)
  return float(_doc_forward(cfg, lengths.sum(), (lengths * (lengths + 1) / 2).sum()))


def step_flops(cfg: ModelConfig, batch, *, lm_chunk_size: int = 64,
               mode: str = "useful") -> dict[str, float]:
  """FLOPs of one training step on ``batch`` (host numpy ``MSABatch``).

  Returns forward FLOPs per component (``doc_layers``, ``prefix_layers``,
  ``active_layers``, ``routing``, ``lm_head``), ``forward``, ``train`` (forward +
  backward = 3 x forward), ``remat_recompute`` (0 without ``cfg.remat``) and
  ``executed_total`` (``train`` + ``remat_recompute``).
  """
  if mode not in ("useful", "executed"):
    raise ValueError(f"mode must be 'useful' or 'executed', got {mode!r}")
  pad = mode == "executed"
  per = _layer_matmul_per_token(cfg)
  full = per["q"] + per["kv"] + per["o"] + per["mlp"]
  routers = cfg.router_layer_ids
  last_router, nl = max(routers), cfg.num_layers
  p = cfg.pooling_chunk_size

  doc_mask = np.asarray(batch.doc_mask, bool)
  b, n, l = doc_mask.shape
  prefix_mask = np.asarray(batch.prefix_mask, bool)
  active_mask = np.asarray(batch.active_mask, bool)
  question_mask = np.asarray(batch.question_mask, bool)
  loss_mask = np.asarray(batch.loss_mask, bool)
  t, m = prefix_mask.shape[1], active_mask.shape[1]
  c = math.ceil(l / p)

  doc_len_bn = doc_mask.sum(-1)
  if pad:
    doc_tokens, doc_pairs = b * n * l, b * n * l * l
  else:
    doc_tokens, doc_pairs = doc_len_bn.sum(), (doc_len_bn * (doc_len_bn + 1) / 2).sum()
  doc = _doc_forward(cfg, doc_tokens, doc_pairs)

  prefix_len_b = prefix_mask.sum(-1)
  if pad:
    prefix_tokens, prefix_pairs = b * t, b * t * t
  else:
    prefix_tokens, prefix_pairs = prefix_len_b.sum(), (prefix_len_b * (prefix_len_b + 1) / 2).sum()
  prefix = (nl - 1) * (prefix_tokens * full + _attn(cfg, prefix_pairs)) + prefix_tokens * per["kv"]

  active_len_b = active_mask.sum(-1)
  if pad:
    active_tokens = b * m
    own_pairs = b * m * m
    prefix_ctx = b * m * t
    chunk_ctx = b * m * cfg.top_k * c
  else:
    active_tokens = active_len_b.sum()
    own_pairs = (active_len_b * (active_len_b + 1) / 2).sum()
    prefix_ctx = (active_len_b * prefix_len_b).sum()
    # The k selected documents' chunks: k times the example's mean chunks per document.
    chunks_bn = np.ceil(doc_len_bn / p)
    valid_b = np.maximum((doc_len_bn > 0).sum(-1), 1)
    sel_chunks_b = np.minimum(cfg.top_k, (doc_len_bn > 0).sum(-1)) * chunks_bn.sum(-1) / valid_b
    chunk_ctx = (active_len_b * sel_chunks_b).sum()
  active = (nl * (active_tokens * full + _attn(cfg, own_pairs + prefix_ctx))
            + len(routers) * (active_tokens * per["router_q"] + _attn(cfg, chunk_ctx)))

  f = cfg.num_kv_heads * cfg.head_dim
  if pad:
    routing = len(routers) * 2 * b * m * n * c * f
  else:
    route_tokens_b = (active_mask & question_mask).sum(-1) if cfg.routing_tokens == "question" \
        else active_len_b
    routing = len(routers) * 2 * f * (route_tokens_b * np.ceil(doc_len_bn / p).sum(-1)).sum()

  targets_b = loss_mask.sum(-1)
  if pad:
    chunk = min(lm_chunk_size, m)
    head_rows = b * chunk * math.ceil(targets_b.max(initial=0) / chunk)
  else:
    head_rows = targets_b.sum()
  lm_head = 2 * cfg.hidden_size * cfg.vocab_size * head_rows

  forward = doc + prefix + active + routing + lm_head
  out = {"doc_layers": doc, "prefix_layers": prefix, "active_layers": active,
         "routing": routing, "lm_head": lm_head, "forward": forward, "train": 3 * forward}
  # nn.remat recomputes every layer's forward (routing included) in the backward, but
  # for its last matmul (down_proj): the gradient needs its input, not its output. The
  # LM-loss chunks are jax.checkpoint'ed, so their head matmul runs once more too.
  full_layer_tokens = last_router * doc_tokens + (nl - 1) * prefix_tokens + nl * active_tokens
  down = 2 * cfg.hidden_size * cfg.intermediate_size * full_layer_tokens
  layers_recompute = doc + prefix + active + routing - down
  if cfg.remat_policy == "mlp_input":
    # Each layer's residual after attention is saved: o_proj's output is never recomputed.
    layers_recompute -= _layer_matmul_per_token(cfg)["o"] * full_layer_tokens
  if cfg.remat_policy == "dots":
    # The projections' and MLP's outputs (dots without batch dimensions) are saved; the
    # attention's and the routing's batched products run again.
    layers_recompute = routing + (max(routers) * _attn(cfg, doc_pairs)
                                  + (nl - 1) * _attn(cfg, prefix_pairs)
                                  + nl * _attn(cfg, own_pairs + prefix_ctx)
                                  + len(routers) * _attn(cfg, chunk_ctx))
  out["remat_recompute"] = (layers_recompute if cfg.remat else 0.0) + lm_head
  out["executed_total"] = out["train"] + out["remat_recompute"]
  return {k: float(v) for k, v in out.items()}
