"""Pad a list of Examples into one static-shape ``MSABatch`` (numpy), with shape buckets.

Nothing is ever truncated: an example that does not fit the bucket raises.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from msa_jax.batch import MSABatch
from msa_jax.data.example import Example


@dataclasses.dataclass(frozen=True, order=True)
class BucketShapes:
  """Static padded sizes of one batch: B, T, N, L, M of ``MSABatch``."""

  batch: int
  prefix: int
  docs: int
  doc_len: int
  active: int

  def misfits(self, ex: Example) -> list[str]:
    """Why ``ex`` does not fit (empty when it fits)."""
    out = []
    if len(ex.prefix) > self.prefix:
      out.append(f"prefix {len(ex.prefix)} > {self.prefix}")
    if len(ex.docs) > self.docs:
      out.append(f"docs {len(ex.docs)} > {self.docs}")
    if ex.max_doc_length > self.doc_len:
      out.append(f"doc_len {ex.max_doc_length} > {self.doc_len}")
    if ex.active_length > self.active:
      out.append(f"active {ex.active_length} > {self.active}")
    return out

  def fits(self, ex: Example) -> bool:
    return not self.misfits(ex)

  @property
  def slots_per_example(self) -> int:
    """Token slots one example occupies (the padded cost that buckets minimise)."""
    return self.prefix + self.docs * self.doc_len + self.active


def choose_bucket(ex: Example, buckets: Sequence[BucketShapes]) -> int:
  """Index of the smallest bucket (fewest slots per example) that fits ``ex``.

  Raises ValueError listing why each bucket fails, so the fix (add or enlarge a
  bucket) is clear. Ties keep the earlier bucket.
  """
  if not buckets:
    raise ValueError("no bucket shapes configured; give at least one BucketShapes")
  best = None
  for n, b in enumerate(buckets):
    if b.fits(ex) and (best is None or b.slots_per_example < buckets[best].slots_per_example):
      best = n
  if best is None:
    reasons = "; ".join(f"{b}: {', '.join(b.misfits(ex))}" for b in buckets)
    raise ValueError(
        f"example (task {ex.task!r}) fits no bucket ({reasons}); add a bigger "
        "BucketShapes (e.g. fit_bucket([...])) instead of truncating")
  return best


def fit_bucket(examples: Sequence[Example], batch: int, multiple: int = 8) -> BucketShapes:
  """The tightest bucket holding all ``examples``, sizes rounded up to ``multiple``.

  Doc count is not rounded (document slots are the costly dimension).
  """
  up = lambda n: max(multiple, int(math.ceil(n / multiple)) * multiple)
  return BucketShapes(
      batch=batch,
      prefix=up(max(len(e.prefix) for e in examples)),
      docs=max(len(e.docs) for e in examples),
      doc_len=up(max(e.max_doc_length for e in examples)),
      active=up(max(e.active_length for e in examples)))


def collate(examples: Sequence[Example], shapes: BucketShapes) -> MSABatch:
  """Pad ``examples`` into an ``MSABatch`` of numpy arrays with ``shapes``.

  Layout: active = question then target; ``targets[i]`` = active token i+1;
  ``loss_mask[i]`` is true where active token i+1 is a target token (so the
  first target token is predicted from the last question token).
  ``positive_docs`` marks the slots of ``positive_doc_ids``. Fewer examples
  than ``shapes.batch`` leave padding rows (all masks False). Raises if an
  example does not fit (never truncates).
  """
  b, t, n, l, m = (shapes.batch, shapes.prefix, shapes.docs, shapes.doc_len,
                   shapes.active)
  if len(examples) > b:
    raise ValueError(f"{len(examples)} examples > batch size {b}; split them "
                     "or use a bucket with a larger batch")
  prefix_tokens = np.zeros((b, t), np.int32)
  prefix_mask = np.zeros((b, t), bool)
  doc_tokens = np.zeros((b, n, l), np.int32)
  doc_mask = np.zeros((b, n, l), bool)
  active_tokens = np.zeros((b, m), np.int32)
  active_mask = np.zeros((b, m), bool)
  question_mask = np.zeros((b, m), bool)
  targets = np.zeros((b, m), np.int32)
  loss_mask = np.zeros((b, m), bool)
  positive_docs = np.zeros((b, n), bool)
  for row, ex in enumerate(examples):
    misfits = shapes.misfits(ex)
    if misfits:
      raise ValueError(f"example {row} (task {ex.task!r}) does not fit {shapes}: "
                       f"{', '.join(misfits)}; choose a bigger bucket "
                       "(choose_bucket) instead of truncating")
    prefix_tokens[row, :len(ex.prefix)] = ex.prefix
    prefix_mask[row, :len(ex.prefix)] = True
    slot = {}
    for k, d in enumerate(ex.docs):
      doc_tokens[row, k, :len(d.tokens)] = d.tokens
      doc_mask[row, k, :len(d.tokens)] = True
      slot[d.doc_id] = k
    for p in ex.positive_doc_ids:
      positive_docs[row, slot[p]] = True
    q, a = len(ex.question), ex.active_length
    active = list(ex.question) + list(ex.target)
    active_tokens[row, :a] = active
    active_mask[row, :a] = True
    question_mask[row, :q] = True
    targets[row, :a - 1] = active[1:]
    loss_mask[row, q - 1:a - 1] = True
  return MSABatch(
      prefix_tokens=prefix_tokens, prefix_mask=prefix_mask,
      doc_tokens=doc_tokens, doc_mask=doc_mask,
      active_tokens=active_tokens, active_mask=active_mask,
      question_mask=question_mask, targets=targets, loss_mask=loss_mask,
      positive_docs=positive_docs)


def global_position_gaps(doc_mask_bnl, span: int, rng: np.random.Generator) -> np.ndarray:
  """Random position gaps (``MSABatch.doc_position_gaps``, int32 [B, N+1]) that spread each
  row's documents over ``span`` positions, for global RoPE.

  A row whose documents hold ``total < span`` tokens gets ``span - total`` positions
  split uniformly at random (sorted uniform cut points) between the gaps before each of
  its documents and the gap before its active tokens, so its question starts at
  ``prefix + span`` and its documents keep their order at random distances from it: the
  position distances of a ``span``-token memory, seen on a short one. Rows already at
  or over ``span`` tokens, empty rows and padding document slots get no gap.
  """
  doc_len_bn = np.asarray(doc_mask_bnl, bool).sum(-1)
  b, n = doc_len_bn.shape
  gaps_bn1 = np.zeros((b, n + 1), np.int32)
  for row in range(b):
    docs = np.flatnonzero(doc_len_bn[row])
    free = int(span) - int(doc_len_bn[row].sum())
    if free <= 0 or docs.size == 0:
      continue
    cuts = np.sort(rng.integers(0, free + 1, size=docs.size))
    parts = np.diff(np.concatenate([[0], cuts, [free]]))
    gaps_bn1[row, docs] = parts[:-1]
    gaps_bn1[row, n] = parts[-1]
  return gaps_bn1


def padding_waste(batch: MSABatch) -> dict[str, float]:
  """Fraction of padded slots per field of a collated batch.

  Keys: ``prefix``, ``doc_tokens`` (token slots of all document slots),
  ``doc_slots`` (document slots holding no document), ``active``, ``rows``
  (batch rows holding no example), ``total`` (all token slots).
  """
  def frac(mask):
    mask = np.asarray(mask)
    return float(1.0 - mask.mean()) if mask.size else 0.0
  pm, dm, am = (np.asarray(batch.prefix_mask), np.asarray(batch.doc_mask),
                np.asarray(batch.active_mask))
  used = pm.sum() + dm.sum() + am.sum()
  size = pm.size + dm.size + am.size
  return dict(prefix=frac(pm), doc_tokens=frac(dm), doc_slots=frac(dm.any(-1)),
              active=frac(am), rows=frac(am.any(-1)),
              total=float(1.0 - used / size) if size else 0.0)


class WasteMeter:
  """Running padding-waste statistics over many batches (slot-weighted means)."""

  def __init__(self):
    self._used: dict[str, float] = {}
    self._size: dict[str, float] = {}

  def update(self, batch: MSABatch) -> None:
    fields = dict(prefix=batch.prefix_mask, doc_tokens=batch.doc_mask,
                  active=batch.active_mask)
    fields["doc_slots"] = np.asarray(batch.doc_mask).any(-1)
    for k, mask in fields.items():
      mask = np.asarray(mask)
      self._used[k] = self._used.get(k, 0.0) + float(mask.sum())
      self._size[k] = self._size.get(k, 0.0) + float(mask.size)
    tok = ("prefix", "doc_tokens", "active")
    self._used["total"] = sum(self._used[k] for k in tok)
    self._size["total"] = sum(self._size[k] for k in tok)

  def summary(self) -> dict[str, float]:
    """Fraction of padded slots per field so far."""
    return {k: (1.0 - self._used[k] / s if s else 0.0) for k, s in self._size.items()}


def size_key(ex: Example) -> tuple[int, int, int, int]:
  """Sort key that puts examples of similar padded size next to each other."""
  return (len(ex.docs), ex.max_doc_length, ex.active_length, len(ex.prefix))
