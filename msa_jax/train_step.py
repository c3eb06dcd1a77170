"""The jitted training step: MSA forward, SPEC §4 losses, router metrics, AdamW update."""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from absl import logging

from msa_jax import batched_init, losses, microbatch
from msa_jax.batch import MSABatch
from msa_jax.model import MSAModel, lm_head_weight_vd, routing_mask
from msa_jax.optimizer import learning_rate_schedule, loss_weights


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator."""

  step: jax.Array
  params: Any
  opt_state: Any


def init_train_state(model: MSAModel, tx: optax.GradientTransformation, rng, example_ids):
  """Fresh parameters (boxed with logical axis names) and optimizer state. The weights'
  random draws are made one call per group of alike matrices
  (:func:`msa_jax.batched_init.grouped_draws`: the same values as ``model.init``, from a
  program with fewer kernels to compile); ``model`` without remat keeps the grouping whole
  (a lifted transform makes it fall back to drawing each alone)."""
  params = batched_init.grouped_draws(lambda: model.init(rng, example_ids))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def aux_loss_layers(model_cfg) -> list[int]:
  """Positions (in the router-layer axis R) of the router layers the aux loss covers.

  SPEC §4: the router layers in the upper half of the model (index >=
  ``num_layers // 2``). A config with none there gets no aux term (an empty
  list) and a logged warning: its router projections then receive no gradient.
  """
  ids = model_cfg.router_layer_ids
  upper = [r for r, layer in enumerate(ids) if layer >= model_cfg.num_layers // 2]
  if not upper:
    _warn_no_aux_layers(ids, model_cfg.num_layers)
  return upper


@functools.lru_cache(maxsize=None)
def _warn_no_aux_layers(router_ids: tuple[int, ...], num_layers: int) -> None:
  logging.warning(
      "no router layer in the upper half: router_layers %s of %d layers are all below "
      "layer %d, so the routing loss (SPEC §4: upper-half router layers only) has no term "
      "and aux_loss is 0; the router projections get no gradient and stay at their "
      "initialisation. Put at least one router layer at index >= %d (model.router_layers) "
      "to train the router.", list(router_ids), num_layers, num_layers // 2, num_layers // 2)


def _loss_value(cfg, key: str, default):
  """``cfg.loss[key]`` as stored, ``default`` when the config predates it."""
  loss_cfg = cfg.get("loss") if hasattr(cfg, "get") else None
  return (loss_cfg or {}).get(key, default)


def _loss_setting(cfg, key: str, default, meaning_of_zero: str = ""):
  """``cfg.loss[key]`` (``default`` when the config predates it); with
  ``meaning_of_zero``, a negative value is an error naming the field."""
  value = type(default)(_loss_value(cfg, key, default))
  if meaning_of_zero and value < 0:
    raise ValueError(f"loss.{key} must be >= 0 (0: {meaning_of_zero}), got {value}; "
                     f"set --config.loss.{key}")
  return value


def lm_chunk_size(cfg) -> int:
  """Active positions per example in one chunk of the LM loss (``loss.lm_chunk_size``,
  default 64): one chunk's float32 logits take ``local batch x this x vocab x 4`` bytes."""
  return _loss_setting(cfg, "lm_chunk_size", 64)   # < 1 is refused by the loss


def doc_lm_weight(cfg) -> float:
  """Weight of the document LM loss (``loss.doc_lm_weight``, default 0: none)."""
  return _loss_setting(cfg, "doc_lm_weight", 0.0, "no document LM loss")


def doc_lm_loss(model: MSAModel, params, batch: MSABatch, chunk_size: int):
  """Next-token loss inside the memory documents: ``(mean loss, predicted tokens)``.

  Each document slot runs alone through the plain causal LM (``MSAModel.lm_hidden``) and
  predicts its own next tokens, so a backbone trained from scratch learns what its
  documents say, as a pretrained one (the paper's) already has. Padding slots predict
  nothing.
  """
  b, n, l = batch.doc_tokens.shape
  tokens = jnp.asarray(batch.doc_tokens, jnp.int32).reshape(b * n, l)
  mask = jnp.asarray(batch.doc_mask, bool).reshape(b * n, l)
  hidden = model.apply({"params": params}, tokens, mask, method=MSAModel.lm_hidden)
  return losses.lm_loss_chunked(hidden[:, :-1], lm_head_weight_vd(params, model.config),
                                tokens[:, 1:], losses.next_token_target_mask(mask),
                                chunk_size)


