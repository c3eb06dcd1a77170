"""Position ids of the three token streams (SPEC §2).

Document-wise RoPE (the paper's "parallel + global" RoPE, default): the prefix
is numbered ``0..T-1``, every document restarts at ``0..len-1``, and the active
context (question, then target) starts at ``T + k`` whatever the number of
documents. Global RoPE (the ablation baseline, ``rope_mode="global"``) numbers
prefix, documents (in slot order) and active tokens continuously.
"""
from __future__ import annotations

import jax.numpy as jnp


def stream_positions(prefix_mask_bt, doc_mask_bnl, active_mask_bm, *, top_k: int,
                     rope_mode: str, doc_gaps_bn1=None):
  """Returns ``(prefix_pos [B,T], doc_pos [B,N,L], active_pos [B,M])`` int32.

  Masks are left-aligned: valid tokens first in each row. Positions of padding
  slots are well defined but never matter. ``doc_gaps_bn1`` (int [B, N+1], global
  RoPE only; ``MSABatch.doc_position_gaps``): positions skipped before each document
  slot and, in the last column, before the active tokens. Document-wise RoPE
  ignores it (its positions do not depend on where a document sits).
  """
  b, t = prefix_mask_bt.shape
  _, n, l = doc_mask_bnl.shape
  m = active_mask_bm.shape[1]
  prefix_len_b = jnp.sum(prefix_mask_bt, axis=-1, dtype=jnp.int32)
  prefix_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  arange_l = jnp.arange(l, dtype=jnp.int32)
  arange_m = jnp.arange(m, dtype=jnp.int32)
  if rope_mode == "document":
    doc_pos = jnp.broadcast_to(arange_l, (b, n, l))
    active_start_b = prefix_len_b + top_k
  elif rope_mode == "global":
    doc_len_bn = jnp.sum(doc_mask_bnl, axis=-1, dtype=jnp.int32)
    span_bn = doc_len_bn
    active_gap_b = jnp.zeros((b,), jnp.int32)
    if doc_gaps_bn1 is not None:
      gaps_bn1 = jnp.asarray(doc_gaps_bn1, jnp.int32)
      span_bn = doc_len_bn + gaps_bn1[:, :n]
      active_gap_b = gaps_bn1[:, n]
    doc_start_bn = prefix_len_b[:, None] + jnp.cumsum(span_bn, axis=-1) - doc_len_bn
    doc_pos = doc_start_bn[..., None] + arange_l[None, None, :]
    active_start_b = prefix_len_b + jnp.sum(span_bn, axis=-1) + active_gap_b
  else:
    raise ValueError(f"rope_mode must be 'document' or 'global', got {rope_mode!r}")
  active_pos = active_start_b[:, None] + arange_m[None, :]
  return prefix_pos, doc_pos, active_pos
