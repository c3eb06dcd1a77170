"""The model's input: one batch of MSA examples with static shapes.

Every array is right-padded to a static size so the forward jits once per
shape bucket. Shapes use B (batch), T (prefix slots), N (document slots),
L (tokens per document slot), M (active slots: question then target).

Layout of one example (SPEC §2):
  prefix   ``prefix_tokens[b, :T]``      shared template, positions 0..T_b-1
  docs     ``doc_tokens[b, n, :L]``       document n, positions restart at 0
  active   ``active_tokens[b, :M]``       question then target, positions from T_b + k

A document slot whose ``doc_mask`` row is all False is padding: it is never
routed to and never selected. ``targets[b, i]`` is the token that follows
``active_tokens[b, i]``; ``loss_mask[b, i]`` marks the positions whose target
is a target token (the LM loss is taken there only).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class MSABatch:
  """A padded batch of MSA examples (arrays may be numpy or jax)."""

  prefix_tokens: Any   # int32 [B, T]
  prefix_mask: Any     # bool  [B, T]  valid prefix tokens (left-aligned)
  doc_tokens: Any      # int32 [B, N, L]
  doc_mask: Any        # bool  [B, N, L] valid tokens (left-aligned per slot)
  active_tokens: Any   # int32 [B, M]  question tokens then target tokens
  active_mask: Any     # bool  [B, M]  valid active tokens (left-aligned)
  question_mask: Any   # bool  [B, M]  question tokens (the routing query)
  targets: Any         # int32 [B, M]  next token after each active position
  loss_mask: Any       # bool  [B, M]  positions whose next token is a target token
  positive_docs: Any   # bool  [B, N]  gold documents (aux loss, router recall)
  # int32 [B, N + 1] or None. Global RoPE only: positions skipped before document slot n
  # (n < N) and before the active tokens (n = N), so a short training memory is numbered
  # as if it were spread over a longer one (``data.global_position_span``). None: no gaps.
  doc_position_gaps: Any = None

  @property
  def shape_summary(self) -> dict[str, int]:
    b, t = np.shape(self.prefix_tokens)
    _, n, l = np.shape(self.doc_tokens)
    _, m = np.shape(self.active_tokens)
    return dict(batch=b, prefix=t, docs=n, doc_len=l, active=m)


def target_mask(batch: MSABatch):
  """Active tokens that belong to the target (everything valid after the question)."""
  return jnp.logical_and(batch.active_mask, jnp.logical_not(batch.question_mask))
