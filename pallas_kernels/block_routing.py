"""Block routing: chunk scores against a large pooled-key bank, then top-k documents.

SPEC §3 steps 2-3 for one router layer. The bank holds ``C`` pooled, L2-normalised
router keys ``K̄R`` (bf16, ``[C, F]`` with ``F = Hkv*D``) and a chunk→document map
whose documents occupy contiguous chunk ranges. Routing reads every key once, so it
is bound by memory bandwidth; the work is split as:

1. ``chunk_scores`` (the Pallas Mosaic GPU kernels of :mod:`pallas_kernels.chunk_max`): streams ``K̄R`` through shared
   memory with a TMA pipeline, multiplies each ``[chunks, F]`` tile by the
   group-summed routing queries on the tensor cores (wgmma, f32 accumulation) and
   reduces the ``[chunks, M]`` score tile over the question tokens in registers, so
   only ``[B, C]`` chunk scores (4 bytes per chunk, 0.2% of the key bytes) leave
   the kernel. Masked and padding query rows are replaced by a valid row of the same
   example, which leaves the max unchanged and keeps the kernel mask-free.
2. the top-k documents, small XLA ops (:mod:`pallas_kernels.route_tail`): given the
   bank's longest document (``max_doc_chunks``), ranked from the chunk scores' row
   maxima (:func:`run_top_k`, the engine's route); else a segment max over the
   contiguous chunk ranges and an exact top-k that touches the ``[B, N]`` document
   scores only through row maxima (:func:`pruned_top_k`; :func:`two_stage_top_k` is
   the alternative, ``BlockSizes.top_k``).

Fused (:mod:`pallas_kernels.block_top_k`; ``route_top_k``'s default when a bank layout is passed): one kernel does
the matmul, the max over question tokens, the per-document max and a block-local
top-k; only ``k`` candidates per block (one block per SM) leave it, and the final
top-k over them is a small XLA op. It needs ``k ≤ 64`` and the bank's
:class:`~pallas_kernels.block_top_k.BankLayout` (computed per call unless passed).

Bank layout: TMA needs the row count ``C`` to be a multiple of 8 (else the bank is
padded, i.e. copied, on every call); a multiple of ``BlockSizes.chunks`` also keeps
the ragged tail out of XLA. Bank builders should pad with ``chunk_doc = -1`` chunks.

Public ops (``implementation``: ``auto`` = pallas on a GPU, xla elsewhere):
  * :func:`route_top_k` → ``(top-k document scores [B, k] in selection order, Selection)``;
  * :func:`route_documents` → ``(doc scores [B, N], Selection)``, as
    ``msa_jax.routing.route_documents`` (training needs all scores for the aux loss);
  * :func:`chunk_scores` → ``[B, C]``.
Kernel numerics: the routing queries are rounded to bf16 (the keys are bf16 already)
and products accumulate in float32, so scores differ from the float32 reference by
about 1e-3 relative; near-ties can therefore pick a different document than the
float32 reference.

Quantised keys (fp8 e4m3 / int8 codes with a positive float32 scale per chunk, as
``msa_jax.inference.quantize`` stores them; ``kr_scale_c``): both kernels read
the 1-byte codes (half the bytes of bf16) and multiplies them on the tensor cores by
queries quantised per column to the same dtype (8-bit wgmma needs both operands in
one dtype; Hopper runs it at twice the bf16 rate): e4m3 × e4m3 → f32, or s8 × s8 →
s32 (exact). The column scales multiply the ``[chunks, cols]`` score tile before the
max over question tokens, the chunk scale the max (it is positive). int8 queries
(half a step of ``amax/127``) route as float queries do; an e4m3 query alone errs by
up to 2^-4 relative per element, so by default it is two e4m3 terms (the code and its
residual, ``BlockSizes.fp8_query_terms``), a second wgmma over the same key tile.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from msa_jax import routing as ref_routing
from pallas_kernels import _platform
from pallas_kernels import block_top_k, quantised_queries
from pallas_kernels.chunk_max import chunk_max_call, chunk_max_quant_call
# the tail after the chunk scores (pallas_kernels.route_tail); its names stay importable here
from pallas_kernels.route_tail import (document_scores, document_top_k,  # noqa: F401
                                       pruned_top_k, rows_per_run, run_codes, run_top_k,
                                       selection_from_top_k, tree_top_k, two_stage_top_k)

NEG_INF = -jnp.inf
_SMEM_BUDGET = 200 * 1024   # bytes of pipeline buffers per program (H100: 227 KB max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the chunk-score kernel and of the top-k.

  chunks: chunk rows per program (wgmma M; a multiple of 64).
  features: F columns per pipeline step (a multiple of 64 dividing F).
  stages: shared-memory pipeline depth (concurrent TMA steps).
  max_queries: most query columns per kernel pass (wgmma N ≤ 256); more queries
    run as further passes over the bank.
  block_docs: documents per row of the first top-k stage (0: one-stage top-k).
  top_k: ``two_stage`` (:func:`two_stage_top_k`), ``pruned`` or ``pruned_sort``
    (:func:`pruned_top_k`); ``block_docs`` is the row length of either.
  fused: :func:`route_top_k` runs the fused kernel (document max and block-local
    top-k inside it, :mod:`pallas_kernels.block_top_k`; needs ``k ≤ 64``). None
    (default): fused when the caller passes the bank's ``layout``, which a bank
    builds once; without it the layout costs ~0.06 ms per call on an H100.
  blocks: programs of the fused kernel (0: ``programs_per_sm`` per streaming
    multiprocessor).
  programs_per_sm: with ``blocks=0``, fused-kernel programs per streaming multiprocessor;
    each gets ``1/programs_per_sm`` of the shared memory (a shallower pipeline), and the
    programs sharing an SM overlap one's per-tile work and waits with the other's loads.
  fold_batch: the fused kernel folds several examples into one pass's query columns
    (``examples · cols ≤ max_queries``, wgmma N): one read of the bank serves them all,
    each example keeping its own max over question tokens and running list. False: one
    pass over the bank per example. None (default): fold 16-bit keys only. Measured on
    the H200 at 100M tokens, batch 8 × 64 tokens (BENCHMARKS.md): bf16 folded 8.69 vs
    9.56 ms, fp8 10.75 vs 10.50, int8 8.43 vs 5.43: the folded 8-bit kernel is bound by
    its per-tile work, not by reading keys.
  fp8_query_terms: fp8 K̄R: the queries as one e4m3 code per element (1: fastest, 2^-4
    relative error) or two, the code plus its e4m3 residual (2: ~2^-8, a second fp8
    wgmma per tile); see :func:`pallas_kernels.quantised_queries.route_queries`.
  skip_beaten: the fused kernel merges a tile into a running list only when its best chunk
    reaches the list's k-th value (exact; see ``block_top_k._block_top_k_call``).
  sorted_docs: promise that ``chunk_doc`` is non-decreasing with padding (-1) only
    at the end (the bank layout), letting the segment max use sorted indices.
  persistent: the unfused chunk-score kernel runs ``blocks`` programs a pass (0: one per
    SM), each streaming its run of tiles through one pipeline
    (``pallas_kernels.chunk_max._persistent_kernel``; bf16 and 8-bit keys); else one
    program per tile. Equal to the per-tile kernel interpreted and compiled; slower on an
    H100 (8-bit keys at 100M: 1.26 x their read against 1.12 x, 2026-12-05), so off.
  tail_method, tail_row: the unfused route's :func:`run_top_k` tree (``"rank"``: rank and
    select reduces, ``"sort"``: two-key sorts) and its row length for the row maxima'
    top-k (:func:`pallas_kernels.route_tail.tree_top_k`); the same documents either way.
  """

  chunks: int = 128
  features: int = 128
  stages: int = 4
  max_queries: int = 256
  block_docs: int = 128
  sorted_docs: bool = False
  top_k: str = "pruned_sort"
  fused: bool | None = None
  blocks: int = 0
  programs_per_sm: int = 1
  fold_batch: bool | None = None
  fp8_query_terms: int = 2
  skip_beaten: bool = True
  tail_method: str = "rank"
  tail_row: int = 128
  persistent: bool = False


