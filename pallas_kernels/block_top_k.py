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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from pallas_kernels import _platform
from pallas_kernels.quantised_queries import QUANT_KEY_DTYPES, RouteQueries, fused_chunk_scores

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


def num_blocks_for(num_tiles: int, blocks: int, programs_per_sm: int = 1) -> tuple[int, int]:
  """``(blocks, tiles per block)`` for ``num_tiles`` tiles; ``blocks=0``:
  ``programs_per_sm`` per SM (8 in all off a GPU)."""
  if programs_per_sm < 1:
    raise ValueError(f"programs_per_sm must be >= 1, got {programs_per_sm}")
  if blocks <= 0:
    sms = getattr(jax.devices()[0], "core_count", 0) if _platform.on_gpu() else 0
    blocks = sms * programs_per_sm if sms else 8
  per = -(-num_tiles // blocks)
  return -(-num_tiles // per), per




def _block_top_k_call(num_tiles: int, blocks: int, per_block: int, f: int, cols: int,
                      groups: int, passes: int, k: int, tile_c: int, tile_f: int, stages: int,
                      interpret, key_dtype: str = "bfloat16", examples: int = 1,
                      query_terms: int = 1, skip_beaten: bool = True):
  """``plgpu.kernel`` → ``(values, docs)``, each ``[passes, blocks, examples·64]``.

  Inputs, bf16 keys: ``kr [≥ num_tiles·tile_c, F]`` bf16, ``q [passes, groups·F, cols]``
  bf16 (group ``g`` of queries in rows ``g·F:(g+1)·F``), ``loc`` and ``slot_doc``
  ``[num_tiles·tile_c]`` int32 (:class:`BankLayout`).
  Quantised keys (``key_dtype`` in :data:`QUANT_KEY_DTYPES`): ``kr`` holds codes, ``q``
  is ``[passes, groups·cols, F]`` codes of the same dtype (K-major: 8-bit wgmma reads
  both operands K-major), then ``q_scale [passes, groups·cols]`` and ``kr_scale
  [≥ num_tiles·tile_c]`` float32 before ``loc`` and ``slot_doc``. A chunk's score is
  ``kr_scale · max_j (q_scale_j · codes·q_j)``: the column scales are applied to the
  ``[chunks, cols]`` tile before the max, the positive chunk scale after it.
  ``query_terms=2`` (fp8): a second query operand ``q_lo`` (same shape, after ``q``) holds
  the rounding residual of ``q`` at the same scale; both multiply the same key tile into
  one accumulator (``q/scale ≈ hi + lo``: queries to ~2^-8 instead of 2^-4).
  Columns ``e·cols/examples:(e+1)·cols/examples`` of a pass belong to example ``e`` (the
  batch folded into the wgmma N dimension: one pass over the keys for all of them);
  each example keeps its own running list, entries ``e·64:(e+1)·64`` of the output.
  The first ``k`` entries of each list are its candidates, best first (``-1`` = empty).
  ``skip_beaten``: a tile merges into an example's list only if its best chunk reaches the
  list's ``k``-th value (exact: every list entry is at least that value, so a tile whose
  chunks are all below it can neither enter the list nor raise an entry). On a large bank
  the list fills early and nearly every tile skips the merge, the per-tile work that is
  not the matmul.
  """
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  r = LIST_SLOTS
  pool = r + tile_c                       # running list ++ the tile's document slots
  num_f = f // tile_f
  quant = key_dtype in QUANT_KEY_DTYPES
  itemsize = jnp.dtype(key_dtype).itemsize
  acc_dtype = jnp.int32 if key_dtype == "int8" else jnp.float32
  cols_e = cols // examples
  k_transforms = _platform.swizzle_transforms(tile_f, itemsize)
  q_transforms = _platform.swizzle_transforms(tile_f if quant else cols, itemsize)
  compiled = _platform.mosaic_interpret_params(interpret) is None
  wgmma_layout = plgpu.Layout.WGMMA if compiled else None
  row_layout = plgpu.Layout.WGMMA.reduce(1) if compiled else None
  col_layout = plgpu.Layout.WGMMA.reduce(0) if compiled else None

  cast = lambda x, layout: _platform.layout_cast(x, layout, compiled)  # noqa: E731
  iota = lambda shape, dim: _platform.wgmma_iota(shape, dim, compiled)  # noqa: E731

  # Lane semantics (see compiler_params below): every [rows, n] operand has an explicit layout.
  def cols_of(x, n, rows=64):   # a column-indexed vector broadcast over rows
    return cast(lax.broadcast_in_dim(x, (rows, n), [1]), wgmma_layout)

  def rows_of(x, n):   # a row-indexed vector broadcast over n columns
    return cast(lax.broadcast_in_dim(x, (64, n), [0]), wgmma_layout)

  def merge_tile(e, s_smem, loc_smem, key_smem, val_smem, doc_smem, rank_smem):
    """Folds example ``e``'s tile chunk maxima into its running list.

    Example ``e`` owns ``s_smem[e·tile_c:]`` and ``pool`` entries from ``e·pool`` of the
    list buffers (running list first, then the tile's document slots).
    """
    at = lambda start, n: pl.ds(e * pool + start, n)  # noqa: E731
    # 1. Per-document max within the tile: slot j = max over chunks with loc == j.
    s_col = cast(s_smem[pl.ds(e * tile_c, tile_c)], col_layout)
    loc_col = cast(loc_smem[...], col_layout)
    for slab in range(tile_c // 64):
      hit = cols_of(loc_col, tile_c) == iota((64, tile_c), 0) + slab * 64
      w = jnp.where(hit, cols_of(s_col, tile_c), NEG_INF).max(axis=1)
      val_smem[at(r + slab * 64, 64)] = w
      doc_smem[at(r + slab * 64, 64)] = cast(key_smem[pl.ds(slab * 64, 64)], row_layout)
    # 2. Documents already in the list (cut by the tile boundary): the list entry takes
    #    the max of both values; the tile's entry is dropped.
    w_val = cast(val_smem[at(r, tile_c)], col_layout)
    w_doc = cast(doc_smem[at(r, tile_c)], col_layout)
    l_val = cast(val_smem[at(0, r)], row_layout)
    l_doc = cast(doc_smem[at(0, r)], row_layout)
    l_doc_col = cast(doc_smem[at(0, r)], col_layout)
    same = rows_of(l_doc, tile_c) == cols_of(w_doc, tile_c)
    merged = jnp.maximum(l_val, jnp.where(same, cols_of(w_val, tile_c), NEG_INF).max(axis=1))
    dups = []
    for slab in range(tile_c // 64):
      t_doc = cast(doc_smem[at(r + slab * 64, 64)], row_layout)
      hit = (rows_of(t_doc, r) == cols_of(l_doc_col, r)) & (rows_of(t_doc, r) >= 0)
      dups.append(jnp.where(hit, 1, 0).max(axis=1))
    val_smem[at(0, r)] = merged
    for slab, dup in enumerate(dups):
      sl = at(r + slab * 64, 64)
      t_doc = cast(doc_smem[sl], row_layout)
      doc_smem[sl] = jnp.where(dup > 0, -1, t_doc)
    # 3. Rank every entry by (score desc, document asc) against all valid entries.
    p_val = cols_of(cast(val_smem[at(0, pool)], col_layout), pool)
    p_doc = cols_of(cast(doc_smem[at(0, pool)], col_layout), pool)
    for slab in range(pool // 64):
      sl = at(slab * 64, 64)
      e_val = rows_of(cast(val_smem[sl], row_layout), pool)
      e_doc = rows_of(cast(doc_smem[sl], row_layout), pool)
      beats = (p_doc >= 0) & ((p_val > e_val) | ((p_val == e_val) & (p_doc < e_doc)))
      rank = jnp.where(beats, 1, 0).sum(axis=1)
      rank_smem[sl] = jnp.where(cast(doc_smem[sl], row_layout) >= 0, rank, pool)
    # 4. The k best, in rank order, become the new list.
    p_rank = cols_of(cast(rank_smem[at(0, pool)], col_layout), pool)
    want = iota((64, pool), 0)
    pick = (p_rank == want) & (want < k)
    new_val = jnp.where(pick, p_val, NEG_INF).max(axis=1)
    new_doc = jnp.where(pick, p_doc, -1).max(axis=1)
    val_smem[at(0, r)] = new_val
    doc_smem[at(0, r)] = new_doc

  def example_maxima(acc, qs_smem, ks_smem):
    """``[tile_c, cols]`` accumulator → each example's chunk scores ``[tile_c]``."""
    s = acc
    if quant:
      s = s.astype(jnp.float32) * cols_of(cast(qs_smem[...], col_layout), cols, tile_c)
    # an example's columns are whole 64-column slabs of the tile: a slice selects registers
    maxima = [s[:, e * cols_e:(e + 1) * cols_e].max(axis=1) for e in range(examples)]
    if quant:   # the chunk's scale is positive: it commutes with the max
      scale = cast(ks_smem[...], row_layout)
      maxima = [m * scale for m in maxima]
    return maxima

  def body(*refs):
    q_lo_gmem = None
    if quant and query_terms == 2:
      kr_gmem, q_gmem, q_lo_gmem, qs_gmem, ks_gmem, loc_gmem, key_gmem, val_out, doc_out = refs
    elif quant:
      kr_gmem, q_gmem, qs_gmem, ks_gmem, loc_gmem, key_gmem, val_out, doc_out = refs
    else:
      kr_gmem, q_gmem, loc_gmem, key_gmem, val_out, doc_out = refs
    blk = lax.axis_index("block")
    p = lax.axis_index("pass")

    def scoped(s_smem, val_smem, doc_smem, rank_smem):
      for e in range(examples):
        val_smem[pl.ds(e * pool, r)] = cast(jnp.full((r,), NEG_INF, jnp.float32), row_layout)
        doc_smem[pl.ds(e * pool, r)] = cast(jnp.full((r,), -1, jnp.int32), row_layout)

      def tile_of(g):
        return jnp.minimum(blk * per_block + g, num_tiles - 1)

      def step(idx, *operands):
        q_terms = operands[1:1 + query_terms] if quant else operands[1:2]
        if quant:
          k_smem, (qs_smem, ks_smem, loc_smem, key_smem, acc) = operands[0], operands[-5:]
        else:
          (k_smem, _, loc_smem, key_smem, acc), qs_smem, ks_smem = operands, None, None
        _, grp, j = idx
        if compiled and key_dtype == "float8_e4m3fn":
          acc = fp8_accumulate(acc, k_smem, q_terms)
        elif compiled:
          rhs = plgpu.transpose_ref(q_terms[0], (1, 0)) if quant else q_terms[0]
          acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, k_smem, rhs))(
              plgpu.ACC.init(acc))
          plgpu.wgmma_wait(0)
        elif quant:   # the interpreter's wgmma takes no transposed views: a plain dot
          wide = jnp.int32 if acc_dtype == jnp.int32 else jnp.float32
          for q_smem in q_terms:
            acc = acc + jnp.dot(k_smem[...].astype(wide), q_smem[...].astype(wide).T,
                                preferred_element_type=acc_dtype)
        else:
          def fresh(acc_ref):
            plgpu.wgmma(acc_ref, k_smem, q_terms[0])
            return acc_ref[...]
          acc = acc + pl.run_scoped(fresh, plgpu.ACC((tile_c, cols), jnp.float32))
        last_f = j == num_f - 1

        @pl.when(last_f & (grp == 0))
        def _():
          for e, m in enumerate(example_maxima(acc, qs_smem, ks_smem)):
            s_smem[pl.ds(e * tile_c, tile_c)] = m

        if groups > 1:   # max over the query groups of the same example (examples == 1)
          @pl.when(last_f & (grp > 0))
          def _():
            (m,) = example_maxima(acc, qs_smem, ks_smem)
            s_smem[...] = jnp.maximum(cast(s_smem[...], row_layout), m)

        @pl.when(last_f & (grp == groups - 1))
        def _():
          for e in range(examples):
            merge = functools.partial(merge_tile, e, s_smem, loc_smem, key_smem, val_smem,
                                      doc_smem, rank_smem)
            if not skip_beaten:
              merge()
              continue
            best = cast(s_smem[pl.ds(e * tile_c, tile_c)], col_layout).max()
            kth = val_smem[e * pool + k - 1]    # -inf until the list holds k entries
            pl.when(best >= kth)(merge)

        if acc_dtype == jnp.int32:
          return acc * jnp.where(last_f, 0, 1).astype(jnp.int32)
        return acc * jnp.where(last_f, 0.0, 1.0).astype(jnp.float32)

      acc0 = cast(jnp.zeros((tile_c, cols), acc_dtype), plgpu.Layout.WGMMA)
      chunk_spec = lambda: plgpu.BlockSpec((tile_c,), lambda g, grp, j: (tile_of(g),))  # noqa: E731
      k_spec = plgpu.BlockSpec((tile_c, tile_f), lambda g, grp, j: (tile_of(g), j),
                               transforms=k_transforms)
      main = kr_gmem.at[pl.ds(0, num_tiles * tile_c)]
      if quant:
        q_spec = lambda: plgpu.BlockSpec((cols, tile_f), lambda g, grp, j: (grp, j),  # noqa: E731
                                         transforms=q_transforms)
        in_specs = [k_spec] + [q_spec() for _ in range(query_terms)] + [
            plgpu.BlockSpec((cols,), lambda g, grp, j: (grp,)),
            chunk_spec(), chunk_spec(), chunk_spec()]
        q_ops = (q_gmem.at[p],) + ((q_lo_gmem.at[p],) if query_terms == 2 else ())
        operands = (main, *q_ops, qs_gmem.at[p],
                    ks_gmem.at[pl.ds(0, num_tiles * tile_c)], loc_gmem, key_gmem)
      else:
        in_specs = [k_spec,
                    plgpu.BlockSpec((tile_f, cols), lambda g, grp, j: (grp * num_f + j, 0),
                                    transforms=q_transforms),
                    chunk_spec(), chunk_spec()]
        operands = (main, q_gmem.at[p], loc_gmem, key_gmem)
      plgpu.emit_pipeline(
          step,
          grid=(per_block, groups, num_f),
          in_specs=in_specs,
          max_concurrent_steps=min(stages, per_block * groups * num_f),
          init_carry=acc0,
      )(*operands)
      plgpu.commit_smem()
      for e in range(examples):
        out = pl.ds(e * r, r)
        plgpu.copy_smem_to_gmem(val_smem.at[pl.ds(e * pool, r)], val_out.at[p, blk, out])
        plgpu.copy_smem_to_gmem(doc_smem.at[pl.ds(e * pool, r)], doc_out.at[p, blk, out])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM((examples * tile_c,), jnp.float32),
                  plgpu.SMEM((examples * pool,), jnp.float32),
                  plgpu.SMEM((examples * pool,), jnp.int32),
                  plgpu.SMEM((examples * pool,), jnp.int32))

  return plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((passes, blocks, examples * r), jnp.float32),
                jax.ShapeDtypeStruct((passes, blocks, examples * r), jnp.int32)),
      grid=(blocks, passes),
      grid_names=("block", "pass"),
      # Lane semantics: every layout is explicit above. jax 0.11's default
      # (warpgroup semantics, layout inference) did not finish compiling this kernel.
      compiler_params=(plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)
                       if compiled else None),
      interpret=_platform.mosaic_interpret_params(interpret),
  )


