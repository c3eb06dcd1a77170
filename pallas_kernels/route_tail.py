"""The routing tail: from ``[B, C]`` chunk scores to the top-k documents (small XLA ops).

What the unfused Pallas route (:mod:`pallas_kernels.block_routing`) runs after its
chunk-score kernel, and what the engine's route (``msa_jax.inference.bank_routing``)
runs on each memory shard:

* :func:`run_top_k` (the engine's, given the bank's longest document): documents ranked
  from the chunk scores' row maxima, no pass over documents;
* :func:`document_scores` (a segment max over documents) then :func:`document_top_k`
  (:func:`pruned_top_k` or :func:`two_stage_top_k` by ``BlockSizes.top_k``);
* :func:`tree_top_k`: every top-k of :func:`run_top_k` (XLA's GPU top-k of one long row
  runs in one thread block, 44-102 µs on an H200 against 3-5 µs for many short rows);
* :func:`selection_from_top_k`: the winners in document order, as a ``Selection``.

All exact, ties to the lower index (document), as ``msa_jax.routing.select_top_k``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from msa_jax import routing as ref_routing

if TYPE_CHECKING:
  from pallas_kernels.block_routing import BlockSizes

NEG_INF = -jnp.inf


def document_scores(chunk_scores_bc, chunk_doc_c, num_docs: int, sorted_docs: bool = False):
  """Max over each document's chunks, ``[B, N]`` (``msa_jax.routing.document_scores``)."""
  if not sorted_docs:
    return ref_routing.document_scores(chunk_scores_bc, chunk_doc_c, num_docs)
  seg_c = jnp.where(chunk_doc_c < 0, num_docs, chunk_doc_c)
  per_doc = jax.vmap(lambda s: jax.ops.segment_max(
      s, seg_c, num_segments=num_docs + 1, indices_are_sorted=True))(chunk_scores_bc)
  return per_doc[:, :num_docs]