# ----------------------------------------------------------------------------
# Queries: fold masks into the matrix.
# ----------------------------------------------------------------------------

def _fill_masked_queries(rq_bmf, query_mask_bm, num_cols: int):
  """``[B, num_cols, F]`` queries whose masked/padding rows repeat a valid row.

  The max over rows is then the max over valid rows. Examples without a valid row
  get arbitrary rows; callers reset their scores to ``-inf``.
  """
  b, m, f = rq_bmf.shape
  first_valid_b = jnp.argmax(query_mask_bm, axis=1)
  fill_bf = jnp.take_along_axis(rq_bmf, first_valid_b[:, None, None], axis=1)[:, 0]
  q_bmf = jnp.where(query_mask_bm[:, :, None], rq_bmf, fill_bf[:, None, :])
  if num_cols > m:
    q_bmf = jnp.concatenate(
        [q_bmf, jnp.broadcast_to(fill_bf[:, None, :], (b, num_cols - m, f))], axis=1)
  return q_bmf


def _plan(m: int, f: int, bs: BlockSizes):
  """Query columns per pass, number of passes, and the tiling that fits SMEM."""
  if bs.chunks % 64 or f % bs.features or bs.features % 64:
    raise ValueError(f"unsupported tiling {bs} for F={f}")
  # Query columns per pass: a multiple of 64, at most max_queries.
  groups = -(-m // bs.max_queries)
  per_group = -(-m // groups)
  cols = 64 * -(-per_group // 64)
  # Wide query tiles: fewer chunk rows (the [tile_c, cols] float32 accumulator within 128
  # registers a thread) and a pipeline depth that fits shared memory.
  tile_c = min(bs.chunks, max(64, 64 * (_ACC_ELEMS // cols // 64)))
  stage_bytes = 2 * bs.features * (tile_c + cols)
  bs = dataclasses.replace(bs, chunks=tile_c,
                           stages=max(1, min(bs.stages, _SMEM_BUDGET // stage_bytes)))
  return bs, groups, cols


def _kernel_inputs(rq_bmf, query_mask_bm, kr_cf, groups, cols):
  b, _, f = rq_bmf.shape
  c = kr_cf.shape[0]
  q_bgcf = _fill_masked_queries(rq_bmf, query_mask_bm, groups * cols).reshape(b, groups, cols, f)
  q_pfc = q_bgcf.astype(jnp.bfloat16).reshape(b * groups, cols, f).transpose(0, 2, 1)
  kr_cf = kr_cf.astype(jnp.bfloat16)
  if c % 8:  # TMA needs the bank's row count to be a multiple of 8: pad (copies the bank)
    kr_cf = jnp.pad(kr_cf, ((0, 8 - c % 8), (0, 0)))
  return q_pfc, kr_cf


_ACC_ELEMS = 128 * 128   # f32 accumulator elements per warpgroup: 128 registers a thread


def _accumulator_budget(bs: BlockSizes, key_dtype):
  """``(most query columns per pass, accumulator elements per tile)`` for ``key_dtype``
  keys: fp8 keys hold a second float32 accumulator (each K step is summed in registers),
  so they get half the registers: at most 128 columns, half the elements."""
  if jnp.dtype(key_dtype).name == "float8_e4m3fn":
    return min(bs.max_queries, 128), _ACC_ELEMS // 2
  return bs.max_queries, _ACC_ELEMS


def fused_plan(b: int, m: int, f: int, bs: BlockSizes, key_dtype="bfloat16"):
  """``(tile chunks, query groups, columns per example, examples per pass)`` of the fused
  kernel for ``b`` examples of ``m`` routing tokens over ``key_dtype`` keys (the bank
  layout's tile is the first).

  The ``[tile, examples·cols]`` accumulator stays within 128 registers a thread; fp8 keys
  hold a second one (each K step is summed in float32 registers), so they get half: at
  most 128 columns per pass and 64-chunk tiles when a pass has more than 64 columns.
  """
  max_cols, budget = _accumulator_budget(bs, key_dtype)
  _, groups, cols = _plan(m, f, dataclasses.replace(bs, max_queries=max_cols))
  examples = 1
  fold = bs.fold_batch if bs.fold_batch is not None else jnp.dtype(key_dtype).itemsize > 1
  if fold and groups == 1:
    examples = max(1, min(b, max_cols // cols))
  tile_c = bs.chunks if bs.chunks * examples * cols <= budget else min(bs.chunks, 64)
  return tile_c, groups, cols, examples


def _route_top_k_fused(rq_bmf, query_mask_bm, kr_cf, chunk_doc_c, k: int, bs: BlockSizes,
                       interpret, layout, kr_scale_c):
  b, m, f = rq_bmf.shape
  tile_c, groups, cols, examples = fused_plan(b, m, f, bs, kr_cf.dtype)
  if layout is None:
    layout = block_top_k.bank_layout(chunk_doc_c, tile_c)
  elif layout.loc_tc.shape[1] != tile_c:
    raise ValueError(f"the bank layout has tiles of {layout.loc_tc.shape[1]} chunks but the "
                     f"kernel uses {tile_c} here (batch {b}, {m} routing tokens); rebuild it "
                     f"with bank_layout(chunk_doc, {tile_c}) (fused_plan gives the tile)")
  q_bgjf = _fill_masked_queries(rq_bmf, query_mask_bm, groups * cols).reshape(b, groups, cols, f)
  queries = quantised_queries.route_queries(q_bgjf, kr_cf.dtype, bs.fp8_query_terms)
  if kr_scale_c is None:
    kr_cf = kr_cf.astype(jnp.bfloat16)
  c = kr_cf.shape[0]
  if c % 8:  # TMA needs the bank's row count to be a multiple of 8: pad (copies the bank)
    kr_cf = jnp.pad(kr_cf, ((0, 8 - c % 8), (0, 0)))
    if kr_scale_c is not None:
      kr_scale_c = jnp.pad(kr_scale_c, (0, 8 - c % 8), constant_values=1)
  return block_top_k.route_top_k_blocks(
      queries, jnp.any(query_mask_bm, axis=1), kr_cf, layout, k, tile_f=bs.features,
      stages=bs.stages, blocks=bs.blocks, kr_scale_c=kr_scale_c, examples=examples,
      interpret=interpret, skip_beaten=bs.skip_beaten, programs_per_sm=bs.programs_per_sm)


def _tiles_then_tail(c: int, tile_c: int, b: int, groups: int, kernel_scores, tail_scores):
  """``[B, C]`` chunk scores: ``kernel_scores(num_tiles)`` (``[B·groups, whole tiles]``, the
  max taken over each example's query groups) then ``tail_scores(c_main)`` for the ragged
  tail after the last whole tile (``[B, C - c_main]``, plain XLA)."""
  num_tiles = c // tile_c
  c_main = num_tiles * tile_c
  parts = []
  if num_tiles:
    parts.append(kernel_scores(num_tiles).reshape(b, groups, c_main).max(axis=1))
  if c_main < c:
    parts.append(tail_scores(c_main))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _chunk_scores_pallas(rq_bmf, query_mask_bm, kr_cf, bs: BlockSizes, interpret):
  b, m, f = rq_bmf.shape
  c = kr_cf.shape[0]
  bs, groups, cols = _plan(m, f, bs)
  q_pfc, kr_cf = _kernel_inputs(rq_bmf, query_mask_bm, kr_cf, groups, cols)
  s_bc = _tiles_then_tail(
      c, bs.chunks, b, groups,
      lambda tiles: chunk_max_call(tiles, f, cols, b * groups, bs, interpret)(kr_cf, q_pfc),
      lambda c_main: block_top_k.tail_chunk_scores(q_pfc, kr_cf[c_main:c], groups))
  return jnp.where(jnp.any(query_mask_bm, axis=1)[:, None], s_bc, NEG_INF)


def quant_plan(m: int, f: int, bs: BlockSizes, key_dtype):
  """``(tiling, query groups, columns)`` of the unfused kernel on quantised keys: as
  :func:`_plan`, with 1-byte pipeline buffers and, for fp8 (a second, per-step float32
  accumulator), at most 128 columns and 64-chunk tiles past 64 columns."""
  max_cols, budget = _accumulator_budget(bs, key_dtype)
  bs, groups, cols = _plan(m, f, dataclasses.replace(bs, max_queries=max_cols))
  tile_c = bs.chunks if bs.chunks * cols <= budget else min(bs.chunks, 64)
  terms = bs.fp8_query_terms if jnp.dtype(key_dtype).name == "float8_e4m3fn" else 1
  stage_bytes = bs.features * (tile_c + terms * cols) + 4 * (cols + tile_c)   # + the scales
  return dataclasses.replace(bs, chunks=tile_c,
                             stages=max(1, min(bs.stages, _SMEM_BUDGET // stage_bytes))), groups, cols


def _chunk_scores_pallas_quant(rq_bmf, query_mask_bm, kr_cf, kr_scale_c, bs: BlockSizes,
                               interpret):
  """Chunk scores ``[B, C]`` of quantised keys through the unfused kernel: queries quantised
  per column (``quantised_queries.route_queries``), ``scale_c · max_j q_scale_j · codes·q_j``."""
  b, m, f = rq_bmf.shape
  c = kr_cf.shape[0]
  bs, groups, cols = quant_plan(m, f, bs, kr_cf.dtype)
  q_bgjf = _fill_masked_queries(rq_bmf, query_mask_bm, groups * cols).reshape(b, groups, cols, f)
  queries = quantised_queries.route_queries(q_bgjf, kr_cf.dtype, bs.fp8_query_terms)
  terms = [q.reshape(b * groups, cols, f) for q in (queries.q_bgjf, queries.lo_bgjf)
           if q is not None]
  q_scale = queries.scale_bgj.reshape(b * groups, cols).astype(jnp.float32)
  codes = kr_cf if c % 8 == 0 else jnp.pad(kr_cf, ((0, 8 - c % 8), (0, 0)))  # TMA: rows % 8
  kr_scale_c = kr_scale_c.astype(jnp.float32)

  def kernel_scores(tiles):   # the chunk scale (positive: commutes with the max) in-kernel
    return chunk_max_quant_call(tiles, f, cols, b * groups, bs, jnp.dtype(kr_cf.dtype).name,
                                 len(terms), interpret)(codes, *terms, q_scale, kr_scale_c)
  s_bc = _tiles_then_tail(c, bs.chunks, b, groups, kernel_scores,
                          lambda c_main: quantised_queries.fused_chunk_scores(
                              queries, kr_cf[c_main:c], kr_scale_c[c_main:c]))
  return jnp.where(jnp.any(query_mask_bm, axis=1)[:, None], s_bc, NEG_INF)


def _chunk_scores_xla(rq_bmf, query_mask_bm, kr_cf):
  """Best plain-XLA formulation: one bf16 matmul (f32 accumulation) + masked max."""
  s_bmc = jnp.einsum("bmf,cf->bmc", rq_bmf.astype(jnp.bfloat16), kr_cf.astype(jnp.bfloat16),
                     preferred_element_type=jnp.float32)
  return jnp.max(jnp.where(query_mask_bm[:, :, None], s_bmc, NEG_INF), axis=1)


def chunk_scores_reference(rq_bmf, query_mask_bm, kr_cf):
  """Float32 reference: ``msa_jax.routing.chunk_scores``."""
  return ref_routing.chunk_scores(rq_bmf, query_mask_bm, kr_cf)


@functools.partial(jax.jit, static_argnames=("implementation", "block_sizes", "interpret"))
def chunk_scores(rq_bmf, query_mask_bm, kr_cf, *, implementation: str = "auto",
                 block_sizes: BlockSizes | None = None, interpret: bool | None = None,
                 kr_scale_c=None):
  """Per-chunk routing score ``max_t rq[t]·K̄R[c]`` over routing tokens, ``[B, C]`` f32.

  Args:
    rq_bmf: group-summed routing queries ``[B, M, F]`` (``group_sum_queries``).
    query_mask_bm: bool ``[B, M]``, which tokens route.
    kr_cf: pooled router keys ``[C, F]`` (bf16 in a bank), or fp8 e4m3 / int8 codes with
      their positive per-chunk scales ``kr_scale_c`` (float32 ``[C]``): the kernel reads
      the codes against per-column quantised queries, XLA scores them with float32
      queries; either way times the chunk's scale.
    implementation: ``auto | pallas | xla``.
    block_sizes: kernel tiling (pallas only).
    interpret: force (True) or forbid (False) interpret mode; None = interpret off GPU.
  Returns:
    float32 ``[B, C]``; ``-inf`` for an example without routing tokens.
  """
  xla = _platform.resolve(implementation) == "xla"
  if kr_scale_c is not None:
    if xla:
      return _chunk_scores_xla_codes(rq_bmf, query_mask_bm, kr_cf, kr_scale_c)
    return _chunk_scores_pallas_quant(rq_bmf, query_mask_bm, kr_cf, kr_scale_c,
                                      block_sizes or BlockSizes(), interpret)
  if xla:
    return _chunk_scores_xla(rq_bmf, query_mask_bm, kr_cf)
  return _chunk_scores_pallas(rq_bmf, query_mask_bm, kr_cf, block_sizes or BlockSizes(),
                              interpret)


def route_top_k_reference(rq_bmf, query_mask_bm, kr_cf, chunk_doc_c, num_docs: int, k: int):
  """Float32 reference for :func:`route_top_k`, from ``msa_jax.routing``."""
  doc_s, sel = ref_routing.route_documents(rq_bmf, query_mask_bm, kr_cf, chunk_doc_c,
                                           num_docs, k)
  scores = jnp.take_along_axis(doc_s, sel.doc_idx_bk, axis=1)
  return jnp.where(sel.valid_bk, scores, NEG_INF), sel


@functools.partial(jax.jit, static_argnames=("num_docs", "k", "implementation", "block_sizes",
                                             "interpret", "max_doc_chunks"))
def route_top_k(rq_bmf, query_mask_bm, kr_cf, chunk_doc_c, num_docs: int, k: int, *,
                implementation: str = "auto", block_sizes: BlockSizes | None = None,
                interpret: bool | None = None, layout=None, kr_scale_c=None,
                max_doc_chunks: int | None = None):
  """Top-k documents of one bank: the inference path (no full score vector returned).

  Args:
    rq_bmf: group-summed routing queries ``[B, M, F]``.
    query_mask_bm: bool ``[B, M]``: routing tokens (question, padding excluded).
    kr_cf: pooled L2-normalised router keys ``[C, F]``: bf16, or fp8 e4m3 / int8 codes
      with ``kr_scale_c``.
    chunk_doc_c: int ``[C]`` document of each chunk (a document's chunks are
      contiguous; ``-1`` = padding chunk).
    num_docs: N document slots; k: documents to select.
    implementation: ``auto | pallas | xla``.
    layout: the bank's ``block_top_k.bank_layout(chunk_doc_c, tile)`` for the fused
      kernel (a bank property; computed here when None; ``fused_plan`` gives the tile).
    kr_scale_c: float32 ``[C]`` positive per-chunk scales of quantised keys (the key is
      ``scale · code``). Both kernels (fused, and unfused for ``fused=False`` or ``k > 64``)
      read the codes with fp8 / int8 wgmma against queries quantised to the same dtype
      with a scale per query column (fp8: two e4m3 terms by default,
      ``BlockSizes.fp8_query_terms``; :func:`pallas_kernels.quantised_queries.route_queries`);
      the XLA path scores the codes with float32 queries and multiplies by the scale.
    max_doc_chunks: the longest document in chunks (static; a bank's ``max_doc_chunks``).
      Given, the unfused route ranks documents from the chunk scores with
      :func:`run_top_k` (no segment max over the bank; ``chunk_doc_c`` must then be
      non-decreasing over real chunks, as a bank's is, for ties to go to the lower
      document); None: segment max over documents, then ``bs.top_k``'s top-k.
  Returns:
    ``(top_scores [B, k], Selection)``: ``top_scores[b, i]`` is the score of document
    ``Selection.doc_idx_bk[b, i]`` (document order, as ``select_top_k``), ``-inf``
    where ``valid_bk`` is False.
  """
  bs = block_sizes or BlockSizes()
  quant = kr_scale_c is not None
  fused = (layout is not None or quant) if bs.fused is None else bs.fused
  if quant and jnp.dtype(kr_cf.dtype).name not in quantised_queries.QUANT_KEY_DTYPES:
    raise ValueError(f"kr_scale_c given with {kr_cf.dtype} keys: scales go with fp8 e4m3 / "
                     "int8 codes only")
  use_pallas = _platform.resolve(implementation) == "pallas"
  if use_pallas and fused and k <= block_top_k.LIST_SLOTS:
    top_val, top_idx = _route_top_k_fused(rq_bmf, query_mask_bm, kr_cf, chunk_doc_c, k, bs,
                                          interpret, layout, kr_scale_c)
    return selection_from_top_k(top_val, top_idx, k)
  s_bc = chunk_scores(rq_bmf, query_mask_bm, kr_cf, implementation=implementation,
                      block_sizes=bs, interpret=interpret, kr_scale_c=kr_scale_c)
  if max_doc_chunks is not None:
    top_val, top_idx = run_top_k(s_bc, chunk_doc_c, k, bs.block_docs, max_doc_chunks,
                                 method=bs.tail_method, tree_row=bs.tail_row)
    return selection_from_top_k(top_val, top_idx, k)
  doc_s = document_scores(s_bc, chunk_doc_c, num_docs, bs.sorted_docs)
  top_val, top_idx = document_top_k(doc_s, k, bs)
  return selection_from_top_k(top_val, top_idx, k)


def _chunk_scores_xla_codes(rq_bmf, query_mask_bm, codes_cf, scale_c):
  """Chunk scores of quantised keys: float32 queries · codes, times the chunk's scale."""
  s_bmc = jnp.einsum("bmf,cf->bmc", rq_bmf.astype(jnp.float32), codes_cf.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
  s_bc = jnp.max(jnp.where(query_mask_bm[:, :, None], s_bmc, NEG_INF), axis=1)
  return s_bc * scale_c[None].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_docs", "k", "implementation", "block_sizes",
                                             "interpret"))
def route_documents(rq_bmf, query_mask_bm, kr_cf, chunk_doc_c, num_docs: int, k: int, *,
                    implementation: str = "auto", block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None):
  """Drop-in for ``msa_jax.routing.route_documents``: ``(doc scores [B, N], Selection)``.

  ``implementation="xla"`` is the float32 reference itself (differentiable scores,
  for the training aux loss); ``pallas`` uses the kernel's chunk scores, which
  cannot be differentiated (no VJP): use it for inference or metrics only.
  """
  if _platform.resolve(implementation) == "xla":
    return ref_routing.route_documents(rq_bmf, query_mask_bm, kr_cf, chunk_doc_c, num_docs, k)
  bs = block_sizes or BlockSizes()
  s_bc = chunk_scores(rq_bmf, query_mask_bm, kr_cf, implementation="pallas", block_sizes=bs,
                      interpret=interpret)
  doc_s = document_scores(s_bc, chunk_doc_c, num_docs, bs.sorted_docs)
  top_val, top_idx = document_top_k(doc_s, k, bs)
  _, sel = selection_from_top_k(top_val, top_idx, k)
  return doc_s, sel