def aux_softmax(cfg) -> float:
  """The temperature of the routing loss's smooth document score (``loss.aux_softmax``,
  default 0: the hard max over tokens and chunks, as routing itself uses;
  ``routing.smooth_document_scores``)."""
  return _loss_setting(cfg, "aux_softmax", 0.0, "hard max")


def oracle_routing(cfg) -> bool:
  """``loss.oracle_routing`` (default False): every router layer selects the example's gold
  documents (plus the router's best others up to top-k) in the training forward, so the
  reader learns on the right documents whatever the router does; scores, recall and the
  routing loss remain the router's. An ablation (is a reader held back by misrouting?),
  not a recipe setting: evaluation routes with the router."""
  value = _loss_value(cfg, "oracle_routing", False)
  if value not in (True, False):
    raise ValueError(f"loss.oracle_routing must be True or False, got {value!r}; "
                     "set --config.loss.oracle_routing=True or False")
  return bool(value)


def aux_chunk_weight(cfg) -> float:
  """Weight of the chunk-level routing loss (``loss.aux_chunk_weight``, default 0: none),
  relative to the document-level one and under the same schedule: InfoNCE whose positives
  are the chunks holding the routing query verbatim (``losses.evidence_chunks``)."""
  return _loss_setting(cfg, "aux_chunk_weight", 0.0, "no chunk-level routing loss")


def aux_batch_negatives(cfg) -> bool:
  """``loss.aux_batch_negatives`` (default False): the routing loss scores each example's
  query against every document of the batch, its own gold documents the positives
  (``losses.batch_negative_targets``), so a batch of B examples of N documents trains the
  router against B·N candidates instead of N: routing at banks far larger than a training
  memory is what it is for. Costs ``[B, M, B·N, C]`` float32 scores a router layer."""
  value = _loss_value(cfg, "aux_batch_negatives", False)
  if value not in (True, False):
    raise ValueError(f"loss.aux_batch_negatives must be True or False, got {value!r}; "
                     "set --config.loss.aux_batch_negatives=True or False")
  return bool(value)


def lm_loss_by_round(nll_b, count_b, batch: MSABatch, answer_token: int) -> dict:
  """The LM loss of the answer samples (target starts with ``answer_token``, the
  end-of-retrieval marker) and of the retrieval samples (document ids; no marker in the
  target) apart: one mean hides a reader at chance behind ids that are learnt, as the
  tiny recipe's did. A direct sample (ids, then the marker and the answer in one target:
  a task without Memory Interleave) is neither; ``direct_samples`` counts them."""
  mask_bm = jnp.asarray(batch.loss_mask, bool)
  targets_bm = jnp.asarray(batch.targets)
  first_m = jnp.argmax(mask_bm, axis=-1)
  first_b = jnp.take_along_axis(targets_bm, first_m[:, None], axis=-1)[:, 0]
  has_b = jnp.any(mask_bm, axis=-1)
  marker_b = jnp.any(mask_bm & (targets_bm == answer_token), axis=-1)
  answer_b = has_b & (first_b == answer_token)
  retrieval_b = has_b & ~marker_b
  count = lambda rows_b: jnp.sum(rows_b.astype(jnp.float32))
  return {"lm_loss_answer": losses.mean_nll(nll_b, count_b, answer_b)[0],
          "lm_loss_retrieval": losses.mean_nll(nll_b, count_b, retrieval_b)[0],
          "answer_samples": count(answer_b), "retrieval_samples": count(retrieval_b),
          "direct_samples": count(marker_b & ~answer_b)}


