"""Fused block routing: scores, per-document max and a block-local top-k in one kernel.

SPEC §3 steps 2-3 for one router layer, with only small per-block candidates leaving
the kernel. Each program of the Mosaic GPU kernel owns a *block*: a contiguous run of
``G`` tiles of ``chunks`` chunks of the bank (``G = ceil(tiles / blocks)``; by
default one block per streaming multiprocessor). It streams the block's ``K̄R`` tiles
through one TMA pipeline and, per tile:

1. multiplies the ``[chunks, F]`` tile by the group-summed queries on the tensor cores
   (wgmma, f32 accumulation) and takes the max over question tokens (as
   :mod:`pallas_kernels.block_routing`);
2. takes the max over each document's chunks *within the tile*: a document occupies a
   contiguous run of the tile's chunks, numbered by its slot ``loc`` (a bank property,
   :func:`bank_layout`); the slot's document id ``slot_doc`` is its key;
3. merges the tile's documents into the block's running top-k list by key: a document
   already in the list (one cut by the tile boundary) keeps the max of both values and
   appears once; then every entry is ranked by ``(score desc, document asc)`` (all pairs
   compared at once) and the first ``k`` are kept.

The kernel writes ``k`` (value, document) candidates per block: ``blocks·k`` entries
(132·16 on an H100 at any bank size) instead of ``C`` chunk scores. The final XLA step
merges candidates of documents cut by block boundaries (same key: max) and takes the
exact top-k of the few thousand candidates.

Why this is exact: a document's score is the max over its chunks. Inside a block the
running list holds documents with their (partial) maxima; an entry leaves the list only
when ``k`` distinct documents beat it, and those never leave for a lower one, so every
document in the global top-k survives in the block holding its best chunk. A document
whose partial value in one block is lower than its true score cannot enter the global
top-k on that value: the block where its best chunk lies holds ``k`` documents that
beat its true score. Ties go to the lower document, as ``msa_jax.routing.select_top_k``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from pallas_kernels import _platform

NEG_INF = -jnp.inf
LIST_SLOTS = 64                  # running-list entries per block (k ≤ 64)
_SMEM_LIMIT = 220 * 1024         # bytes per program (H100: 227 KB)
_DENSE_MERGE_MAX = 9000          # candidates merged by all-pairs compare below this


class BankLayout(NamedTuple):
  """Per-tile document slots of a bank (depends on the bank alone; cache it with it).

  loc_tc: int32 ``[T, tile]``, a chunk's document slot within its tile (0 for the
    tile's first document), ``-1`` for padding chunks.
  slot_doc_tc: int32 ``[T, tile]``, the document id in each slot, ``-1`` if unused.
  """

  loc_tc: jax.Array
  slot_doc_tc: jax.Array


def bank_layout(chunk_doc_c, tile_c: int) -> BankLayout:
  """:class:`BankLayout` of ``chunk_doc_c`` cut into tiles of ``tile_c`` chunks.

  Needs a document's chunks to be contiguous; ``-1`` marks padding chunks. A concrete
  (not traced) map is checked; a document split in two runs raises ``ValueError``.
  """
  try:
    concrete = np.asarray(chunk_doc_c)
  except jax.errors.TracerArrayConversionError:   # under jit: the caller's promise
    concrete = None
  if concrete is not None:
    _check_contiguous(concrete)
  c = chunk_doc_c.shape[0]
  t = -(-c // tile_c)
  doc = jnp.pad(chunk_doc_c.astype(jnp.int32), (0, t * tile_c - c),
                constant_values=-1).reshape(t, tile_c)
  prev = jnp.concatenate([jnp.full((t, 1), -2, jnp.int32), doc[:, :-1]], axis=1)
  loc = jnp.cumsum((doc != prev).astype(jnp.int32), axis=1) - 1
  loc = jnp.where(doc < 0, -1, loc)
  rows = jnp.broadcast_to(jnp.arange(t)[:, None], (t, tile_c))
  slot_doc = jnp.full((t, tile_c), -1, jnp.int32).at[rows, jnp.where(loc < 0, tile_c, loc)].max(
      doc, mode="drop")
  return BankLayout(loc, slot_doc)


def _check_contiguous(doc_c: np.ndarray) -> None:
  real = doc_c[doc_c >= 0]
  starts = real[np.r_[True, real[1:] != real[:-1]]] if real.size else real
  if starts.size != np.unique(starts).size:
    ids, counts = np.unique(starts, return_counts=True)
    raise ValueError(f"chunk→document map: document(s) {ids[counts > 1][:5].tolist()} occupy "
                     "more than one run of chunks; a bank must store each document's chunks "
                     "contiguously (padding chunks, -1, may sit anywhere)")


def num_blocks_for(num_tiles: int, blocks: int) -> tuple[int, int]:
  """``(blocks, tiles per block)`` for ``num_tiles`` tiles; ``blocks=0``: one per SM."""
  if blocks <= 0:
    blocks = (getattr(jax.devices()[0], "core_count", 0) if _platform.on_gpu() else 0) or 8
  per = -(-num_tiles // blocks)
  return -(-num_tiles // per), per


def _block_top_k_call(num_tiles: int, blocks: int, per_block: int, f: int, cols: int,
                      groups: int, passes: int, k: int, tile_c: int, tile_f: int, stages: int,
                      interpret):
  """``plgpu.kernel`` → ``(values [passes, blocks, 64] f32, docs [passes, blocks, 64] i32)``.

  Inputs: ``kr [≥ num_tiles·tile_c, F]`` bf16, ``q [passes, groups·F, cols]`` bf16
  (pass = example; group ``g`` of queries in rows ``g·F:(g+1)·F``), ``loc`` and
  ``slot_doc`` ``[num_tiles·tile_c]`` int32 (:class:`BankLayout`). The first ``k``
  entries of each block's list are its candidates, best first (``-1`` = empty).
  """
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  r = LIST_SLOTS
  pool = r + tile_c                       # running list ++ the tile's document slots
  num_f = f // tile_f
  k_transforms = _platform.swizzle_transforms(tile_f, 2)
  q_transforms = _platform.swizzle_transforms(cols, 2)
  compiled = _platform.mosaic_interpret_params(interpret) is None
  wgmma_layout = plgpu.Layout.WGMMA if compiled else None
  row_layout = plgpu.Layout.WGMMA.reduce(1) if compiled else None
  col_layout = plgpu.Layout.WGMMA.reduce(0) if compiled else None

  cast = lambda x, layout: _platform.layout_cast(x, layout, compiled)  # noqa: E731
  iota = lambda shape, dim: _platform.wgmma_iota(shape, dim, compiled)  # noqa: E731

  # Lane semantics (see compiler_params below): every [64, n] operand has an explicit layout.
  def cols_of(x, n):   # a column-indexed vector broadcast over 64 rows
    return cast(lax.broadcast_in_dim(x, (64, n), [1]), wgmma_layout)

  def rows_of(x, n):   # a row-indexed vector broadcast over n columns
    return cast(lax.broadcast_in_dim(x, (64, n), [0]), wgmma_layout)

  def merge_tile(s_smem, loc_smem, key_smem, val_smem, doc_smem, rank_smem):
    """Folds one tile's chunk maxima (``s_smem``) into the running list (pool[:r])."""
    # 1. Per-document max within the tile: slot j = max over chunks with loc == j.
    s_col = cast(s_smem[...], col_layout)
    loc_col = cast(loc_smem[...], col_layout)
    for slab in range(tile_c // 64):
      hit = cols_of(loc_col, tile_c) == iota((64, tile_c), 0) + slab * 64
      w = jnp.where(hit, cols_of(s_col, tile_c), NEG_INF).max(axis=1)
      val_smem[pl.ds(r + slab * 64, 64)] = w
      doc_smem[pl.ds(r + slab * 64, 64)] = cast(key_smem[pl.ds(slab * 64, 64)], row_layout)
    # 2. Documents already in the list (cut by the tile boundary): the list entry takes
    #    the max of both values; the tile's entry is dropped.
    w_val = cast(val_smem[pl.ds(r, tile_c)], col_layout)
    w_doc = cast(doc_smem[pl.ds(r, tile_c)], col_layout)
    l_val = cast(val_smem[pl.ds(0, r)], row_layout)
    l_doc = cast(doc_smem[pl.ds(0, r)], row_layout)
    l_doc_col = cast(doc_smem[pl.ds(0, r)], col_layout)
    same = rows_of(l_doc, tile_c) == cols_of(w_doc, tile_c)
    merged = jnp.maximum(l_val, jnp.where(same, cols_of(w_val, tile_c), NEG_INF).max(axis=1))
    dups = []
    for slab in range(tile_c // 64):
      t_doc = cast(doc_smem[pl.ds(r + slab * 64, 64)], row_layout)
      hit = (rows_of(t_doc, r) == cols_of(l_doc_col, r)) & (rows_of(t_doc, r) >= 0)
      dups.append(jnp.where(hit, 1, 0).max(axis=1))
    val_smem[pl.ds(0, r)] = merged
    for slab, dup in enumerate(dups):
      sl = pl.ds(r + slab * 64, 64)
      t_doc = cast(doc_smem[sl], row_layout)
      doc_smem[sl] = jnp.where(dup > 0, -1, t_doc)
    # 3. Rank every entry by (score desc, document asc) against all valid entries.
    p_val = cols_of(cast(val_smem[...], col_layout), pool)
    p_doc = cols_of(cast(doc_smem[...], col_layout), pool)
    for slab in range(pool // 64):
      sl = pl.ds(slab * 64, 64)
      e_val = rows_of(cast(val_smem[sl], row_layout), pool)
      e_doc = rows_of(cast(doc_smem[sl], row_layout), pool)
      beats = (p_doc >= 0) & ((p_val > e_val) | ((p_val == e_val) & (p_doc < e_doc)))
      rank = jnp.where(beats, 1, 0).sum(axis=1)
      rank_smem[sl] = jnp.where(cast(doc_smem[sl], row_layout) >= 0, rank, pool)
    # 4. The k best, in rank order, become the new list.
    p_rank = cols_of(cast(rank_smem[...], col_layout), pool)
    want = iota((64, pool), 0)
    pick = (p_rank == want) & (want < k)
    new_val = jnp.where(pick, p_val, NEG_INF).max(axis=1)
    new_doc = jnp.where(pick, p_doc, -1).max(axis=1)
    val_smem[pl.ds(0, r)] = new_val
    doc_smem[pl.ds(0, r)] = new_doc

  def body(kr_gmem, q_gmem, loc_gmem, key_gmem, val_out, doc_out):
    blk = lax.axis_index("block")
    p = lax.axis_index("pass")

    def scoped(s_smem, val_smem, doc_smem, rank_smem):
      val_smem[pl.ds(0, r)] = cast(jnp.full((r,), NEG_INF, jnp.float32), row_layout)
      doc_smem[pl.ds(0, r)] = cast(jnp.full((r,), -1, jnp.int32), row_layout)

      def tile_of(g):
        return jnp.minimum(blk * per_block + g, num_tiles - 1)

      def step(idx, k_smem, q_smem, loc_smem, key_smem, acc):
        _, grp, j = idx
        if compiled:
          acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, k_smem, q_smem))(
              plgpu.ACC.init(acc))
          plgpu.wgmma_wait(0)
        else:
          def fresh(acc_ref):
            plgpu.wgmma(acc_ref, k_smem, q_smem)
            return acc_ref[...]
          acc = acc + pl.run_scoped(fresh, plgpu.ACC((tile_c, cols), jnp.float32))
        last_f = j == num_f - 1

        @pl.when(last_f & (grp == 0))
        def _():
          s_smem[...] = acc.max(axis=1)

        if groups > 1:   # max over the query groups of the same example
          @pl.when(last_f & (grp > 0))
          def _():
            s_smem[...] = jnp.maximum(cast(s_smem[...], row_layout), acc.max(axis=1))

        @pl.when(last_f & (grp == groups - 1))
        def _():
          merge_tile(s_smem, loc_smem, key_smem, val_smem, doc_smem, rank_smem)

        return acc * jnp.where(last_f, 0.0, 1.0).astype(jnp.float32)

      acc0 = cast(jnp.zeros((tile_c, cols), jnp.float32), plgpu.Layout.WGMMA)
      plgpu.emit_pipeline(
          step,
          grid=(per_block, groups, num_f),
          in_specs=[
              plgpu.BlockSpec((tile_c, tile_f), lambda g, grp, j: (tile_of(g), j),
                              transforms=k_transforms),
              plgpu.BlockSpec((tile_f, cols), lambda g, grp, j: (grp * num_f + j, 0),
                              transforms=q_transforms),
              plgpu.BlockSpec((tile_c,), lambda g, grp, j: (tile_of(g),)),
              plgpu.BlockSpec((tile_c,), lambda g, grp, j: (tile_of(g),)),
          ],
          max_concurrent_steps=min(stages, per_block * groups * num_f),
          init_carry=acc0,
      )(kr_gmem.at[pl.ds(0, num_tiles * tile_c)], q_gmem.at[p], loc_gmem, key_gmem)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(val_smem.at[pl.ds(0, r)], val_out.at[p, blk])
      plgpu.copy_smem_to_gmem(doc_smem.at[pl.ds(0, r)], doc_out.at[p, blk])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM((tile_c,), jnp.float32), plgpu.SMEM((pool,), jnp.float32),
                  plgpu.SMEM((pool,), jnp.int32), plgpu.SMEM((pool,), jnp.int32))

  return plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((passes, blocks, r), jnp.float32),
                jax.ShapeDtypeStruct((passes, blocks, r), jnp.int32)),
      grid=(blocks, passes),
      grid_names=("block", "pass"),
      # Lane semantics: every layout is explicit above. jax 0.11's default
      # (warpgroup semantics, layout inference) did not finish compiling this kernel.
      compiler_params=(plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)
                       if compiled else None),
      interpret=_platform.mosaic_interpret_params(interpret),
  )


