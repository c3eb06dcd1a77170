"""Chunk pooling of document keys, values and router keys (SPEC §3 step 1)."""
from __future__ import annotations

import jax.numpy as jnp


def num_chunks(doc_len: int, chunk_size: int) -> int:
  """Chunks covering ``doc_len`` token slots (the last one may be partial)."""
  if chunk_size < 1:
    raise ValueError(f"pooling chunk size must be >= 1, got {chunk_size}")
  return -(-doc_len // chunk_size)


def mean_pool_chunks(x_nl_rest, mask_nl, chunk_size: int):
  """Mean over the present tokens of each chunk of P consecutive tokens.

  Args:
    x_nl_rest: ``[..., L, *feature]`` per-token values (any float dtype).
    mask_nl: bool ``[..., L]``; tokens of a document are left-aligned.
    chunk_size: P.
  Returns:
    ``(pooled [..., C, *feature] float32, chunk_mask [..., C] bool)`` with
    ``C = ceil(L / P)``; a chunk with no present token is zero and masked.
  """
  lead = mask_nl.shape[:-1]
  length = mask_nl.shape[-1]
  feat = x_nl_rest.shape[len(lead) + 1:]
  c = num_chunks(length, chunk_size)
  pad = c * chunk_size - length
  x = x_nl_rest.astype(jnp.float32)
  m = mask_nl.astype(jnp.float32)
  if pad:
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)] + [(0, 0)] * len(feat))
    m = jnp.pad(m, [(0, 0)] * len(lead) + [(0, pad)])
  x = x.reshape(*lead, c, chunk_size, *feat)
  m = m.reshape(*lead, c, chunk_size)
  m_x = m.reshape(*lead, c, chunk_size, *([1] * len(feat)))
  total = jnp.sum(x * m_x, axis=len(lead) + 1)
  count = jnp.sum(m, axis=-1)
  count_x = count.reshape(*lead, c, *([1] * len(feat)))
  pooled = total / jnp.maximum(count_x, 1.0)
  return pooled, count > 0