def two_stage_top_k(scores_bn, k: int, block: int):
  """Exact ``lax.top_k`` (ties → lower index) in two stages for long rows.

  Stage 1 takes the top ``k`` of each run of ``block`` entries (many short rows
  spread over the whole GPU); stage 2 the top ``k`` of those candidates. Candidates
  keep index order across rows and ``lax.top_k`` is stable, so ties still go to the
  lower index. Returns ``(values [B, k'], indices [B, k'])``, ``k' = min(k, N)``.
  """
  b, n = scores_bn.shape
  kk = min(k, n)
  if block <= 0 or n <= block or n <= 2 * kk:
    return lax.top_k(scores_bn, kk)
  rows = -(-n // block)
  padded = jnp.pad(scores_bn, ((0, 0), (0, rows * block - n)), constant_values=NEG_INF)
  kr = min(kk, block)
  val_brk, idx_brk = lax.top_k(padded.reshape(b, rows, block), kr)
  idx_brk = idx_brk + (jnp.arange(rows, dtype=idx_brk.dtype) * block)[None, :, None]
  val2, pos2 = lax.top_k(val_brk.reshape(b, rows * kr), kk)
  return val2, jnp.take_along_axis(idx_brk.reshape(b, rows * kr), pos2, axis=1)


def pruned_top_k(scores_bn, k: int, row: int, final: str = "top_k"):
  """Exact top-k (ties → lower index) that reads long rows only through row maxima.

  The ``k`` rows of ``row`` entries with the largest maxima (ties → lower row)
  hold the top-k entries: an entry outside them is beaten by each of those ``k``
  row maxima. So: row maxima (one fused reduce), top-k rows, gather their
  ``k·row`` entries in index order, then a top-k (``final="top_k"``) or a stable
  two-key sort (``final="sort"``) of those few entries.
  """
  b, n = scores_bn.shape
  kk = min(k, n)
  rows = -(-n // row)
  if rows <= 1:
    return lax.top_k(scores_bn, kk)
  x_brr = jnp.pad(scores_bn, ((0, 0), (0, rows * row - n)),
                  constant_values=NEG_INF).reshape(b, rows, row)
  kr = min(kk, rows)
  _, top_rows = lax.top_k(x_brr.max(axis=2), kr)
  top_rows = jnp.sort(top_rows, axis=1)                       # index order
  cand = jnp.take_along_axis(x_brr, top_rows[:, :, None], axis=1).reshape(b, kr * row)
  cand_idx = (top_rows[:, :, None] * row
              + jnp.arange(row, dtype=top_rows.dtype)[None, None, :]).reshape(b, -1)
  if final == "sort":
    neg, idx = lax.sort((-cand, cand_idx), dimension=1, num_keys=2)
    return -neg[:, :kk], idx[:, :kk]
  val, pos = lax.top_k(cand, kk)
  return val, jnp.take_along_axis(cand_idx, pos, axis=1)


def rank_select(neg, key, kk: int):
  """The ``kk`` smallest of each last-axis row of ``neg`` by ``(neg, key, position)``,
  ascending, as ``(neg [..., kk], key [..., kk])``: a sort's first ``kk`` entries without a
  sort. Each entry's rank is the number of entries that precede it (a compare-and-count
  over the row's ``n²`` pairs, one fused reduce, nothing ``n²`` in memory), then slot ``r``
  takes the entry of rank ``r`` (a second reduce). Ranks are unique (position breaks the
  last tie), so every slot gets exactly one entry. ``neg`` float32 without NaN."""
  n = neg.shape[-1]
  pos = lax.broadcasted_iota(jnp.int32, neg.shape, neg.ndim - 1)
  ni, nj = neg[..., :, None], neg[..., None, :]
  ki, kj = key[..., :, None], key[..., None, :]
  pi, pj = pos[..., :, None], pos[..., None, :]
  precedes = (nj < ni) | ((nj == ni) & ((kj < ki) | ((kj == ki) & (pj < pi))))
  rank = jnp.sum(precedes, axis=-1, dtype=jnp.int32)                   # [..., n]
  slot = lax.broadcasted_iota(jnp.int32, neg.shape[:-1] + (min(kk, n), 1), neg.ndim - 1)
  hit = rank[..., None, :] == slot                                      # [..., kk, n]
  # the one entry of rank r, value and key in one variadic reduce (one pass over the pairs)
  return lax.reduce(
      (jnp.where(hit, neg[..., None, :], jnp.inf),
       jnp.where(hit, key[..., None, :], jnp.iinfo(jnp.int32).min)),
      (jnp.float32(jnp.inf), jnp.int32(jnp.iinfo(jnp.int32).min)),
      lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])), (neg.ndim,))


TREE_METHODS = ("rank", "sort")