def stages_that_fit(tile_c: int, tile_f: int, cols: int, stages: int) -> int:
  """Pipeline depth whose buffers (K̄R, queries, two int32 tile vectors) fit SMEM."""
  scratch = 4 * tile_c + 12 * (LIST_SLOTS + tile_c)
  per_stage = 2 * tile_f * (tile_c + cols) + 8 * tile_c
  return max(1, min(stages, (_SMEM_LIMIT - scratch) // per_stage))


def merge_candidates(val_bn, doc_bn, k: int):
  """Exact top-k documents from per-block candidates that may repeat a document.

  A document cut by block boundaries can be a candidate of several blocks with a
  partial max each: its score is their max and it counts once. Returns
  ``(values [B, k'], documents [B, k'])`` best first (ties → lower document),
  ``k' = min(k, n)``; ``-inf`` values mark missing entries.
  """
  b, n = val_bn.shape
  kk = min(k, n)
  big = jnp.iinfo(jnp.int32).max
  doc_bn = jnp.where(val_bn > NEG_INF, doc_bn, -1)
  if n <= _DENSE_MERGE_MAX:   # all pairs: fused elementwise ops on a few thousand entries
    same = (doc_bn[:, :, None] == doc_bn[:, None, :]) & (doc_bn[:, :, None] >= 0)
    merged = jnp.max(jnp.where(same, val_bn[:, None, :], NEG_INF), axis=2)
    earlier = jnp.tril(jnp.ones((n, n), bool), -1)
    first = (doc_bn >= 0) & (merged > NEG_INF) & ~jnp.any(same & earlier[None], axis=2)
    v_i, v_j = merged[:, :, None], merged[:, None, :]
    beats = first[:, None, :] & ((v_j > v_i) | ((v_j == v_i) & (doc_bn[:, None, :] < doc_bn[:, :, None])))
    rank = jnp.where(first, jnp.sum(beats, axis=2), n)                     # unique among firsts
    pick = rank[:, None, :] == jnp.arange(kk)[None, :, None]               # [B, k', n]
    val = jnp.max(jnp.where(pick, merged[:, None, :], NEG_INF), axis=2)
    doc = jnp.max(jnp.where(pick, doc_bn[:, None, :], 0), axis=2)
    return val, doc
  # Many candidates: sort by document, keep the max of each run, then sort by score.
  key = jnp.where(doc_bn >= 0, doc_bn, big)
  key, neg = lax.sort((key, -val_bn), dimension=1, num_keys=2)
  first = jnp.concatenate([jnp.ones((b, 1), bool), key[:, 1:] != key[:, :-1]], axis=1)
  val = jnp.where(first & (key < big), -neg, NEG_INF)
  doc = jnp.where(first, key, big)
  neg, doc = lax.sort((-val, doc), dimension=1, num_keys=2)
  return -neg[:, :kk], jnp.where(doc[:, :kk] < big, doc[:, :kk], 0)


def tail_chunk_scores(q_pfc, kr_tail_cf, groups: int):
  """Chunk scores of the chunks after the last full tile in plain XLA, ``[B, n]`` f32.

  ``q_pfc`` is the kernels' query operand ``[B·groups, F, cols]``; the max runs over
  every query column of every group of an example.
  """
  s_pjc = jnp.einsum("pfj,cf->pjc", q_pfc, kr_tail_cf, preferred_element_type=jnp.float32)
  return s_pjc.reshape(-1, groups * q_pfc.shape[2], kr_tail_cf.shape[0]).max(axis=1)


def _ragged_tail_candidates(q_pfc, kr_cf, layout: BankLayout, c_main: int, groups: int):
  """Per-document maxima of the chunks after the last full tile (plain XLA)."""
  c = kr_cf.shape[0]
  tile_c = layout.loc_tc.shape[1]
  s_bc = jnp.pad(tail_chunk_scores(q_pfc, kr_cf[c_main:c], groups),
                 ((0, 0), (0, tile_c - (c - c_main))), constant_values=NEG_INF)
  loc_c = layout.loc_tc[-1]
  hit = loc_c[:, None] == jnp.arange(tile_c, dtype=jnp.int32)[None, :]      # [chunk, slot]
  val = jnp.max(jnp.where(hit[None], s_bc[:, :, None], NEG_INF), axis=1)
  return val, jnp.broadcast_to(layout.slot_doc_tc[-1], (s_bc.shape[0], tile_c))


def route_top_k_blocks(q_pfc, any_query_b, kr_cf, layout: BankLayout, k: int, *, groups: int,
                       tile_f: int, stages: int, blocks: int, interpret=None):
  """Top-k documents through the fused kernel: ``(values [B, k'], documents [B, k'])``.

  ``q_pfc``: the kernel's query operand ``[B·groups, F, cols]`` bf16 (masked rows
  already filled, as :func:`pallas_kernels.block_routing._kernel_inputs`);
  ``any_query_b``: examples with at least one routing token; ``kr_cf``: bf16 bank with
  a multiple of 8 rows; ``layout``: :func:`bank_layout` of its chunk→document map.
  """
  if k > LIST_SLOTS:
    raise ValueError(f"the fused route keeps at most {LIST_SLOTS} documents per block, "
                     f"got k={k}; use BlockSizes(fused=False)")
  pg, f, cols = q_pfc.shape
  b = pg // groups
  tile_c = layout.loc_tc.shape[1]
  c = kr_cf.shape[0]
  num_tiles = c // tile_c
  vals, docs = [], []
  if num_tiles:
    nb, per = num_blocks_for(num_tiles, blocks)
    st = stages_that_fit(tile_c, tile_f, cols, stages)
    call = _block_top_k_call(num_tiles, nb, per, f, cols, groups, b, k, tile_c, tile_f, st,
                             interpret)
    v, d = call(kr_cf, q_pfc.reshape(b, groups * f, cols),
                layout.loc_tc[:num_tiles].reshape(-1), layout.slot_doc_tc[:num_tiles].reshape(-1))
    vals.append(v[:, :, :k].reshape(b, -1))
    docs.append(d[:, :, :k].reshape(b, -1))
  if num_tiles * tile_c < c:
    v, d = _ragged_tail_candidates(q_pfc, kr_cf, layout, num_tiles * tile_c, groups)
    vals.append(v)
    docs.append(d)
  val = jnp.concatenate(vals, axis=1)
  doc = jnp.concatenate(docs, axis=1)
  val = jnp.where(any_query_b[:, None], val, NEG_INF)
  return merge_candidates(val, doc, k)
