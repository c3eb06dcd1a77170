"""Bucket shapes for training batches: few shapes (few compiles), little padding.

``buckets_for`` measures every Memory Interleave sample of a data source (a finite
JSONL set in full; a synthetic task on a probe) and cuts memory shapes and active
lengths so that each sample fits the smallest bucket that holds it; ``bucket_levels``
reads the options from ``config.data``; ``padding_waste_of`` says what a choice wastes.
Nothing is ever truncated: data over ``data.max_docs`` / ``max_doc_len`` / ``max_active``
is an error naming the example.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from msa_jax.data import interleave
from msa_jax.data.collate import BucketShapes, WasteMeter, collate
from msa_jax.data.example import Example, answer_target, id_target
from msa_jax.data.pipeline import plan_batches

CAP_KEYS = ("max_docs", "max_doc_len", "max_active")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _sample_sizes(ex: Example, specials, memory_interleave: bool, doc_len_of) -> list[tuple]:
  """(prefix, docs, max doc length, active) of each sample of ``ex``, without expanding it
  (cheap for shared-corpus memories; ``doc_len_of`` memoises the doc scan)."""
  p, n, l = len(ex.prefix), len(ex.docs), doc_len_of(ex)
  if not memory_interleave:
    return [(p, n, l, ex.active_length)]
  # The same targets as interleave.expand builds, measured without copying the example.
  by_id = None
  q, out = len(ex.question), []
  for r in ex.rounds or ():
    if by_id is None:
      by_id = {d.doc_id: d for d in ex.docs}
    docs = [by_id[i] for i in r]
    out.append((p, n, l, q + len(id_target(docs, specials.id_end))))
    q += sum(len(d.tokens) for d in docs)   # interleave.inject_documents appends them
  answer = answer_target(ex.answer or (), specials.end_of_retrieval, specials.eos)
  out.append((p, n, l, q + len(answer)))
  return out


def _doc_len_memo():
  memo: dict[int, int] = {}

  def doc_len_of(ex: Example) -> int:
    key = id(ex.docs)
    if key not in memo:
      memo[key] = ex.max_doc_length
    return memo[key]
  return doc_len_of


def _levels(values: Sequence[int], counts: Sequence[int], max_levels: int) -> list[int]:
  """At most ``max_levels`` cut values (the largest always among them) minimising
  sum(count * (level - value)) when each value takes the smallest level >= it (exact DP)."""
  v, c = list(values), list(counts)
  n = len(v)
  if n <= max_levels:
    return v
  # cost[i][j]: values i..j padded to v[j]
  cum_c = np.concatenate([[0], np.cumsum(c)])
  cum_vc = np.concatenate([[0], np.cumsum(np.multiply(v, c))])

  def cost(i, j):
    return v[j] * (cum_c[j + 1] - cum_c[i]) - (cum_vc[j + 1] - cum_vc[i])
  inf = float("inf")
  best = [[inf] * n for _ in range(max_levels + 1)]
  back = [[-1] * n for _ in range(max_levels + 1)]
  for j in range(n):
    best[1][j] = cost(0, j)
  for k in range(2, max_levels + 1):
    for j in range(n):
      for i in range(j):
        val = best[k - 1][i] + cost(i + 1, j)
        if val < best[k][j]:
          best[k][j], back[k][j] = val, i
  k = min(range(1, max_levels + 1), key=lambda k: best[k][n - 1])
  cuts, j = [], n - 1
  while j >= 0 and k >= 1:
    cuts.append(v[j])
    j, k = back[k][j], k - 1
  return sorted(cuts)


def _fit_shapes(sizes: Sequence[tuple], batch_size: int, chunk_size: int, *,
                memory_levels: int, active_levels: int, active_slack: int = 0,
                doc_multiple: int | None = None) -> list[BucketShapes]:
  """Buckets covering every sample size in ``sizes`` with little padding.

  Document slots are rounded up to ``doc_multiple`` tokens (None: whole chunks, P).
  Memory shapes (docs, doc_len): up to ``memory_levels`` nested shapes cut at
  quantiles of the per-sample memory slots, the last one covering everything.
  Active lengths: up to ``active_levels`` multiples of 8 chosen by exact DP.
  Every (memory shape, active level) pair is a bucket; batches use the smallest
  that fits (unused ones are never compiled).
  """
  prefix = max(1, max(s[0] for s in sizes))
  mem = sorted({(s[1], _round_up(s[2], doc_multiple or chunk_size)) for s in sizes},
               key=lambda m: (m[0] * m[1], m))
  shapes = []
  for q in range(1, memory_levels + 1):
    upto = mem[:max(1, int(round(q * len(mem) / memory_levels)))]
    shapes.append((max(m[0] for m in upto), max(m[1] for m in upto)))
  shapes = sorted(set(shapes))
  actives = [_round_up(s[3], 8) for s in sizes]
  vals, counts = np.unique(actives, return_counts=True)
  levels = _levels(vals.tolist(), counts.tolist(), active_levels)
  levels[-1] += active_slack
  return [BucketShapes(batch_size, prefix, n, l, m) for n, l in shapes for m in levels]


def buckets_for(source, batch_size: int, chunk_size: int, probe: int = 64, *,
                memory_interleave: bool = True, memory_levels: int = 3,
                active_levels: int = 4, caps: dict | None = None,
                doc_multiple: int | None = None) -> list[BucketShapes]:
  """Bucket shapes that fit every interleave sample of ``source``, with little padding.

  A synthetic task (endless fresh examples) is probed on ``probe`` examples: one
  memory shape (the largest seen, rounded to whole chunks; synthetic memories are
  uniform) and up to ``active_levels`` active lengths (multiples of 8), the last
  with 8 tokens of slack for longer answers than the probe saw. A finite source
  (``ExampleList``) is fitted over ALL its examples (nothing is ever truncated):
  up to ``memory_levels`` memory shapes × ``active_levels`` active lengths.
  ``caps`` (``max_docs``, ``max_doc_len``, ``max_active``; None = no cap) raise
  naming the largest example when the data exceeds them. ``doc_multiple``: document
  slots are a multiple of it (None: of ``chunk_size``; pooling masks a partial last chunk).
  """
  specials = source.tokenizer.specials
  finite = isinstance(source, Sequence)
  examples = list(source) if finite else [source(i) for i in range(probe)]
  doc_len_of = _doc_len_memo()
  sizes, owner = [], []
  for n, ex in enumerate(examples):
    for s in _sample_sizes(ex, specials, memory_interleave, doc_len_of):
      sizes.append(s)
      owner.append(n)
  _check_caps(sizes, owner, caps or {}, source)
  if finite:
    return _fit_shapes(sizes, batch_size, chunk_size, memory_levels=memory_levels,
                       active_levels=active_levels, doc_multiple=doc_multiple)
  return _fit_shapes(sizes, batch_size, chunk_size, memory_levels=1,
                     active_levels=active_levels, active_slack=8, doc_multiple=doc_multiple)


def _check_caps(sizes, owner, caps: dict, source) -> None:
  where = getattr(source, "path", "") or getattr(source, "name", "task")
  for field, col in (("max_docs", 1), ("max_doc_len", 2), ("max_active", 3)):
    cap = caps.get(field)
    if not cap:
      continue
    i = max(range(len(sizes)), key=lambda k: sizes[k][col])
    if sizes[i][col] > cap:
      what = ("documents", "tokens in its longest document",
              "active tokens (question + injected documents + target)")[col - 1]
      raise ValueError(
          f"example {owner[i]} of {where} has {sizes[i][col]} {what}, over "
          f"data.{field}={cap}; raise the cap or drop/shorten that example "
          "(examples are never truncated)")


def padding_waste_of(source, buckets: Sequence[BucketShapes], *, memory_interleave: bool = True,
                     num_examples: int = 64, seed: int = 0) -> dict[str, float]:
  """Padding waste (``WasteMeter.summary``) of ``buckets`` on a sample of ``source``,
  batched as the pipeline batches it (one window)."""
  specials = source.tokenizer.specials
  if isinstance(source, Sequence):
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(source))[:num_examples]
    examples = [source[int(i)] for i in idx]
  else:
    examples = [source(i) for i in range(num_examples)]
  samples = [s for ex in examples
             for s in (interleave.expand(ex, specials) if memory_interleave else [ex])]
  meter = WasteMeter()
  for b, group in plan_batches(samples, buckets, np.random.default_rng(seed)):
    meter.update(collate(group, buckets[b]))
  return meter.summary()


def bucket_levels(data_cfg) -> dict:
  """``buckets_for``'s shape options from the data config: level caps
  ``data.memory_buckets`` / ``data.active_buckets`` (defaults 3 and 4 when the config
  predates them; each >= 1) and ``data.doc_slot_multiple`` (document slots a multiple of
  it; 0 or absent: whole chunks)."""
  levels = {"memory_levels": int(data_cfg.get("memory_buckets", 3)),
            "active_levels": int(data_cfg.get("active_buckets", 4))}
  for (key, value), field in zip(levels.items(), ("memory_buckets", "active_buckets")):
    if value < 1:
      raise ValueError(f"data.{field} must be >= 1 (the most {key.split('_')[0]} shapes per "
                       f"stage), got {value}; set --config.data.{field}=N")
  multiple = int(data_cfg.get("doc_slot_multiple", 0) or 0)
  if multiple < 0:
    raise ValueError(f"data.doc_slot_multiple must be >= 0 (0: whole chunks), got {multiple}")
  return dict(levels, doc_multiple=multiple or None)


def bucket_caps(data_cfg) -> dict:
  return {k: data_cfg.get(k) for k in CAP_KEYS if data_cfg.get(k)}