def tree_top_k(x_bn, k: int, row: int = 128, keys_bn=None, method: str = "rank"):
  """Exact top-k as a tree over short rows: ties → lower index (or lower key).

  XLA's GPU top-k sorts many short rows in one fast kernel, but takes one long row through
  a single-block kernel: on the H200 (jax 0.11.2) the top 16 of ``[1, n]`` cost 44 µs of
  device time at n = 2,048 and 102 µs at 15,625, against 3-5 µs for ``[n / 128, 128]``
  (``benchmarks.routing_tail --primitives``). So: split into rows of ``row``, keep each
  row's best k, repeat while that shrinks the candidates and more than ``2 · row`` remain,
  then take the best k of what is left. Each level carries ``(-x, key)`` (no index gather
  between levels) and keeps each row's best by ``method``:

  * ``"rank"`` (:func:`rank_select`): a compare-and-count reduce and a select reduce, two
    fused kernels a level;
  * ``"sort"``: a two-key ``lax.sort`` of each row (on the GPU a sort kernel plus two
    copies a level, ~5 µs each at 16-256-entry rows on the H200, 2026-12-04).

  (A third, the whole top-k in one single-program Mosaic GPU kernel, was exact and 1.5-2.5 x
  slower than this tree on an H100, 2026-12-06: removed, BENCHMARKS.md.)

  Args:
    x_bn: ``[B, n]`` scores (float32 or narrower; NaN not allowed).
    k: entries to keep; row: entries per row of the tree (any ≥ 1).
    keys_bn: int32 ``[B, n]`` tie-breakers returned in place of indices (unique among
      finite entries of a row); None: the indices ``0..n-1``.
    method: ``"rank"`` or ``"sort"`` (same result).
  Returns:
    ``(values [B, k'], indices or keys [B, k'])``, best first, ``k' = min(k, n)``; past
    the finite entries the values are ``-inf`` and indices are clipped to ``n - 1``
    (keys: arbitrary).
  """
  if method not in TREE_METHODS:
    raise ValueError(f"tree_top_k method {method!r}: use one of {TREE_METHODS}")
  b, n = x_bn.shape
  kk = min(k, n)
  neg = -x_bn.astype(jnp.float32)
  big = jnp.iinfo(jnp.int32).max
  key = (jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)) if keys_bn is None
         else keys_bn.astype(jnp.int32))

  def best(neg, key, kr):          # each last-axis row's kr best, ascending (neg, key)
    if method == "rank":
      return rank_select(neg, key, kr)
    neg, key = lax.sort((neg, key), dimension=neg.ndim - 1, num_keys=2)
    return neg[..., :kr], key[..., :kr]

  while neg.shape[1] > 2 * row and min(kk, row) * -(-neg.shape[1] // row) < neg.shape[1]:
    m = neg.shape[1]
    rows = -(-m // row)
    pad = ((0, 0), (0, rows * row - m))
    kr = min(kk, row)
    neg, key = best(jnp.pad(neg, pad, constant_values=jnp.inf).reshape(b, rows, row),
                    jnp.pad(key, pad, constant_values=big).reshape(b, rows, row), kr)
    neg, key = neg.reshape(b, rows * kr), key.reshape(b, rows * kr)
  neg, key = best(neg, key, kk)
  val = -neg
  return val, (jnp.minimum(key, n - 1) if keys_bn is None else key)


def rows_per_run(max_run_chunks: int, row: int) -> int:
  """Most rows of ``row`` chunks that one run of ``max_run_chunks`` chunks can touch."""
  return 1 if max_run_chunks <= 1 else (max_run_chunks - 2) // row + 2


def run_top_k(chunk_scores_bc, run_id_c, k: int, row: int, max_run_chunks: int,
              run_key_r=None, method: str = "rank", tree_row: int = 128, codes_c=None):
  """Exact top-k runs of chunks by their max (ties → lower key), no pass over runs.

  ``run_id_c`` labels contiguous runs of chunks (a bank's documents: equal labels are one
  run, labels increasing along the chunks as ``bank_routing.chunk_runs`` numbers them;
  ``-1`` = padding, never chosen); a run's score is the max of its chunks' scores.
  The usual tail takes a segment max over every chunk of the bank (a scatter of ``C``
  scores) before its top-k. Here the ``[B, C]`` scores are read once, for maxima over rows
  of ``row`` chunks, and only the rows that can hold a winner are gathered, their runs'
  maxima taken and ranked:

  * runs of at most ``row + 1`` chunks (two rows at most; a bank of 100-token documents
    has 2-chunk runs): each run's score is credited to the row it starts in (the row's
    own runs, plus the continuation of its last run at the head of the next row); every
    winner starts in one of the ``k`` rows with the largest credited maxima, so those
    ``k`` rows and their next rows' heads are all that is gathered, and each run's max is
    taken inside its row's window;
  * longer runs: a winner's best chunk lies in one of the ``k · rows_per_run`` rows with
    the largest plain maxima (each such row's max belongs to a winner, and a winner
    touches at most ``rows_per_run`` rows), and those rows are gathered.

  Each top-k is a :func:`tree_top_k` (XLA's top-k of one long row is slow on the GPU).

  Args:
    chunk_scores_bc: float32 ``[B, C]``.
    run_id_c: int32 ``[C]``; a label occurs in one contiguous run only.
    k: runs to keep; row: chunks per row (any; 128 suits the GPU).
    max_run_chunks: longest run in chunks (a bank's ``max_doc_chunks``), static.
    run_key_r: optional int32 ``[labels]``: the key each run is reported and tie-broken
      by (a bank's ``run_doc``: its document, so the list is already in the engine's
      (score desc, document asc) order; one key per run). None: the label itself.
    method, tree_row: each :func:`tree_top_k`'s ``method``, and its ``row`` for the top-k
      of the row maxima (at least the window's length for the runs' top-k); same result for
      any.
    codes_c: optional int8 ``[C]``, :func:`run_codes` of ``run_id_c`` for this ``row`` (a
      bank property, built once): the first pass then reads one byte a chunk beside the
      scores instead of the labels (4 bytes), and the labels are read only in the chosen
      rows. Also masks chunks that :func:`run_codes` was told are not valid.
  Returns:
    ``(values [B, k'], keys [B, k'])``, ``k' = min(k, candidates)``, best first;
    ``-inf`` values (with arbitrary keys) where fewer than k runs score.
  """
  b, c = chunk_scores_bc.shape
  rows = -(-c // row)
  ids_rr = _as_rows(run_id_c.astype(jnp.int32), row, -1)
  valid_c = run_id_c >= 0 if codes_c is None else codes_c != PAD_CODE
  s = jnp.where(valid_c[None], chunk_scores_bc.astype(jnp.float32), NEG_INF)
  x_brr = jnp.pad(s, ((0, 0), (0, rows * row - c)), constant_values=NEG_INF).reshape(b, rows, row)
  key_of = (lambda ids: ids) if run_key_r is None else (  # noqa: E731
      lambda ids: jnp.where(ids >= 0, run_key_r.astype(jnp.int32)[jnp.maximum(ids, 0)], -1))
  if max_run_chunks <= row + 1:
    if codes_c is None:
      cont_rr = _continues(ids_rr)
    else:
      cont_rr = _as_rows(codes_c, row, PAD_CODE) == HEAD_CODE
      ids_rr = jnp.where(_as_rows(valid_c, row, False), ids_rr, -1)
    return _run_top_k_start_rows(x_brr, ids_rr, cont_rr, k, key_of, method, tree_row,
                                 max_run_chunks)
  t = min(rows, k * rows_per_run(max_run_chunks, row))
  _, top_rows = tree_top_k(x_brr.max(axis=2), t, tree_row, method=method)
  top_rows = jnp.sort(top_rows, axis=1)                 # chunk order: runs stay contiguous
  cand_s = jnp.take_along_axis(x_brr, top_rows[:, :, None], axis=1).reshape(b, t * row)
  cand_id = jnp.take(ids_rr, top_rows, axis=0).reshape(b, t * row)
  return _rank_candidate_runs(cand_s, cand_id, k, key_of, method)


def _as_rows(x_c, row: int, fill):
  """``[C]`` → ``[rows, row]``, the last row filled with ``fill``."""
  c = x_c.shape[0]
  rows = -(-c // row)
  return jnp.pad(x_c, (0, rows * row - c), constant_values=fill).reshape(rows, row)


def _continues(ids_rr):
  """bool ``[rows, row]``: the chunk continues the run the previous row ends with (a
  prefix of each row; padding never continues)."""
  prev_last = jnp.concatenate([jnp.full((1,), -1, jnp.int32), ids_rr[:-1, -1]])
  return (ids_rr == prev_last[:, None]) & (ids_rr >= 0)


PAD_CODE, OWN_CODE, HEAD_CODE = 0, 1, 2


def run_codes(run_id_c, row: int, valid_c=None):
  """int8 ``[C]``: each chunk's role in :func:`run_top_k`'s first pass with rows of ``row``
  chunks: ``PAD_CODE`` (a label < 0, or ``valid_c`` false: never scores), ``HEAD_CODE``
  (continues the run the previous row ends with: credited to that row) or ``OWN_CODE``.
  A property of the bank's chunk→run map: build it once (``bank_routing.routing_layouts``)."""
  c = run_id_c.shape[0]
  cont_c = _continues(_as_rows(run_id_c.astype(jnp.int32), row, -1)).reshape(-1)[:c]
  valid = run_id_c >= 0 if valid_c is None else (run_id_c >= 0) & valid_c
  return jnp.where(valid, jnp.where(cont_c, HEAD_CODE, OWN_CODE), PAD_CODE).astype(jnp.int8)


def _run_top_k_start_rows(x_brr, ids_rr, cont_rr, k: int, key_of, method: str,
                          tree_row: int, max_run_chunks: int):
  """:func:`run_top_k` for runs spanning at most two rows: each run credited to the row
  it starts in. ``x_brr`` float32 scores (``-inf`` on padding), ``ids_rr`` run labels,
  ``cont_rr`` :func:`_continues` of them."""
  b, rows, row = x_brr.shape
  own_max, head_max = _own_and_head_maxima(x_brr, cont_rr)
  credited = jnp.maximum(own_max, jnp.pad(head_max[:, 1:], ((0, 0), (0, 1)),
                                          constant_values=NEG_INF))
  kr = min(k, rows)
  _, top_rows = tree_top_k(credited, kr, tree_row, method=method)   # [B, kr], any order
  nxt = jnp.minimum(top_rows + 1, rows - 1)
  has_next = (top_rows + 1 < rows)[:, :, None]
  pick = lambda a, r: jnp.take_along_axis(a, r[:, :, None], axis=1)  # noqa: E731
  # a chosen row's window: its own runs, then their continuation at the next row's head
  win_s = jnp.concatenate([pick(x_brr, top_rows), pick(x_brr, nxt)], axis=2)
  own_id = jnp.where(cont_rr, -1, ids_rr)[top_rows]
  head_id = jnp.where(cont_rr[nxt] & has_next, ids_rr[nxt], -1)
  win_id = jnp.concatenate([own_id, head_id], axis=2)
  return _rank_window_runs(win_s, win_id, k, key_of, method, tree_row, max_run_chunks)


def _own_and_head_maxima(x_brr, cont_rr):
  """``(own [B, rows], head [B, rows])``: each row's max over the runs that start in it,
  and over its head (the previous row's last run), in ONE pass over the scores.

  A variadic reduce states the single pass outright; two ``.max`` reduces over the two
  masked copies could compile to two kernels each reading all ``[B, C]`` scores. On the
  H200 (2026-12-05) the route's kernel count did not change with it: XLA had already fused
  the pair (BENCHMARKS.md, "One-term fp8 routing")."""
  own = jnp.where(cont_rr[None], NEG_INF, x_brr)
  head = jnp.where(cont_rr[None], x_brr, NEG_INF)
  return lax.reduce((own, head), (jnp.float32(NEG_INF), jnp.float32(NEG_INF)),
                    lambda a, b: (jnp.maximum(a[0], b[0]), jnp.maximum(a[1], b[1])), (2,))


SHIFT_MAX_RUN = 8   # runs of at most this many chunks: their max from shifted copies


def _window_run_max(s, win_id, max_run: int):
  """``[B, W, L]``: at each run's first entry, the max of the run's scores (elsewhere a
  partial max). Runs of at most :data:`SHIFT_MAX_RUN` chunks (a bank of 100-token documents
  at P 64 has 2): the max of ``max_run`` shifted copies, elementwise, which XLA can fuse
  into the next reduce; longer: a masked max over the window
  (``L²`` compares in one reduce, cheaper at these windows than a segment max's cumsum and
  scatter)."""
  if max_run <= SHIFT_MAX_RUN:
    out = s
    for d in range(1, min(max_run, s.shape[2])):
      pad = ((0, 0), (0, 0), (0, d))
      later_s = jnp.pad(s[:, :, d:], pad, constant_values=NEG_INF)
      later_id = jnp.pad(win_id[:, :, d:], pad, constant_values=-2)
      out = jnp.maximum(out, jnp.where(later_id == win_id, later_s, NEG_INF))
    return out
  same = win_id[:, :, :, None] == win_id[:, :, None, :]
  return jnp.where(same, s[:, :, None, :], NEG_INF).max(axis=3)


def _rank_window_runs(win_s, win_id, k: int, key_of, method: str, tree_row: int,
                      max_run: int):
  """Top-k runs of ``[B, W, L]`` windows, each run (label ≥ 0, at most ``max_run`` entries)
  contiguous inside one window, as ``(values, key_of(labels))``; ties → lower key. A run's
  max (:func:`_window_run_max`) is kept at its first entry."""
  b, w, l = win_s.shape
  s = jnp.where(win_id >= 0, win_s, NEG_INF)
  run_max = _window_run_max(s, win_id, max_run)
  first = jnp.concatenate([jnp.ones((b, w, 1), bool), win_id[:, :, 1:] != win_id[:, :, :-1]],
                          axis=2)
  rep = jnp.where(first & (win_id >= 0), run_max, NEG_INF)
  return tree_top_k(rep.reshape(b, w * l), min(k, w * l), max(l, tree_row),
                    key_of(win_id).reshape(b, w * l), method=method)


def _rank_candidate_runs(cand_s, cand_id, k: int, key_of, method: str):
  """Top-k runs of candidate chunks ``[B, n]`` (chunk order; a run contiguous) as
  ``(values, key_of(labels))``; ties → lower key."""
  b, n = cand_s.shape
  start = jnp.concatenate([jnp.ones((b, 1), bool), cand_id[:, 1:] != cand_id[:, :-1]], axis=1)
  seg = jnp.cumsum(start, axis=1) - 1                    # run number among the candidates
  # (not indices_are_sorted: XLA's sorted segment max was the slower one on the GPU)
  run_max = jax.vmap(lambda v, g: jax.ops.segment_max(v, g, num_segments=n))(cand_s, seg)
  # one entry per candidate run, at its first chunk, holding the run's max
  rep = jnp.where(start & (cand_id >= 0), jnp.take_along_axis(run_max, seg, axis=1), NEG_INF)
  return tree_top_k(rep, min(k, n), keys_bn=key_of(cand_id), method=method)


def document_top_k(doc_s, k: int, bs: BlockSizes):
  """Exact top-k ``(values, indices)`` of ``[B, N]`` scores by ``bs.top_k``'s method."""
  if bs.top_k == "two_stage":
    return two_stage_top_k(doc_s, k, bs.block_docs)
  return pruned_top_k(doc_s, k, bs.block_docs, "sort" if bs.top_k == "pruned_sort" else "top_k")


def selection_from_top_k(top_val_bk, top_idx_bk, k: int):
  """Sorts chosen documents into document order (invalid last) → (scores, Selection).

  Same rules as ``msa_jax.routing.select_top_k``: ``-inf`` entries are invalid and
  hold index 0; fewer than ``k`` entries are padded as invalid.
  """
  kk = top_val_bk.shape[-1]
  valid = top_val_bk > NEG_INF
  sort_key = jnp.where(valid, top_idx_bk, jnp.iinfo(jnp.int32).max - kk + jnp.arange(kk))
  order = jnp.argsort(sort_key, axis=-1)
  idx = jnp.take_along_axis(top_idx_bk, order, axis=-1)
  val = jnp.take_along_axis(top_val_bk, order, axis=-1)
  valid = jnp.take_along_axis(valid, order, axis=-1)
  idx = jnp.where(valid, idx, 0)
  val = jnp.where(valid, val, NEG_INF)
  if kk < k:
    pad = ((0, 0), (0, k - kk))
    idx, valid = jnp.pad(idx, pad), jnp.pad(valid, pad)
    val = jnp.pad(val, pad, constant_values=NEG_INF)
  sel = ref_routing.Selection(lax.stop_gradient(idx).astype(jnp.int32), valid)
  return lax.stop_gradient(val), sel
