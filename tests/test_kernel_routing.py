"""Block routing kernel (pallas_kernels.block_routing) against its references.

CPU runs the Mosaic GPU kernel in interpret mode on small banks; tests marked
``gpu`` run it compiled at bank sizes with many tiles.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import routing as rr
from pallas_kernels import block_routing as br
from pallas_kernels import block_top_k as bt

SMALL = br.BlockSizes(chunks=64, features=64, stages=2, block_docs=8)
FUSED = br.BlockSizes(chunks=64, features=64, stages=2, block_docs=8, fused=True, blocks=2)


def _bank(seed, b, m, h, g, d, doc_lens, pad_chunks=0, valid_tokens=None):
  """Random routing inputs; documents of ``doc_lens`` chunks, then padding chunks."""
  ks = jax.random.split(jax.random.key(seed), 2)
  rq_bmhd = jax.random.normal(ks[0], (b, m, h, d), jnp.float32)
  c = int(sum(doc_lens)) + pad_chunks
  kr_cgd = rr.l2_normalize(jax.random.normal(ks[1], (c, g, d), jnp.float32))
  doc_c = np.concatenate([np.full(n, i) for i, n in enumerate(doc_lens)] + [np.full(pad_chunks, -1)])
  valid = np.full(b, m) if valid_tokens is None else np.asarray(valid_tokens)
  mask_bm = jnp.asarray(np.arange(m)[None, :] < valid[:, None])
  return rq_bmhd, kr_cgd, jnp.asarray(doc_c, jnp.int32), mask_bm


def _numpy_route(rq_bmhd, kr_cgd, doc_c, mask_bm, n, k):
  """Float64 numpy from SPEC §3, per head (no group-sum identity)."""
  rq = np.asarray(rq_bmhd, np.float64)
  rq = rq / np.linalg.norm(rq, axis=-1, keepdims=True)
  kr = np.asarray(kr_cgd, np.float64)
  h, g = rq.shape[2], kr.shape[1]
  kr_h = kr[:, np.arange(h) // (h // g)]                       # [C, H, D]
  s_bmc = np.einsum("bmhd,chd->bmc", rq, kr_h) / h              # mean over heads
  s_bmc = np.where(np.asarray(mask_bm)[:, :, None], s_bmc, -np.inf)
  s_bc = s_bmc.max(axis=1)
  doc = np.full((rq.shape[0], n), -np.inf)
  for c, dc in enumerate(np.asarray(doc_c)):
    if dc >= 0:
      doc[:, dc] = np.maximum(doc[:, dc], s_bc[:, c])
  chosen = []
  for row in doc:
    order = sorted(range(n), key=lambda i: (-row[i], i))[:min(k, n)]
    chosen.append(sorted(i for i in order if row[i] > -np.inf))
  return doc, chosen


def _chosen(sel):
  return [sorted(int(i) for i, v in zip(ix, vl) if v)
          for ix, vl in zip(np.asarray(sel.doc_idx_bk), np.asarray(sel.valid_bk))]


def test_reference_matches_float64_numpy():
  rq, kr, doc_c, mask = _bank(0, 2, 6, 8, 2, 16, [3, 1, 5, 2, 4], pad_chunks=2, valid_tokens=[4, 6])
  rq_bmf = rr.group_sum_queries(rq, 2)
  doc_s, sel = rr.route_documents(rq_bmf, mask, kr.reshape(kr.shape[0], -1), doc_c, 6, 3)
  want_s, want_sel = _numpy_route(rq, kr, doc_c, mask, 6, 3)
  np.testing.assert_allclose(np.asarray(doc_s), want_s, rtol=1e-5, atol=1e-6)
  assert _chosen(sel) == want_sel
  # route_top_k (xla) returns the scores of the chosen documents, in selection order.
  top_s, sel2 = br.route_top_k(rq_bmf, mask, kr.reshape(kr.shape[0], -1), doc_c, 6, 3,
                               implementation="xla")
  assert _chosen(sel2) == want_sel
  for bi in range(2):
    for ix, v, s in zip(np.asarray(sel2.doc_idx_bk[bi]), np.asarray(sel2.valid_bk[bi]),
                        np.asarray(top_s[bi])):
      assert (not v and s == -np.inf) or abs(s - want_s[bi, ix]) < 1e-2


def test_two_stage_top_k_is_exact_with_ties():
  x = jnp.asarray(np.random.default_rng(0).integers(0, 5, (3, 1000)).astype(np.float32))
  for block in (7, 64, 2000):
    val, idx = br.two_stage_top_k(x, 9, block)
    want_val, want_idx = jax.lax.top_k(x, 9)
    np.testing.assert_array_equal(np.asarray(val), np.asarray(want_val))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))


def _bf16_queries(rq_bmf):
  return rq_bmf.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("persistent", [False, True])
def test_pallas_chunk_scores_interpret(seed, persistent):
  # 197 chunks: three full 64-chunk tiles plus a ragged tail; one example has no
  # routing token; M=70 > max_queries=64 forces two passes over the bank. Persistent: two
  # programs a pass, two tiles each (the second program repeats the last tile).
  rq, kr, doc_c, mask = _bank(seed, 3, 70, 4, 2, 64, [197], valid_tokens=[70, 5, 0])
  rq_bmf = rr.group_sum_queries(rq, 2)
  kr_cf = kr.reshape(kr.shape[0], -1).astype(jnp.bfloat16)
  bs = br.BlockSizes(chunks=64, features=64, stages=2, max_queries=64, persistent=persistent,
                     blocks=2)
  got = br.chunk_scores(rq_bmf, mask, kr_cf, implementation="pallas", block_sizes=bs)
  want = br.chunk_scores_reference(_bf16_queries(rq_bmf), mask, kr_cf)
  assert got.shape == (3, 197)
  np.testing.assert_allclose(np.asarray(got[:2]), np.asarray(want[:2]), atol=2e-6)
  assert np.all(np.asarray(got[2]) == -np.inf)


def test_pallas_route_top_k_interpret_docs_across_tiles():
  rng = np.random.default_rng(3)
  doc_lens = list(rng.integers(1, 70, 6))            # documents straddle 64-chunk tiles
  rq, kr, doc_c, mask = _bank(4, 2, 9, 4, 2, 32, doc_lens, pad_chunks=5, valid_tokens=[9, 3])
  rq_bmf = rr.group_sum_queries(rq, 2)
  kr_cf = kr.reshape(kr.shape[0], -1).astype(jnp.bfloat16)
  n, k = len(doc_lens) + 2, 4                         # two empty document slots
  top_s, sel = br.route_top_k(rq_bmf, mask, kr_cf, doc_c, n, k, implementation="pallas",
                              block_sizes=SMALL)
  want_s, want_sel = br.route_top_k_reference(_bf16_queries(rq_bmf), mask,
                                              kr_cf.astype(jnp.float32), doc_c, n, k)
  assert _chosen(sel) == _chosen(want_sel)
  np.testing.assert_allclose(np.asarray(top_s), np.asarray(want_s), atol=2e-6)
  doc_s, sel_full = br.route_documents(rq_bmf, mask, kr_cf, doc_c, n, k, implementation="pallas",
                                       block_sizes=SMALL)
  assert doc_s.shape == (2, n) and np.all(np.asarray(doc_s[:, -2:]) == -np.inf)
  assert _chosen(sel_full) == _chosen(want_sel)


def test_pallas_ties_and_fewer_docs_than_k_interpret():
  # Every chunk has the same key: all documents tie, so the lowest indices win.
  rq, kr, _, mask = _bank(5, 1, 3, 2, 1, 64, [1])
  kr_cf = jnp.tile(kr.reshape(1, -1), (130, 1)).astype(jnp.bfloat16)
  doc_c = jnp.asarray(np.arange(130) // 13, jnp.int32)      # 10 documents
  rq_bmf = rr.group_sum_queries(rq, 1)
  _, sel = br.route_top_k(rq_bmf, mask, kr_cf, doc_c, 10, 4, implementation="pallas",
                          block_sizes=SMALL)
  assert _chosen(sel) == [[0, 1, 2, 3]]
  top_s, sel = br.route_top_k(rq_bmf, mask, kr_cf[:26], doc_c[:26], 2, 4, implementation="pallas",
                              block_sizes=SMALL)
  np.testing.assert_array_equal(np.asarray(sel.valid_bk), [[True, True, False, False]])
  np.testing.assert_array_equal(np.asarray(sel.doc_idx_bk), [[0, 1, 0, 0]])
  assert np.isfinite(np.asarray(top_s[0, :2])).all() and np.all(np.asarray(top_s[0, 2:]) == -np.inf)


def test_auto_is_xla_on_cpu():
  if jax.default_backend() == "gpu":
    pytest.skip("auto picks pallas on a GPU")
  rq, kr, doc_c, mask = _bank(6, 1, 4, 2, 1, 64, [3, 4])
  rq_bmf = rr.group_sum_queries(rq, 1)
  got = br.route_documents(rq_bmf, mask, kr.reshape(7, -1), doc_c, 2, 1)
  want = rr.route_documents(rq_bmf, mask, kr.reshape(7, -1), doc_c, 2, 1)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


@pytest.mark.gpu
@pytest.mark.parametrize("c,m", [(50_000, 64), (33_333, 200), (4_101, 7)])
def test_gpu_route_top_k_compiled(c, m):
  rng = np.random.default_rng(c)
  doc_lens = []
  while sum(doc_lens) < c - 300:
    doc_lens.append(int(rng.integers(1, 300)))
  rq, kr, doc_c, mask = _bank(c, 2, m, 32, 8, 128, doc_lens, pad_chunks=c - sum(doc_lens),
                              valid_tokens=[m, max(1, m // 3)])
  rq_bmf = rr.group_sum_queries(rq, 8)
  kr_cf = kr.reshape(c, -1).astype(jnp.bfloat16)
  n = len(doc_lens)
  got = br.chunk_scores(rq_bmf, mask, kr_cf, implementation="pallas")
  want = br.chunk_scores_reference(_bf16_queries(rq_bmf), mask, kr_cf)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  # one program an SM streaming its tiles (BlockSizes.persistent): the same scores
  persistent = br.chunk_scores(rq_bmf, mask, kr_cf, implementation="pallas",
                               block_sizes=br.BlockSizes(persistent=True))
  np.testing.assert_array_equal(np.asarray(persistent), np.asarray(got))
  # 256-chunk tiles 2 deep (the bf16 tiling that batch 8 runs faster with): the same scores
  wide = br.chunk_scores(rq_bmf, mask, kr_cf, implementation="pallas",
                         block_sizes=br.BlockSizes(chunks=256, stages=2))
  np.testing.assert_array_equal(np.asarray(wide), np.asarray(got))
  top_s, sel = br.route_top_k(rq_bmf, mask, kr_cf, doc_c, n, 16, implementation="pallas")
  want_s, want_sel = br.route_top_k_reference(_bf16_queries(rq_bmf), mask,
                                              kr_cf.astype(jnp.float32), doc_c, n, 16)
  np.testing.assert_allclose(np.asarray(top_s), np.asarray(want_s), atol=1e-5)
  # Equal sets unless two documents are within rounding of each other.
  assert _chosen(sel) == _chosen(want_sel)
  # The row-max tail (run_top_k, no segment max over documents): same selection, scores.
  top_r, sel_r = br.route_top_k(rq_bmf, mask, kr_cf, doc_c, n, 16, implementation="pallas",
                                max_doc_chunks=max(doc_lens))
  np.testing.assert_array_equal(np.asarray(sel_r.doc_idx_bk), np.asarray(sel.doc_idx_bk))
  np.testing.assert_array_equal(np.asarray(top_r), np.asarray(top_s))
  # The fused kernel (document max and block top-k in the kernel): same selection, scores.
  top_f, sel_f = br.route_top_k(rq_bmf, mask, kr_cf, doc_c, n, 16, implementation="pallas",
                                block_sizes=br.BlockSizes(fused=True))
  np.testing.assert_array_equal(np.asarray(sel_f.doc_idx_bk), np.asarray(sel.doc_idx_bk))
  np.testing.assert_array_equal(np.asarray(sel_f.valid_bk), np.asarray(sel.valid_bk))
  np.testing.assert_allclose(np.asarray(top_f), np.asarray(top_s), atol=1e-6)


@pytest.mark.parametrize("final", ["top_k", "sort"])
def test_pruned_top_k_is_exact_with_ties(final):
  rng = np.random.default_rng(1)
  x = rng.integers(0, 6, (3, 1000)).astype(np.float32)
  x[1, 500:] = -np.inf                                # padding-like tail
  x = jnp.asarray(x)
  for row, k in ((7, 9), (64, 16), (2000, 5), (10, 300)):
    val, idx = br.pruned_top_k(x, k, row, final)
    want_val, want_idx = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(val), np.asarray(want_val))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))


@pytest.mark.parametrize("doc_lens,pad,k,blocks,m", [
    # documents across tiles and across blocks, one longer than a block (2 tiles)
    ([1, 2, 70, 3, 1, 1, 130, 5, 40, 1, 1, 1, 60], 5, 6, 2, 9),
    ([64, 64, 1, 63, 2], 0, 3, 3, 9),                         # cuts on tile edges, no tail
    ([3, 5], 60, 4, 2, 9),                                    # k > documents, padding tile
    ([20] * 14, 7, 5, 1, 70),           # one block of 4 tiles; M=70: two query groups
    ([2] * 70 + [1] * 60, 0, 17, 8, 9),  # many documents per tile, one tile per block
    ([3, 5, 9], 2, 4, 2, 9),             # fewer chunks than one tile: the XLA tail only
])
def test_fused_route_top_k_interpret(doc_lens, pad, k, blocks, m):
  rq, kr, doc_c, mask = _bank(7, 3, m, 4, 2, 32, doc_lens, pad_chunks=pad,
                              valid_tokens=[m, 3, 0])        # last example: no routing token
  rq_bmf = rr.group_sum_queries(rq, 2)
  kr_cf = kr.reshape(kr.shape[0], -1).astype(jnp.bfloat16)
  n = len(doc_lens) + 1                                       # one empty document slot
  bs = dataclasses.replace(FUSED, blocks=blocks, max_queries=64)
  top_s, sel = br.route_top_k(rq_bmf, mask, kr_cf, doc_c, n, k, implementation="pallas",
                              block_sizes=bs)
  want_s, want_sel = br.route_top_k_reference(_bf16_queries(rq_bmf), mask,
                                              kr_cf.astype(jnp.float32), doc_c, n, k)
  assert _chosen(sel) == _chosen(want_sel)
  assert _chosen(sel)[2] == []
  np.testing.assert_allclose(np.asarray(top_s), np.asarray(want_s), atol=2e-6)
  np.testing.assert_array_equal(np.asarray(sel.doc_idx_bk), np.asarray(want_sel.doc_idx_bk))


def test_fused_ties_across_tiles_interpret():
  # Every chunk has the same key: all 10 documents (13 chunks each, cut by the
  # 64-chunk tiles) tie, so the lowest indices win.
  rq, kr, _, mask = _bank(5, 1, 3, 2, 1, 64, [1])
  kr_cf = jnp.tile(kr.reshape(1, -1), (130, 1)).astype(jnp.bfloat16)
  doc_c = jnp.asarray(np.arange(130) // 13, jnp.int32)
  rq_bmf = rr.group_sum_queries(rq, 1)
  for k in (4, 12):
    _, sel = br.route_top_k(rq_bmf, mask, kr_cf, doc_c, 10, k, implementation="pallas",
                            block_sizes=FUSED)
    assert _chosen(sel) == [list(range(min(k, 10)))]


@pytest.mark.parametrize("dense", [True, False])
def test_merge_candidates_dedupes_and_is_exact(dense, monkeypatch):
  # Candidates repeat documents (cut by block boundaries) with partial maxima; ties
  # between distinct documents go to the lower id; -inf and -1 are empty entries.
  if not dense:
    monkeypatch.setattr(bt, "_DENSE_MERGE_MAX", 0)
  rng = np.random.default_rng(2)
  b, n, k = 3, 300, 9
  doc = rng.integers(-1, 60, (b, n))
  val = rng.integers(0, 8, (b, n)).astype(np.float32)
  val[rng.random((b, n)) < 0.1] = -np.inf
  val[2] = -np.inf
  got_val, got_doc = bt.merge_candidates(jnp.asarray(val), jnp.asarray(doc, jnp.int32), k)
  for bi in range(b):
    best = {}
    for v, d in zip(val[bi], doc[bi]):
      if d >= 0 and v > -np.inf:
        best[d] = max(best.get(d, -np.inf), v)
    want = sorted(best.items(), key=lambda e: (-e[1], e[0]))[:k]
    n_valid = len(want)
    np.testing.assert_array_equal(np.asarray(got_val[bi, :n_valid]), [v for _, v in want])
    np.testing.assert_array_equal(np.asarray(got_doc[bi, :n_valid]), [d for d, _ in want])
    assert np.all(np.asarray(got_val[bi, n_valid:]) == -np.inf)


def test_bank_layout_slots():
  with pytest.raises(ValueError, match=r"document\(s\) \[1\]"):
    bt.bank_layout(jnp.asarray([0, 1, 1, 2, 1], jnp.int32), 4)
  doc_c = jnp.asarray([0, 0, 1, 2, 2, 2, 3, -1, -1], jnp.int32)
  lay = bt.bank_layout(doc_c, 4)
  np.testing.assert_array_equal(np.asarray(lay.loc_tc),
                                [[0, 0, 1, 2], [0, 0, 1, -1], [-1, -1, -1, -1]])
  np.testing.assert_array_equal(np.asarray(lay.slot_doc_tc),
                                [[0, 1, 2, -1], [2, 3, -1, -1], [-1, -1, -1, -1]])


def test_bank_layout_turns_fused_on_and_must_match_tiles(monkeypatch):
  calls = []
  real = bt.route_top_k_blocks
  monkeypatch.setattr(bt, "route_top_k_blocks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
  rq, kr, doc_c, mask = _bank(8, 1, 5, 4, 2, 32, [30, 50, 9, 40], pad_chunks=3)
  rq_bmf = rr.group_sum_queries(rq, 2)
  kr_cf = kr.reshape(kr.shape[0], -1).astype(jnp.bfloat16)
  bs = br.BlockSizes(chunks=64, features=64, stages=2, block_docs=8, blocks=2)   # fused=None
  want_s, want_sel = br.route_top_k(rq_bmf, mask, kr_cf, doc_c, 4, 2, implementation="pallas",
                                    block_sizes=bs)                    # no layout: unfused
  assert not calls
  got_s, got_sel = br.route_top_k(rq_bmf, mask, kr_cf, doc_c, 4, 2, implementation="pallas",
                                  block_sizes=bs, layout=bt.bank_layout(doc_c, 64))
  assert calls                                                         # a layout: fused
  np.testing.assert_array_equal(np.asarray(got_sel.doc_idx_bk), np.asarray(want_sel.doc_idx_bk))
  np.testing.assert_allclose(np.asarray(got_s), np.asarray(want_s), atol=1e-6)
  with pytest.raises(ValueError, match="bank_layout"):
    br.route_top_k(rq_bmf, mask, kr_cf, doc_c, 4, 2, implementation="pallas", block_sizes=bs,
                   layout=bt.bank_layout(doc_c, 128))


def test_programs_per_sm_split_blocks_and_shared_memory():
  from pallas_kernels import block_top_k as bt
  # off a GPU: 8 blocks whatever the SM share; an explicit count is kept
  assert bt.num_blocks_for(100, 0, 2) == (8, 13)
  assert bt.num_blocks_for(100, 5, 3) == (5, 20)
  with pytest.raises(ValueError, match="programs_per_sm"):
    bt.num_blocks_for(100, 0, 0)
  # two programs on one SM each get half its shared memory: a shallower pipeline
  one = bt.stages_that_fit(128, 128, 64, 8, itemsize=1)
  two = bt.stages_that_fit(128, 128, 64, 8, itemsize=1, programs_per_sm=2)
  per_stage = 128 * (128 + 64) + 8 * 128 + 4 * (128 + 64)
  assert one == 8 and two == (bt._SMEM_LIMIT // 2 - 4 * 128 - 12 * (64 + 128)) // per_stage == 4


def test_engine_block_sizes_by_key_dtype():
  from msa_jax.inference.bank_routing import engine_block_sizes
  # the default (since 2026-12-04): the unfused route, tiles by key dtype
  got = {d: engine_block_sizes(1024, d) for d in ("bfloat16", "float8_e4m3fn", "int8")}
  assert {d: (b.features, b.chunks, b.stages, b.fused, b.programs_per_sm)
          for d, b in got.items()} == {
      "bfloat16": (128, 256, 2, False, 1), "float8_e4m3fn": (128, 128, 2, False, 1),
      "int8": (128, 256, 2, False, 1)}
  # the fused kernel: two programs per SM, 256-feature steps for int8
  got = {d: engine_block_sizes(1024, d, fused=True) for d in ("bfloat16", "float8_e4m3fn", "int8")}
  assert {d: (b.features, b.programs_per_sm, b.chunks, b.fused) for d, b in got.items()} == {
      "bfloat16": (128, 2, 128, True), "float8_e4m3fn": (128, 2, 128, True),
      "int8": (256, 2, 128, True)}
  assert engine_block_sizes(192, "int8", fused=True).features == 64
  assert engine_block_sizes(1024, "int8", chunks=64).chunks == 64     # overrides win
  # fp8: one e4m3 query term unfused (2026-12-05), two in the fused kernel; overrides win
  assert [engine_block_sizes(1024, "float8_e4m3fn", **kw).fp8_query_terms
          for kw in ({}, {"fused": True}, {"fp8_query_terms": 2})] == [1, 2, 2]


@pytest.mark.parametrize("m,tile", [(1, 256), (64, 256), (65, 128), (128, 128), (129, 64),
                                    (256, 64)])
def test_bf16_plan_keeps_the_accumulator_in_registers(m, tile):
  """The engine's bf16 tiles (256 chunks) shrink as query columns grow, so the
  ``[tile, cols]`` float32 accumulator stays within 128 registers a thread (128 x 128), and
  the pipeline stays within shared memory."""
  from msa_jax.inference.bank_routing import engine_block_sizes
  bs, groups, cols = br._plan(m, 1024, engine_block_sizes(1024, "bfloat16"))
  assert bs.chunks == tile and bs.chunks * cols <= 128 * 128
  assert bs.stages * 2 * bs.features * (bs.chunks + cols) <= br._SMEM_BUDGET


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("key_dtype", ["bfloat16", "int8", "float8_e4m3fn"])
def test_chunk_score_kernels_lower_for_the_gpu(key_dtype, persistent):
  """The per-tile and the persistent (``BlockSizes(persistent=True)``) chunk-score kernels
  compiled at the engine's 100M-token tilings (bf16 and int8 256 × 128 tiles 2 deep, fp8
  128 × 128 2 deep; 1,024 features; 132 persistent programs): Mosaic GPU's static
  checks of the copies and register layouts pass (lowering runs on a CPU; the GPU test and
  timing are issue11_gpu.sh's route stage)."""
  from msa_jax.inference.bank_routing import engine_block_sizes
  bs = dataclasses.replace(engine_block_sizes(1024, key_dtype), persistent=persistent,
                           blocks=132)
  c, f = 1000 * bs.chunks, 1024
  sds = jax.ShapeDtypeStruct
  scale = None if key_dtype == "bfloat16" else sds((c,), jnp.float32)
  fn = jax.jit(functools.partial(br.chunk_scores, implementation="pallas", block_sizes=bs,
                                 interpret=False))
  text = fn.trace(sds((1, 64, f), jnp.float32), sds((1, 64), bool), sds((c, f), key_dtype),
                  kr_scale_c=scale).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
