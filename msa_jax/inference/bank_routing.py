"""Routing over one shared bank of pooled chunks (SPEC §3 steps 2-3, §5 memory parallel).

The bank is a flat list of chunks whose documents are contiguous: ``kr_cf`` (L2-normalised
pooled router keys ``[C, F]``, ``F = Hkv*D``) and ``chunk_doc_c`` (the global document
index of each chunk, ``-1`` for padding). A document's score is the max over its chunks of
the max over routing tokens of ``rq · K̄R`` (``msa_jax.routing``); the top k documents win,
ties to the lower document index.

Nothing here grows with the bank: scoring runs over tiles of ``tile`` chunks in a
``lax.scan`` that carries a running top-k list, so peak memory is ``O(B·M·tile + B·k)``.
A document cut by a tile edge stays "open" until its last chunk has been seen and only
then competes. Merges sort by (score desc, document asc), so the result equals
``routing.route_documents`` exactly, ties included.

Quantised keys (``quantize.py``): ``kr_cf`` may hold fp8 e4m3 / int8 codes with a float32
scale per chunk, ``kr_scale_c``. The scan scores the codes and multiplies each chunk's score
by its scale, which equals scoring the dequantised keys (``rq · s q = s (rq · q)``, and
``s > 0`` commutes with the max over routing tokens); only the codes and ``4`` bytes per
chunk are read. The Pallas routes (``implementation="pallas"``: the unfused chunk-score
kernel with an XLA top-k, the engine's default, or the fused block top-k kernel) read the
codes too: fp8 / int8 wgmma against queries quantised per column to the same dtype, the
column scales applied before the max over routing tokens and the chunk scale after it.

Memory parallel: ``sharded_top_k`` runs the tiled scan (or a Pallas route) on each shard of a ``memory``
mesh axis (each shard holds whole documents), all-gathers the k local winners and merges
them; only ``k`` (score, document) pairs per shard cross devices.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

NEG_INF = -jnp.inf
NO_DOC = np.iinfo(np.int32).max   # sorts after every real document index


def merge_top_k(scores_bn, docs_bn, k: int):
  """The k best (score desc, doc asc) of candidate lists; ``-inf`` entries never win.

  Args:
    scores_bn: float32 ``[B, n]`` candidate scores (``-inf`` = no candidate).
    docs_bn: int32 ``[B, n]`` their document indices (any order, unique per row
      among real candidates).
  Returns:
    ``(scores [B, k], docs [B, k])`` sorted best first; missing entries are
    ``(-inf, NO_DOC)``.
  """
  docs = jnp.where(scores_bn > NEG_INF, docs_bn, NO_DOC).astype(jnp.int32)
  neg, docs = jax.lax.sort((-scores_bn.astype(jnp.float32), docs), dimension=1, num_keys=2)
  return pad_top_k(-neg[:, :k], docs[:, :k], k)


def pad_top_k(scores_bn, docs_bn, k: int):
  """A ranked list of ``n ≤ k`` entries padded to ``k`` with ``(-inf, NO_DOC)``."""
  n = scores_bn.shape[1]
  if n >= k:
    return scores_bn, docs_bn
  pad = ((0, 0), (0, k - n))
  return (jnp.pad(scores_bn, pad, constant_values=NEG_INF),
          jnp.pad(docs_bn, pad, constant_values=NO_DOC))


SCORE_DTYPES = ("float32", "bfloat16", "kernel", "kernel_fp8q1")


def _tile_chunk_scores(rq_bmf, route_mask_bm, kr_tf, scale_t=None, score_dtype="float32"):
  """Max over routing tokens of ``rq · K̄R`` for one tile: float32 ``[B, tile]``.

  ``scale_t``: float32 ``[tile]`` per-chunk scales of quantised ``kr_tf`` (positive), or None.
  ``score_dtype``: ``float32`` multiplies in float32 at HIGHEST precision (exact reference);
  ``bfloat16`` multiplies bfloat16 operands with float32 accumulation (tensor cores): int8
  and e4m3 codes are exact in bfloat16, so only the queries are rounded (2^-9 relative).
  ``kernel`` / ``kernel_fp8q1``: the GPU routing kernels' numerics on any platform
  (``pallas_kernels.quantised_queries.column_scores``): against fp8 / int8 codes each
  routing token is quantised per token to the keys' dtype (fp8 as two e4m3 terms, or one
  with ``kernel_fp8q1``: the engine's unfused fp8 route since 2026-12-05, see
  :func:`engine_block_sizes`); against float keys, bf16 operands (as ``bfloat16``). What the
  engine's Pallas route scores, so its accuracy can be measured where the kernels do not run.
  """
  if score_dtype.startswith("kernel") and scale_t is not None:
    from pallas_kernels import quantised_queries as qq
    queries = qq.route_queries(rq_bmf[:, None], kr_tf.dtype,
                               1 if score_dtype == "kernel_fp8q1" else 2)
    s_bmt = qq.column_scores(queries, kr_tf)[:, 0]
  elif score_dtype != "float32":
    s_bmt = jnp.einsum("bmf,tf->bmt", rq_bmf.astype(jnp.bfloat16), kr_tf.astype(jnp.bfloat16),
                       preferred_element_type=jnp.float32)
  else:
    s_bmt = jnp.einsum("bmf,tf->bmt", rq_bmf, kr_tf.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
  s_bmt = jnp.where(route_mask_bm[:, :, None], s_bmt, NEG_INF)
  s_bt = jnp.max(s_bmt, axis=1)
  return s_bt if scale_t is None else s_bt * scale_t[None]


SCORE_BUDGET_BYTES = 1 << 28   # float32 [B, M, tile] scores of one scan step, at most


def auto_tile(b: int, m: int, c: int, budget: int = SCORE_BUDGET_BYTES) -> int:
  """Chunks per scan step: as many as a fixed score budget allows (a constant, not the bank)."""
  return int(max(256, min(c, budget // max(1, 4 * b * m))))


def tiled_top_k(rq_bmf, route_mask_bm, kr_cf, chunk_doc_c, k: int, tile: int | None = None,
                kr_scale_c=None, score_dtype: str = "float32"):
  """Top-k documents of a chunk bank, scanning ``tile`` chunks at a time.

  Args:
    rq_bmf: group-summed routing queries ``[B, M, F]`` (``routing.group_sum_queries``).
    route_mask_bm: bool ``[B, M]``, the routing tokens.
    kr_cf: pooled router keys ``[C, F]`` (any float dtype; scored in float32).
    chunk_doc_c: int32 ``[C]``, non-decreasing over real chunks (documents contiguous
      and in index order), ``-1`` for padding chunks (only at the end of a run).
    k: documents to keep.
    tile: chunks per scan step (``C`` is padded up to a multiple of it); None: as many
      as ``SCORE_BUDGET_BYTES`` of scores allow (:func:`auto_tile`).
    kr_scale_c: float32 ``[C]`` positive per-chunk scales when ``kr_cf`` holds quantised
      codes (fp8 / int8), else None.
    score_dtype: ``float32`` (HIGHEST precision), ``bfloat16`` operands with float32
      accumulation, or the GPU kernels' numerics, ``kernel`` / ``kernel_fp8q1`` (queries
      quantised to the codes' dtype; see ``_tile_chunk_scores``).
  Returns:
    ``(scores [B, k], docs [B, k])`` best first, ``(-inf, NO_DOC)`` where fewer than k
    documents exist (or no token routes).
  """
  if score_dtype not in SCORE_DTYPES:
    raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}, got {score_dtype!r}")
  rq_bmf = rq_bmf.astype(jnp.float32)
  b = rq_bmf.shape[0]
  c, f = kr_cf.shape
  tile = auto_tile(b, rq_bmf.shape[1], c) if tile is None else max(1, min(tile, c))
  n_tiles = -(-c // tile)
  pad = n_tiles * tile - c
  kr = jnp.pad(kr_cf, ((0, pad), (0, 0))).reshape(n_tiles, tile, f)
  doc = jnp.pad(chunk_doc_c.astype(jnp.int32), (0, pad), constant_values=-1).reshape(n_tiles, tile)
  if kr_scale_c is None:
    scale = jnp.ones((n_tiles, 0), jnp.float32)     # no scales: an empty placeholder
  else:
    scale = jnp.pad(kr_scale_c.astype(jnp.float32), (0, pad),
                    constant_values=1).reshape(n_tiles, tile)

  def step(carry, xs):
    best_s, best_d, open_d, open_s = carry
    kr_tf, doc_t, scale_t = xs
    cs_bt = _tile_chunk_scores(rq_bmf, route_mask_bm, kr_tf,
                               None if kr_scale_c is None else scale_t, score_dtype)
    real_t = doc_t >= 0
    any_real = jnp.any(real_t)
    first = jnp.where(any_real, doc_t[0], -1)
    # Documents are contiguous, so doc - first indexes the tile's documents 0..tile-1.
    seg_t = jnp.where(real_t, doc_t - first, tile)
    part_bt = jax.vmap(lambda s: jax.ops.segment_max(s, seg_t, num_segments=tile + 1))(cs_bt)
    part_bt = part_bt[:, :tile]
    has_t = jax.ops.segment_sum(real_t.astype(jnp.int32), seg_t, num_segments=tile + 1)[:tile] > 0
    # The open document of the previous tile continues here, or is now complete.
    continues = any_real & (first == open_d)
    part_bt = part_bt.at[:, 0].set(jnp.where(continues, jnp.maximum(part_bt[:, 0], open_s),
                                             part_bt[:, 0]))
    last = jnp.max(jnp.where(real_t, doc_t, -1))
    j_last = last - first
    slot_t = jnp.arange(tile)
    closed_t = has_t & (slot_t != j_last)
    cand_s = jnp.where(closed_t[None], part_bt, NEG_INF)
    cand_d = jnp.broadcast_to(first + slot_t, (b, tile))
    prev_done = (open_d >= 0) & ~continues
    prev_s = jnp.where(prev_done, open_s, NEG_INF)[:, None]
    prev_d = jnp.broadcast_to(open_d, (b, 1))
    if tile > k:   # the tile's own k best (stable: ties keep the lower document) can win
      cand_s, pick = jax.lax.top_k(cand_s, k)
      cand_d = jnp.take_along_axis(cand_d, pick, axis=1)
    best_s, best_d = merge_top_k(jnp.concatenate([best_s, prev_s, cand_s], 1),
                                 jnp.concatenate([best_d, prev_d, cand_d], 1), k)
    new_open_d = jnp.where(any_real, last, jnp.where(prev_done, -1, open_d))
    new_open_s = jnp.where(any_real, part_bt[:, jnp.clip(j_last, 0, tile - 1)],
                           jnp.where(prev_done, NEG_INF, open_s))
    return (best_s, best_d, new_open_d, new_open_s), None

  init = (jnp.full((b, k), NEG_INF, jnp.float32), jnp.full((b, k), NO_DOC, jnp.int32),
          jnp.int32(-1), jnp.full((b,), NEG_INF, jnp.float32))
  (best_s, best_d, open_d, open_s), _ = jax.lax.scan(step, init, (kr, doc, scale))
  last_s = jnp.where(open_d >= 0, open_s, NEG_INF)[:, None]
  return merge_top_k(jnp.concatenate([best_s, last_s], 1),
                     jnp.concatenate([best_d, jnp.broadcast_to(open_d, (b, 1))], 1), k)


def local_top_k(rq_bmf, route_mask_bm, kr_cf, chunk_doc_c, k: int, *, tile: int | None = None,
                implementation: str = "xla", kr_scale_c=None, score_dtype: str = "float32",
                layouts=None, block_sizes=None, max_doc_chunks: int | None = None):
  """Top-k of one device's chunks: the tiled XLA scan, or a Pallas route.

  ``implementation="pallas"`` with ``block_sizes.fused=True`` runs
  ``pallas_kernels.block_routing.route_top_k`` with the fused block top-k kernel (Mosaic GPU: matmul, max over queries, per-document max and a
  block-local top-k in one pass; only k candidates per block leave it), so memory stays
  bounded as with the scan (k ≤ ``block_top_k.LIST_SLOTS``; larger k take the unfused route). Quantised keys
  (``kr_scale_c`` given) are read as fp8 / int8 codes by the kernel, against queries
  quantised per column to the same dtype (``quantised_queries.route_queries``).
  ``block_sizes.fused=False`` (``BankSettings.route_fused=False``, the engine's default)
  runs the unfused route instead: the chunk-score kernel, then the documents' top-k in XLA
  (``[B, C]`` float32 chunk scores in memory, 4 bytes a chunk and example: as much as the
  chunk→document map, 1/256 of bf16 keys at F = 1024; the top-k from their row maxima when
  ``max_doc_chunks`` is given, else through a segment max over every run; BENCHMARKS.md).
  ``layouts``: ``{tile: BankLayout, RUNS_KEY: chunk runs, CODES_KEY: chunk codes}`` of this
  device's chunks
  (:func:`routing_layouts`, built once per placed bank); looked up, else built per call.
  ``block_sizes``: the kernel's ``block_routing.BlockSizes`` (None: the engine's).
  ``max_doc_chunks``: the bank's longest document (static); the unfused route then ranks
  documents from the chunk scores without a segment max over the bank
  (``block_routing.run_top_k``).
  """
  if implementation == "xla":
    return tiled_top_k(rq_bmf, route_mask_bm, kr_cf, chunk_doc_c, k, tile, kr_scale_c,
                       score_dtype)
  from pallas_kernels import block_routing   # GPU kernels load only when asked for
  b, m, f = rq_bmf.shape
  bs = block_sizes or engine_block_sizes(f, kr_cf.dtype)
  if bs.fused is False:
    runs = (layouts or {}).get(RUNS_KEY) or chunk_runs(chunk_doc_c)
    codes = (layouts or {}).get(CODES_KEY) if bs.block_docs == CODES_ROW else None
    return _unfused_top_k(rq_bmf, route_mask_bm, kr_cf, chunk_doc_c, runs, k, bs, kr_scale_c,
                          max_doc_chunks, codes)
  tile_c = block_routing.fused_plan(b, m, f, bs, kr_cf.dtype)[0]
  layout = (layouts or {}).get(tile_c)
  scores, sel = block_routing.route_top_k(
      rq_bmf, route_mask_bm, kr_cf, chunk_doc_c, 0, k, implementation="pallas",
      block_sizes=bs, layout=layout, kr_scale_c=kr_scale_c)
  return merge_top_k(scores, jnp.where(sel.valid_bk, sel.doc_idx_bk, NO_DOC), k)


# routing_layouts' entries for the unfused kernel: (run_c, run_doc_c), and the run tail's
# chunk codes for rows of CODES_ROW chunks (route_tail.run_codes); ints like the tiles' keys
# (a pytree dict's keys must sort), and never a tile size
RUNS_KEY, CODES_KEY = 0, 1
CODES_ROW = 128     # BlockSizes.block_docs, the run tail's row


def chunk_runs(chunk_doc_c):
  """``(run_c, run_doc_c)``, int32 ``[C]`` each: the run of equal ``chunk_doc`` values each
  chunk belongs to (runs numbered 0, 1, … in chunk order, so non-decreasing) and each run's
  document (``-1``: a run of padding chunks; unused run slots hold ``-1`` too). A bank stores
  each document as one run, so a document's score is its run's max: a sorted segment max
  over at most ``C`` runs, whatever the document ids and wherever padding sits."""
  doc = chunk_doc_c.astype(jnp.int32)
  start = jnp.concatenate([jnp.ones((1,), bool), doc[1:] != doc[:-1]])
  run_c = (jnp.cumsum(start) - 1).astype(jnp.int32)
  run_doc = jnp.full(doc.shape, -1, jnp.int32).at[run_c].set(doc)
  return run_c, run_doc


def _unfused_top_k(rq_bmf, route_mask_bm, kr_cf, chunk_doc_c, runs, k: int, bs, kr_scale_c,
                   max_doc_chunks: int | None = None, codes_c=None):
  """The unfused Pallas route: the chunk-score kernel (bf16, or codes against quantised
  queries), then an exact top-k of the documents (runs of chunks) in XLA: from the chunk
  scores' row maxima when the longest document is known (``block_routing.run_top_k``),
  else through a segment max over every run."""
  from pallas_kernels import block_routing
  s_bc = block_routing.chunk_scores(rq_bmf, route_mask_bm, kr_cf, implementation="pallas",
                                    block_sizes=bs, kr_scale_c=kr_scale_c)
  run_c, run_doc = runs
  if max_doc_chunks is None or codes_c is None:   # (the bank's codes mask padding chunks)
    s_bc = jnp.where(chunk_doc_c[None] >= 0, s_bc, NEG_INF)
  if max_doc_chunks is not None:
    # ranked by (score desc, document asc) already: merge_top_k's order without its sort
    val, doc = block_routing.run_top_k(s_bc, run_c, k, bs.block_docs, max_doc_chunks,
                                       run_key_r=run_doc, method=bs.tail_method,
                                       tree_row=bs.tail_row, codes_c=codes_c)
    return pad_top_k(val, jnp.where(val > NEG_INF, doc, NO_DOC), k)
  run_s = block_routing.document_scores(s_bc, run_c, run_c.shape[0], sorted_docs=True)
  val, idx = block_routing.document_top_k(run_s, min(k, run_s.shape[1]), bs)
  doc = jnp.take(run_doc, idx)
  return merge_top_k(val, jnp.where((val > NEG_INF) & (doc >= 0), doc, NO_DOC), k)


def engine_block_sizes(key_width: int, key_dtype="bfloat16", **overrides):
  """The Pallas route's ``block_routing.BlockSizes`` for ``key_dtype`` keys of ``key_width``
  columns as the engine runs it: the unfused route unless ``fused=True``
  (``overrides``: e.g. ``fused``, ``chunks``, ``features``, ``fold_batch``,
  ``fp8_query_terms``).

  Unfused (the default since 2026-12-04): the chunk-score kernel, then the documents' top-k
  from the chunk scores' row maxima (``block_routing.run_top_k``, given the bank's
  ``max_doc_chunks``). bf16 keys: 256-chunk tiles two stages deep (the same 128 KB of
  pipeline buffers as 128-chunk tiles four deep, half the programs): on an H100 at 100M
  tokens the route at batch 8 took 4.25 ms against 5.25 (-19 %), batch 1 the same (1.040 x
  its read in device time against 1.038; BENCHMARKS.md, 2026-12-06; session 34 measured the
  same). 8-bit keys: two pipeline stages (a small shared-memory footprint, so
  several programs share an SM), 256-chunk tiles for int8 and 128-chunk tiles for fp8: on
  the H200 at 100M tokens these took int8 from 0.64 to 0.63 ms a layer at batch 1 and from
  2.44 to 2.09 at batch 8, fp8 (two query terms) from 0.88 to 0.74 at batch 1 with 64-chunk
  tiles (BENCHMARKS.md, 2026-12-04), then to 0.67 with 128-chunk tiles (2026-12-04T21Z;
  compiled tests at 128 chunks, one and two terms, passed on the H200 2026-12-05). fp8
  at 128 x 256 (one term, 0.54 ms) fails the compiled test as the fused kernel's 256-feature
  steps do (below), so fp8 keeps 128-feature steps here too. The unfused fp8 route takes
  one e4m3 query term since 2026-12-05 (``fp8_query_terms=2`` in ``overrides`` keeps the
  residual term): 0.530 ms a layer against two terms' 0.651 at batch 1 on the H200 (0.54 x
  bf16's 0.985; BENCHMARKS.md, 2026-12-05), and on the trained router measured with the kernels'
  numerics (1.3M tokens, 512 questions) one term and two both score bf16's recall@1 and EM
  (WORKSPACE.md "Bank quantisation"). The fused kernel keeps two terms.

  Fused: two programs per SM, and 256-feature pipeline steps for int8 keys (32 KB of keys
  a step, as bf16's 128): on the H200 at 100M tokens, batch 1, this took int8 routing from
  1.03 to 0.74 ms a layer, fp8 (two programs) from 1.31 to 1.09 and bf16 from 1.21 to
  1.12 (BENCHMARKS.md, 2026-12-01T22:45Z). fp8 keeps 128-feature steps: its wgmma
  accumulates a step's products at ~14 bits before the float32 sum
  (``block_top_k.fp8_accumulate``), and with 256 of them (1.00 ms) the compiled test
  fails (top scores off by up to 1.8e-3 on the H200, 2026-12-02).
  """
  from pallas_kernels import block_routing
  name = jnp.dtype(key_dtype).name
  fused = overrides.get("fused", False) is True
  features = (256 if fused and name == "int8" and key_width % 256 == 0 else
              128 if key_width % 128 == 0 else 64)
  tiling = {} if fused else {"bfloat16": {"chunks": 256, "stages": 2},
                             "int8": {"chunks": 256, "stages": 2},
                             "float8_e4m3fn": {"chunks": 128, "stages": 2,
                                                       "fp8_query_terms": 1}}.get(name, {})
  per_sm = {"programs_per_sm": 2} if fused else {}    # the unfused kernel has no such knob
  return block_routing.BlockSizes(**{"fused": fused, "features": features, **tiling,
                                     **per_sm, **overrides})


LAYOUT_TILES = (64, 128)   # the fused kernel's tiles (block_routing.fused_plan)


def routing_layouts(chunk_doc_c, tiles=LAYOUT_TILES):
  """``{tile: BankLayout}`` of a device's chunk→document map for the fused kernel, with the
  unfused route's chunk runs (``RUNS_KEY``: :func:`chunk_runs`) and its run tail's chunk
  codes (``CODES_KEY``: ``route_tail.run_codes`` for rows of ``CODES_ROW`` chunks).

  A property of the bank: build it once when the bank is placed (``sharded_layouts`` for a
  sharded map) and pass it to :func:`local_top_k` / :func:`sharded_top_k`; otherwise each
  routed call rebuilds it from the map (a scatter over every chunk).
  """
  from pallas_kernels import block_top_k
  from pallas_kernels import route_tail
  layouts = {t: block_top_k.bank_layout(chunk_doc_c, t) for t in tiles}
  layouts[RUNS_KEY] = chunk_runs(chunk_doc_c)
  layouts[CODES_KEY] = route_tail.run_codes(layouts[RUNS_KEY][0], CODES_ROW, chunk_doc_c >= 0)
  return layouts


def sharded_layouts(mesh, chunk_doc_c, axis: str = "memory", tiles=LAYOUT_TILES):
  """:func:`routing_layouts` of each ``axis`` shard of ``chunk_doc_c``, sharded like it
  (``[shards·tiles_per_shard, tile]`` arrays): what :func:`sharded_top_k` takes."""
  from jax.experimental.shard_map import shard_map
  spec = PartitionSpec(axis)
  fn = shard_map(lambda doc: routing_layouts(doc, tiles), mesh=mesh, in_specs=(spec,),
                 out_specs=spec, check_rep=False)
  return jax.jit(fn)(chunk_doc_c)


def sharded_top_k(mesh, rq_bmf, route_mask_bm, kr_cf, chunk_doc_c, k: int, *,
                  tile: int | None = None, axis: str = "memory", implementation: str = "xla",
                  kr_scale_c=None, score_dtype: str = "float32", layouts=None,
                  block_sizes=None, max_doc_chunks: int | None = None):
  """Memory parallel routing: each ``axis`` shard scores its chunks, a global merge picks k.

  ``kr_cf``/``chunk_doc_c`` are sharded by chunk over ``axis`` (each shard holding whole
  documents, see ``bank.shard_plan``); queries are replicated; ``kr_scale_c`` (quantised
  keys) is sharded like ``chunk_doc_c``; ``layouts`` (pallas only) is
  :func:`sharded_layouts` of ``chunk_doc_c``, built once per placed bank;
  ``max_doc_chunks`` (static) lets the unfused Pallas route skip its segment max (see
  :func:`local_top_k`). Returns
  replicated ``(scores [B, k], docs [B, k])`` like :func:`tiled_top_k` on the unsharded bank.
  """
  from jax.experimental.shard_map import shard_map

  def per_shard(rq, mask, kr, doc, lay, *scale):
    s, d = local_top_k(rq, mask, kr, doc, k, tile=tile, implementation=implementation,
                       kr_scale_c=scale[0] if scale else None, score_dtype=score_dtype,
                       layouts=lay, block_sizes=block_sizes, max_doc_chunks=max_doc_chunks)
    if mesh.shape[axis] == 1:       # one shard: its list is already the merged one
      return s, d
    s_all = jax.lax.all_gather(s, axis, axis=1, tiled=True)    # [B, shards*k]
    d_all = jax.lax.all_gather(d, axis, axis=1, tiled=True)
    return merge_top_k(s_all, d_all, k)

  rep = PartitionSpec()
  scales = () if kr_scale_c is None else (kr_scale_c,)
  lay = {} if implementation == "xla" or layouts is None else layouts
  fn = shard_map(per_shard, mesh=mesh,
                 in_specs=(rep, rep, PartitionSpec(axis, None), PartitionSpec(axis),
                           PartitionSpec(axis)) + (PartitionSpec(axis),) * len(scales),
                 out_specs=(rep, rep), check_rep=False)
  return fn(rq_bmf, route_mask_bm, kr_cf, chunk_doc_c, lay, *scales)


def selection_in_document_order(scores_bk, docs_bk):
  """Top-k winners as a ``routing.Selection`` in document order (SPEC §3 step 4).

  Returns ``(Selection, scores [B, k] aligned with it)``; invalid slots hold doc 0.
  """
  from msa_jax.routing import Selection
  valid = scores_bk > NEG_INF
  key = jnp.where(valid, docs_bk, NO_DOC)
  key, scores, valid = jax.lax.sort((key, scores_bk, valid), dimension=1, num_keys=1)
  docs = jnp.where(valid, key, 0).astype(jnp.int32)
  return Selection(docs, valid), jnp.where(valid, scores, NEG_INF)
