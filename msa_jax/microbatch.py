"""Gradient accumulation: one optimizer step over ``microbatches`` slices of a batch.

A step at batch B with ``microbatches = k`` runs the forward and backward on k slices of
B/k rows in a ``lax.scan`` and sums their gradients, so peak activation memory is that of
B/k rows: what lets a cheaper remat policy (``model.remat_policy="dots"``, no second
forward) or a larger batch fit on one device.

The gradient is that of the full batch's loss, not a mean of the slices' losses: each
slice's LM loss is weighted by its share of the batch's target tokens, its routing loss
by its share of the (example, router layer) pairs and its document LM loss
(``loss.doc_lm_weight``) by its share of the document target tokens, all counted from the
data before the scan. Two terms couple the rows of a batch and are not reproduced
exactly: ``loss.aux_batch_negatives`` scores each query against the documents of its
slice (B/k·N candidates, not B·N), and the chunk-level routing loss, whose normaliser is
not counted here, is refused with ``microbatches > 1``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from msa_jax import losses
from msa_jax.batch import MSABatch

# Metrics that are counts (summed over slices) and means with their weights (the count
# each slice's mean is over); the rest are per-example means of equal-size slices.
SUMMED = ("target_tokens", "routing_pairs", "answer_samples", "retrieval_samples",
          "direct_samples", "doc_target_tokens")
WEIGHTED = {"lm_loss": "target_tokens", "aux_loss": "routing_pairs",
            "lm_loss_answer": "answer_samples", "lm_loss_retrieval": "retrieval_samples",
            "doc_lm_loss": "doc_target_tokens"}


def microbatches_of(cfg) -> int:
  """``config.microbatches`` (default 1: no accumulation), checked."""
  k = cfg.get("microbatches", 1)
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"microbatches must be an integer >= 1 (1: no gradient accumulation), "
                     f"got {k!r}")
  return k


def check_microbatches(cfg, batch_sizes, batch_shards: int) -> None:
  """Refuses a ``microbatches`` that does not split every stage's batch into slices that
  split evenly over the ``batch_shards`` data-parallel devices, or that is combined with
  a loss term it cannot weight (module docstring)."""
  k = microbatches_of(cfg)
  if k == 1:
    return
  for size in batch_sizes:
    if size % (k * batch_shards):
      raise ValueError(
          f"batch size {size} does not split into microbatches={k} slices of a multiple of "
          f"{batch_shards} rows (the data × fsdp devices): use a batch size that is a "
          f"multiple of {k * batch_shards}, or another --config.microbatches")
  loss = cfg.get("loss", {})
  for name in ("aux_chunk_weight",):
    if float(loss.get(name, 0.0) or 0.0) > 0:
      raise ValueError(f"loss.{name} > 0 is not supported with microbatches={k} (its "
                       f"normaliser is not counted across slices): set "
                       f"--config.microbatches=1 or --config.loss.{name}=0")


def split(batch: MSABatch, k: int) -> MSABatch:
  """``[B, ...]`` leaves as ``[k, B/k, ...]``: slice j holds rows j, j+k, j+2k, ..., so
  each slice takes rows from every data-parallel device's block of the batch."""
  def one(x):
    b = x.shape[0]
    return x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(one, batch)


def routing_pairs(batch: MSABatch, num_aux_layers: int):
  """The routing loss's pair count (``losses.infonce_decoupled``) from the data: the
  examples with a valid gold document, times the router layers the loss reads."""
  valid_bn = losses.doc_valid(batch.doc_mask)
  has_gold_b = jnp.any(jnp.asarray(batch.positive_docs, bool) & valid_bn, axis=-1)
  return jnp.sum(has_gold_b.astype(jnp.float32)) * num_aux_layers


def doc_lm_targets(batch: MSABatch):
  """The document LM loss's target count (``train_step.doc_lm_loss``) from the data: in
  every document slot, the valid tokens that follow a valid token."""
  return jnp.sum(losses.next_token_target_mask(batch.doc_mask).astype(jnp.float32))


def accumulate(loss_fn: Callable, params, batch: MSABatch, k: int, num_aux_layers: int,
               doc_lm_weight: float = 0.0):
  """``(grads, metrics)`` of the full batch from k slices. ``loss_fn(params, slice)``
  returns ``(total, metrics)`` with ``lm_loss``, ``aux_loss``, ``lm_weight``,
  ``aux_weight``, ``target_tokens`` and ``routing_pairs`` (``train_step.compute_losses``),
  and ``doc_lm_loss`` and ``doc_target_tokens`` when ``doc_lm_weight`` > 0."""
  tokens = jnp.maximum(jnp.sum(jnp.asarray(batch.loss_mask, jnp.float32)), 1.0)
  pairs = jnp.maximum(routing_pairs(batch, num_aux_layers), 1.0)
  doc_tokens = jnp.maximum(doc_lm_targets(batch), 1.0)

  def weighted(p, part):
    _, m = loss_fn(p, part)
    share_lm = jax.lax.stop_gradient(m["target_tokens"]) / tokens
    share_aux = jax.lax.stop_gradient(m["routing_pairs"]) / pairs
    total = m["lm_weight"] * m["lm_loss"] * share_lm + m["aux_weight"] * m["aux_loss"] * share_aux
    if doc_lm_weight > 0:
      share_doc = jax.lax.stop_gradient(m["doc_target_tokens"]) / doc_tokens
      total = total + doc_lm_weight * m["doc_lm_loss"] * share_doc
    return total, m

  grad_fn = jax.value_and_grad(weighted, has_aux=True)

  def body(grads_acc, part):
    (_, m), g = grad_fn(params, part)
    return jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads_acc, g), m

  # float32 sums whatever the parameters' dtype; the result in the parameters' dtype.
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  grads, per_slice = jax.lax.scan(body, zeros, split(batch, k))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return grads, combine_metrics(per_slice, doc_lm_weight)


def combine_metrics(per_slice: dict, doc_lm_weight: float = 0.0) -> dict:
  """One batch's metrics from ``[k, ...]`` per-slice metrics (``SUMMED``, ``WEIGHTED``,
  the rest averaged); ``loss`` is rebuilt from the combined terms."""
  out = {}
  for name, value in per_slice.items():
    if name in SUMMED:
      out[name] = jnp.sum(value, axis=0)
    elif name in WEIGHTED and WEIGHTED[name] in per_slice:
      w = per_slice[WEIGHTED[name]]
      out[name] = jnp.sum(value * w) / jnp.maximum(jnp.sum(w), 1.0)
    else:
      out[name] = jnp.mean(value, axis=0)
  out["loss"] = out["lm_weight"] * out["lm_loss"] + out["aux_weight"] * out["aux_loss"]
  if doc_lm_weight > 0:
    out["loss"] = out["loss"] + doc_lm_weight * out["doc_lm_loss"]
  return out
