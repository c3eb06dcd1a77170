"""Masked GQA attention over ``[context ; causal self]`` (plain-XLA path).

Every attention in the model is one call of :func:`attend`:
  * a document or the prefix: no context, causal over its own tokens;
  * active tokens of a lower layer: context = prefix K/V;
  * active tokens of a router layer: context = prefix K/V then the pooled
    chunks of the selected documents (SPEC §3 step 4);
  * a decoding step whose own K/V is already in its KV cache: the cache buffer is the
    whole context (:func:`attend_context`).
``pallas_kernels.sparse_attention`` implements the same signature.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _context_then_own(ctx_bsgd, own_bmgd):
  """``[context ; own]`` along the key axis (the context cast to the own tokens' dtype);
  either may be None."""
  if own_bmgd is None:
    return ctx_bsgd
  if ctx_bsgd is None:
    return own_bmgd
  return jnp.concatenate([ctx_bsgd.astype(own_bmgd.dtype), own_bmgd], axis=1)


def attention_probs(q_bmhd, k_self_bmgd, self_mask_bm, k_ctx_bsgd=None, ctx_mask_bs=None):
  """The attention probabilities of :func:`attend`: ``[B, Hkv, H/Hkv, M, S+M]`` float32.

  Key axis: the ``S`` context slots (none without context), then the ``M`` own tokens.
  A query with no visible key gets an all-zero row. Also what interpretability tools
  record (``launch.lookup_attention``), so they see exactly the model's attention.
  """
  b, m, h, d = q_bmhd.shape
  k = _context_then_own(k_ctx_bsgd, k_self_bmgd)
  g = k.shape[2]
  if h % g:
    raise ValueError(f"{h} query heads are not a multiple of {g} kv heads")
  r = h // g
  allow = []
  if k_ctx_bsgd is not None:
    allow.append(jnp.broadcast_to(ctx_mask_bs[:, None, :], (b, m, k_ctx_bsgd.shape[1])))
  if k_self_bmgd is not None:
    allow.append(jnp.tril(jnp.ones((m, m), bool))[None] & self_mask_bm[:, None, :])
  allow_bmk = jnp.concatenate(allow, axis=-1) if len(allow) > 1 else allow[0]
  q_bmgrd = q_bmhd.reshape(b, m, g, r, d)
  logits = jnp.einsum("bmgrd,bkgd->bgrmk", q_bmgrd, k,
                      preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
  logits = jnp.where(allow_bmk[:, None, None], logits, -jnp.inf)
  any_key = jnp.any(allow_bmk, axis=-1)[:, None, None, :, None]
  logits = jnp.where(any_key, logits, 0.0)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.where(any_key, probs, 0.0)


def attend(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm,
           k_ctx_bsgd=None, v_ctx_bsgd=None, ctx_mask_bs=None):
  """Softmax attention of each query to valid context slots and earlier own tokens.

  Args:
    q_bmhd: queries ``[B, M, H, D]`` (already RoPE'd).
    k_self_bmgd, v_self_bmgd: the sequence's own keys/values ``[B, M, Hkv, D]``.
    self_mask_bm: valid own tokens; token i sees own token j iff j <= i and valid.
      All three None: no own tokens, the context alone (:func:`attend_context`).
    k_ctx_bsgd, v_ctx_bsgd: optional context ``[B, S, Hkv, D]`` visible to every query.
    ctx_mask_bs: valid context slots.
  Returns:
    ``[B, M, H, D]`` in the dtype of ``q``; softmax in float32 with scale 1/sqrt(D).
    A query with no visible key (only padding rows) returns zeros.
  """
  b, m, h, d = q_bmhd.shape
  probs = attention_probs(q_bmhd, k_self_bmgd, self_mask_bm, k_ctx_bsgd, ctx_mask_bs)
  v = _context_then_own(v_ctx_bsgd, v_self_bmgd)
  out = jnp.einsum("bgrmk,bkgd->bmgrd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, m, h, d).astype(q_bmhd.dtype)


def attend_context(q_bmhd, k_ctx_bsgd, v_ctx_bsgd, ctx_mask_bs):
  """Softmax attention of each query to the valid context slots only (no own tokens).

  A decoding step whose own K/V is already written into its KV cache buffer (the buffer
  is the whole context; ``ctx_mask_bs`` marks the valid slots, the token's own included).
  ``[B, M, H, D]`` in the dtype of ``q``; a query with no valid slot returns zeros.
  """
  return attend(q_bmhd, None, None, None, k_ctx_bsgd, v_ctx_bsgd, ctx_mask_bs)