def compute_losses(model: MSAModel, params, batch: MSABatch, step, cfg,
                   answer_token: int | None = None):
  """Weighted loss and the metrics of one batch (no parameter update).

  ``answer_token`` (the data's end-of-retrieval id) adds the answer and retrieval
  samples' LM losses apart (:func:`lm_loss_by_round`); None leaves them out.
  """
  chunk_w = aux_chunk_weight(cfg)
  aux_layers = aux_loss_layers(model.config)
  batch_negatives = aux_batch_negatives(cfg) and bool(aux_layers)
  out = model.apply({"params": params}, batch, aux_softmax(cfg), chunk_w > 0 and bool(aux_layers),
                    oracle_routing(cfg), batch_negatives, method=MSAModel.forward_train)
  nll_b, count_b = losses.lm_nll_rows_chunked(
      out.hidden_bmd, lm_head_weight_vd(params, model.config), batch.targets, batch.loss_mask,
      lm_chunk_size(cfg))
  lm, num_targets = losses.mean_nll(nll_b, count_b)
  valid_bn = losses.doc_valid(batch.doc_mask)
  if batch_negatives:
    pos_bx, valid_bx = losses.batch_negative_targets(batch.positive_docs, valid_bn,
                                                     batch.doc_tokens, batch.doc_mask)
    aux, pairs = losses.infonce_decoupled(out.batch_scores_brx[:, jnp.asarray(aux_layers)],
                                          pos_bx, valid_bx, cfg.loss.infonce_temperature)
  elif aux_layers:
    scores_brn = out.doc_scores_brn if out.aux_scores_brn is None else out.aux_scores_brn
    aux, pairs = losses.infonce_decoupled(scores_brn[:, jnp.asarray(aux_layers)],
                                          batch.positive_docs, valid_bn,
                                          cfg.loss.infonce_temperature)
  else:   # no router layer in the upper half: no aux term (SPEC §4)
    aux, pairs = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  lm_w, aux_w = loss_weights(cfg, step)
  total = lm_w * lm + aux_w * aux
  extra = {} if answer_token is None else lm_loss_by_round(nll_b, count_b, batch, answer_token)
  if out.chunk_scores_brnc is not None:
    cfg_m = model.config
    evidence = losses.evidence_chunks(batch.doc_tokens, batch.doc_mask, batch.active_tokens,
                                      routing_mask(batch, cfg_m), batch.positive_docs,
                                      cfg_m.pooling_chunk_size)
    chunk_valid = jnp.isfinite(out.chunk_scores_brnc[:, 0])
    chunk_aux, chunk_pairs = losses.chunk_infonce(
        out.chunk_scores_brnc[:, jnp.asarray(aux_layers)], evidence, chunk_valid,
        cfg.loss.infonce_temperature)
    total = total + aux_w * chunk_w * chunk_aux
    extra.update(chunk_aux_loss=chunk_aux, chunk_routing_pairs=chunk_pairs)
  doc_w = doc_lm_weight(cfg)
  if doc_w > 0:
    doc_lm, doc_targets = doc_lm_loss(model, params, batch, lm_chunk_size(cfg))
    total = total + doc_w * doc_lm
    extra.update(doc_lm_loss=doc_lm, doc_target_tokens=doc_targets)
  router = losses.router_metrics(out.doc_scores_brn, out.selected_brk, out.selected_valid_brk,
                                 batch.positive_docs, valid_bn)
  metrics = {"loss": total, "lm_loss": lm, "aux_loss": aux, "target_tokens": num_targets,
             "routing_pairs": pairs, "lm_weight": lm_w, "aux_weight": aux_w, **extra}
  for name, per_layer in router.items():
    metrics[f"router_{name}"] = jnp.mean(per_layer)
    metrics[f"router_{name}_per_layer"] = per_layer
  return total, metrics


def train_step(model: MSAModel, tx: optax.GradientTransformation, cfg, state: TrainState,
               batch: MSABatch, answer_token: int | None = None):
  """One AdamW step on ``batch``; returns the new state and the step's metrics
  (``answer_token``: as :func:`compute_losses`). With ``config.microbatches`` k > 1 the
  gradient is accumulated over k slices of the batch (``msa_jax.microbatch``)."""
  loss_fn = lambda p, b: compute_losses(model, p, b, state.step, cfg, answer_token)
  k = microbatch.microbatches_of(cfg)
  if k == 1:
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
  else:
    grads, metrics = microbatch.accumulate(loss_fn, state.params, batch, k,
                                           len(aux_loss_layers(model.config)),
                                           doc_lm_weight(cfg))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["learning_rate"] = learning_rate_schedule(cfg)(state.step)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