def fp8_accumulate(acc, k_smem, q_smems):
  """``acc + Σ_terms k_smem · qᵀ`` for fp8 e4m3 SMEM operands (``q`` K-major), compiled.

  Hopper's fp8 wgmma keeps ~14 bits while it accumulates, its running accumulator
  included: each term of each K step starts from a fresh accumulator and is added to the
  float32 sum in registers ("promotion", as DeepSeek-V3 does every 128 products). Two
  terms summed in one accumulator erred by 4e-4 relative on the H200 (the residual term
  added to the code term's sum at that precision), over the compiled tests' 2e-4 bound.
  """
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  for q in q_smems:
    def fresh(acc_ref, q=q):
      plgpu.wgmma(acc_ref, k_smem, plgpu.transpose_ref(q, (1, 0)))
      return acc_ref[...]
    acc = acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))
  return acc


def stages_that_fit(tile_c: int, tile_f: int, cols: int, stages: int, itemsize: int = 2,
                    examples: int = 1, query_terms: int = 1, programs_per_sm: int = 1) -> int:
  """Pipeline depth whose buffers (K̄R, queries, per-tile vectors) fit SMEM.

  ``itemsize`` 1: quantised keys and ``query_terms`` query operands, plus their float32
  scales per stage. ``programs_per_sm``: programs sharing one SM's shared memory.
  """
  scratch = examples * (4 * tile_c + 12 * (LIST_SLOTS + tile_c))
  per_stage = itemsize * tile_f * (tile_c + query_terms * cols) + 8 * tile_c
  if itemsize == 1:
    per_stage += 4 * (tile_c + cols)
  return max(1, min(stages, (_SMEM_LIMIT // programs_per_sm - scratch) // per_stage))


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

  ``q_pfc`` is the unfused kernel's query operand ``[B·groups, F, cols]``; the max runs
  over every query column of every group of an example.
  """
  s_pjc = jnp.einsum("pfj,cf->pjc", q_pfc, kr_tail_cf, preferred_element_type=jnp.float32)
  return s_pjc.reshape(-1, groups * q_pfc.shape[2], kr_tail_cf.shape[0]).max(axis=1)


def _ragged_tail_candidates(queries: RouteQueries, kr_cf, kr_scale_c, layout: BankLayout,
                            c_main: int):
  """Per-document maxima of the chunks after the last full tile (plain XLA)."""
  c = kr_cf.shape[0]
  tile_c = layout.loc_tc.shape[1]
  scale = None if kr_scale_c is None else kr_scale_c[c_main:c]
  s_bc = jnp.pad(fused_chunk_scores(queries, kr_cf[c_main:c], scale),
                 ((0, 0), (0, tile_c - (c - c_main))), constant_values=NEG_INF)
  loc_c = layout.loc_tc[-1]
  hit = loc_c[:, None] == jnp.arange(tile_c, dtype=jnp.int32)[None, :]      # [chunk, slot]
  val = jnp.max(jnp.where(hit[None], s_bc[:, :, None], NEG_INF), axis=1)
  return val, jnp.broadcast_to(layout.slot_doc_tc[-1], (s_bc.shape[0], tile_c))


def _kernel_query_operands(queries: RouteQueries, examples: int):
  """Folds ``examples`` examples into each pass's columns: the kernel's query operands.

  Returns ``(q terms, q_scale or None, passes)``: bf16 ``(q [passes, groups·F,
  examples·cols],)``, or codes ``[passes, groups·examples·cols, F]`` (K-major; two for
  split fp8 queries) with scales ``[passes, groups·examples·cols]``. Padding examples (to
  fill the last pass) are zero.
  """
  b, g, j, f = queries.q_bgjf.shape
  passes = -(-b // examples)
  pad = passes * examples - b

  def fold(q):
    q = jnp.pad(q, ((0, pad), (0, 0), (0, 0), (0, 0))).reshape(passes, examples, g, j, f)
    if queries.scale_bgj is None:
      return q.transpose(0, 2, 4, 1, 3).reshape(passes, g * f, examples * j)
    return q.transpose(0, 2, 1, 3, 4).reshape(passes, g * examples * j, f)

  terms = tuple(fold(q) for q in (queries.q_bgjf, queries.lo_bgjf) if q is not None)
  if queries.scale_bgj is None:
    return terms, None, passes
  sc = jnp.pad(queries.scale_bgj, ((0, pad), (0, 0), (0, 0)), constant_values=1)
  sc = sc.reshape(passes, examples, g, j).transpose(0, 2, 1, 3).reshape(passes, -1)
  return terms, sc.astype(jnp.float32), passes


def route_top_k_blocks(queries: RouteQueries, any_query_b, kr_cf, layout: BankLayout, k: int, *,
                       tile_f: int, stages: int, blocks: int, kr_scale_c=None,
                       examples: int = 1, interpret=None, skip_beaten: bool = True,
                       programs_per_sm: int = 1):
  """Top-k documents through the fused kernel: ``(values [B, k'], documents [B, k'])``.

  ``queries``: :func:`pallas_kernels.quantised_queries.route_queries` of the filled queries (masked rows replaced, as
  :func:`pallas_kernels.block_routing._fill_masked_queries`); ``any_query_b``: examples
  with at least one routing token; ``kr_cf``: bf16, fp8 e4m3 or int8 bank with a multiple
  of 8 rows, ``kr_scale_c`` float32 ``[C]`` its positive per-chunk scales when quantised;
  ``layout``: :func:`bank_layout` of its chunk→document map; ``examples``: examples folded
  into one pass's query columns (``examples · cols ≤ 256``; needs one query group).
  """
  if k > LIST_SLOTS:
    raise ValueError(f"the fused route keeps at most {LIST_SLOTS} documents per block, "
                     f"got k={k}; use BlockSizes(fused=False)")
  key_dtype = jnp.dtype(kr_cf.dtype).name
  quant = key_dtype in QUANT_KEY_DTYPES
  if quant != (kr_scale_c is not None):
    raise ValueError(f"K̄R of dtype {key_dtype} needs " + ("its per-chunk scales (kr_scale_c)"
                     if quant else "no kr_scale_c (only fp8 e4m3 / int8 codes carry scales)"))
  if quant != (queries.scale_bgj is not None) or (
      quant and queries.q_bgjf.dtype != kr_cf.dtype) or (
      queries.lo_bgjf is not None and key_dtype != "float8_e4m3fn"):
    raise ValueError("queries and keys disagree: build them with route_queries(q, kr.dtype)")
  b, groups, cols_e, f = queries.q_bgjf.shape
  if groups > 1 and examples > 1:
    raise ValueError("examples are folded into the query columns only with one query group")
  examples = max(1, min(examples, b))
  tile_c = layout.loc_tc.shape[1]
  c = kr_cf.shape[0]
  num_tiles = c // tile_c
  vals, docs = [], []
  if num_tiles:
    cols = examples * cols_e
    nb, per = num_blocks_for(num_tiles, blocks, programs_per_sm)
    q_terms, q_scale, passes = _kernel_query_operands(queries, examples)
    st = stages_that_fit(tile_c, tile_f, cols, stages, jnp.dtype(key_dtype).itemsize, examples,
                         len(q_terms), programs_per_sm)
    call = _block_top_k_call(num_tiles, nb, per, f, cols, groups, passes, k, tile_c, tile_f, st,
                             interpret, key_dtype, examples, len(q_terms), skip_beaten)
    extra = (q_scale, kr_scale_c.astype(jnp.float32)) if quant else ()
    v, d = call(kr_cf, *q_terms, *extra, layout.loc_tc[:num_tiles].reshape(-1),
                layout.slot_doc_tc[:num_tiles].reshape(-1))
    # [passes, blocks, examples·64] → per example [B, blocks·k]
    def unfold(x):
      x = x.reshape(passes, nb, examples, LIST_SLOTS).transpose(0, 2, 1, 3)
      return x.reshape(passes * examples, nb, LIST_SLOTS)[:b, :, :k].reshape(b, -1)
    vals.append(unfold(v))
    docs.append(unfold(d))
  if num_tiles * tile_c < c:
    v, d = _ragged_tail_candidates(queries, kr_cf, kr_scale_c, layout, num_tiles * tile_c)
    vals.append(v)
    docs.append(d)
  val = jnp.concatenate(vals, axis=1)
  doc = jnp.concatenate(docs, axis=1)
  val = jnp.where(any_query_b[:, None], val, NEG_INF)
  return merge_candidates(val, doc, k)
