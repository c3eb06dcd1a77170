"""The routing tail that ranks documents from chunk scores without a segment max over the
bank (``block_routing.run_top_k``): exact against a float64 numpy reference (ties to the
lower document, padding, empty examples, documents longer than a row), the row budget
shown to be needed, and the unfused Pallas route (interpret mode on CPU) giving the same
documents with and without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import routing as rr
from msa_jax.inference import bank_routing, quantize
from pallas_kernels import block_routing as br


def _reference(s_bc, run_c, k):
  """float64 numpy: max over each run, then the k best (score desc, run's first chunk asc)."""
  s_bc = np.asarray(s_bc, np.float64)
  out_v, out_id = [], []
  for s in s_bc:
    best = {}
    for pos, (v, r) in enumerate(zip(s, run_c)):
      if r < 0:
        continue
      first, top = best.get(r, (pos, -np.inf))
      best[r] = (first, max(top, v))
    ranked = sorted(((-top, first, r) for r, (first, top) in best.items() if top > -np.inf))
    out_v.append([-t for t, _, _ in ranked[:k]])
    out_id.append([r for _, _, r in ranked[:k]])
  return out_v, out_id


def _bank(rng, lens, pad_after=(), pad_end=0):
  """Runs of ``lens`` chunks labelled 0, 1, …; a padding chunk after each run in
  ``pad_after`` and ``pad_end`` at the end."""
  doc = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lens)])
  doc = np.insert(doc, [int(np.sum(lens[:i + 1])) for i in pad_after], -1)
  return np.concatenate([doc, np.full(pad_end, -1, np.int32)])


_run_top_k_jit = jax.jit(br.run_top_k, static_argnums=(2, 3, 4))


def _check(s_bc, run_c, k, row, max_run):
  val, ids = _run_top_k_jit(jnp.asarray(s_bc, jnp.float32), jnp.asarray(run_c), k, row, max_run)
  val, ids = np.asarray(val), np.asarray(ids)
  want_v, want_id = _reference(np.asarray(s_bc, np.float32), run_c, k)
  for b in range(len(want_v)):
    n = len(want_v[b])
    np.testing.assert_array_equal(ids[b, :n], want_id[b])
    np.testing.assert_array_equal(val[b, :n], np.asarray(want_v[b], np.float32))
    assert np.all(val[b, n:] == -np.inf)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("row", [4, 8, 128])
def test_run_top_k_equals_the_segment_max_reference(seed, row):
  rng = np.random.default_rng(seed)
  lens = rng.integers(1, 30, size=60)                      # runs up to 3+ rows of 8
  run_c = _bank(rng, lens, pad_after=(5, 37), pad_end=11)
  s_bc = rng.normal(size=(3, run_c.size)).astype(np.float32)
  s_bc[1] = np.round(s_bc[1] * 2) / 2                      # many exact ties
  s_bc[2] = -np.inf                                         # an example with no routing token
  for k in (1, 5, 16):
    _check(s_bc, run_c, k, row, int(lens.max()))     # plain-max path for row 4 / 8
    if lens.max() <= row + 1:
      continue
    short = np.minimum(lens, row + 1)                # runs of ≤ row + 1: start-row path
    run_s = _bank(rng, short, pad_after=(5, 37), pad_end=11)
    _check(s_bc[:, :run_s.size], run_s, k, row, int(short.max()))


def test_run_top_k_fewer_runs_than_k():
  run_c = _bank(None, [3, 1, 2], pad_end=5)
  s_bc = np.array([[0.5, 0.1, 0.2, 0.9, 0.3, 0.3, 7, 7, 7, 7, 7]], np.float32)
  _check(s_bc, run_c, 8, 4, 3)                                # padding's 7s never win


def test_run_top_k_when_one_winner_holds_the_largest_row_maxima():
  """Winner A fills two rows with its two chunks (9.0, 8.9), so the k = 2 rows with the
  largest maxima are both A's and B (8.0, third row) is not in them: taking the top-k rows
  by their plain max would miss it (checked here, so the case is a real trap). Both paths
  get it right: runs credited to the row they start in (runs of ≤ row + 1 chunks), and
  k · rows_per_run rows by plain max (longer runs)."""
  #                 row 0         | row 1           | row 2          | row 3
  run_c = np.array([0, 0, 0, 1,     1, 2, 2, 2,       3, 3, 3, 3,      4, 4, 4, 4], np.int32)
  s = np.array([[0.1, 0.1, 0.1, 9.0, 8.9, 0.2, 0.2, 0.2, 8.0, 0.3, 0.3, 0.3, 7.0, 0, 0, 0]],
               np.float32)
  naive_rows = np.argsort(-s.reshape(4, 4).max(1), kind="stable")[:2]
  assert set(run_c.reshape(4, 4)[naive_rows].ravel()) == {0, 1, 2}   # B (3) missed
  for max_run in (2, 4, 6):               # start-row path (≤ 5), plain-max path (6)
    _check(s, run_c, 2, 4, max_run)


def _route_case(seed, max_len, num_docs, pad_end, second_valid, dtype, f=64, m=6):
  """A small bank for the interpret-mode routes: runs of 1..max_len-1 chunks and padding at
  the end, unit-norm keys as ``dtype`` (codes with per-chunk scales for 8-bit), two
  examples of ``m`` routing tokens (the second with ``second_valid`` valid).
  Returns ``(lens, doc, kr float32, rq, mask, keys, scale or None)``."""
  rng = np.random.default_rng(seed)
  lens = [int(x) for x in rng.integers(1, max_len, size=num_docs)]
  doc = _bank(rng, lens, pad_end=pad_end)
  kr = rng.normal(size=(doc.size, f)).astype(np.float32)
  kr /= np.linalg.norm(kr, axis=1, keepdims=True)
  rq = jnp.asarray(rng.normal(size=(2, m, f)).astype(np.float32))
  mask = jnp.asarray(np.arange(m)[None] < np.array([[m], [second_valid]]))
  if dtype == "bfloat16":
    return lens, doc, kr, rq, mask, jnp.asarray(kr, jnp.bfloat16), None
  codes, sc = quantize.quantise(kr, dtype, 1)
  return lens, doc, kr, rq, mask, jnp.asarray(codes), jnp.asarray(sc)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "float8_e4m3fn"])
def test_unfused_route_with_the_run_tail_interpret(dtype):
  """The unfused Pallas route (interpret mode) with ``max_doc_chunks`` chooses the documents
  of the segment-max tail, the same as the float32 reference for bf16 keys, with the
  same scores; through ``route_top_k`` and through the engine's ``local_top_k``."""
  lens, doc, kr, rq, mask, keys, scale = _route_case(3, 20, 40, 9, 3, dtype)
  bs = br.BlockSizes(fused=False, chunks=64, features=64, stages=2)
  kw = dict(implementation="pallas", block_sizes=bs, kr_scale_c=scale)
  n, k = len(lens), 8
  s_old, sel_old = br.route_top_k(rq, mask, keys, jnp.asarray(doc), n, k, **kw)
  s_new, sel_new = br.route_top_k(rq, mask, keys, jnp.asarray(doc), n, k,
                                  max_doc_chunks=max(lens), **kw)
  np.testing.assert_array_equal(np.asarray(sel_new.doc_idx_bk), np.asarray(sel_old.doc_idx_bk))
  np.testing.assert_array_equal(np.asarray(sel_new.valid_bk), np.asarray(sel_old.valid_bk))
  np.testing.assert_array_equal(np.asarray(s_new), np.asarray(s_old))
  if dtype == "bfloat16":
    _, sel_ref = rr.route_documents(rq, mask, jnp.asarray(kr, jnp.bfloat16).astype(jnp.float32),
                                    jnp.asarray(doc), n, k)
    np.testing.assert_array_equal(np.asarray(sel_new.doc_idx_bk), np.asarray(sel_ref.doc_idx_bk))
  args = (rq, mask, keys, jnp.asarray(doc), k)
  e_old = bank_routing.local_top_k(*args, implementation="pallas", kr_scale_c=scale,
                                   block_sizes=bs)
  e_new = bank_routing.local_top_k(*args, implementation="pallas", kr_scale_c=scale,
                                   block_sizes=bs, max_doc_chunks=max(lens))
  for a, b in zip(e_old, e_new):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", ["rank", "sort"])
@pytest.mark.parametrize("n,k,row", [(15625, 16, 128), (4096, 16, 128), (300, 7, 8),
                                      (100, 16, 8), (5, 16, 4), (2000, 40, 16)])
def test_tree_top_k_equals_lax_top_k_ties_included(n, k, row, method):
  import jax
  rng = np.random.default_rng(n)
  x = np.round(rng.normal(size=(3, n)) * 4) / 4            # many ties
  x[1, n // 2:] = -np.inf                                   # fewer finite entries than rows
  x[2] = -np.inf
  x = jnp.asarray(x, jnp.float32)
  val, idx = jax.jit(br.tree_top_k, static_argnums=(1, 2), static_argnames="method")(
      x, k, row, method=method)
  want_v, want_i = jax.lax.top_k(x, min(k, n))
  np.testing.assert_array_equal(np.asarray(val), np.asarray(want_v))
  finite = np.isfinite(np.asarray(want_v))
  np.testing.assert_array_equal(np.asarray(idx)[finite], np.asarray(want_i)[finite])
  assert np.asarray(idx).max() < n


def test_rank_select_is_a_sorts_prefix():
  """``rank_select`` against numpy's lexicographic sort by (value, key, position): ties in
  value, ties in value and key (position decides), ``+inf`` padding, batched rows."""
  from pallas_kernels import route_tail
  rng = np.random.default_rng(7)
  neg = np.round(rng.normal(size=(2, 3, 40)) * 2) / 2
  neg[0, 1, 25:] = np.inf
  key = rng.integers(0, 6, size=neg.shape).astype(np.int32)   # keys repeat
  for kk in (1, 5, 40):
    got_n, got_k = route_tail.rank_select(jnp.asarray(neg, jnp.float32), jnp.asarray(key), kk)
    pos = np.broadcast_to(np.arange(40), neg.shape)
    order = np.lexsort((pos, key, neg), axis=-1)[..., :kk]
    np.testing.assert_array_equal(np.asarray(got_n), np.take_along_axis(neg, order, -1))
    np.testing.assert_array_equal(np.asarray(got_k), np.take_along_axis(key, order, -1))
  with pytest.raises(ValueError, match="method 'heap'"):
    br.tree_top_k(jnp.zeros((1, 8)), 2, method="heap")


@pytest.mark.parametrize("max_run,tree_row", [(3, 8), (3, 128), (40, 16)])
def test_run_top_k_rank_and_sort_trees_agree(max_run, tree_row):
  """``run_top_k``'s two tree methods and tree rows give the same ranked list, run keys
  included (both paths: runs credited to their start row, and the plain-max rows)."""
  rng = np.random.default_rng(max_run)
  lens = rng.integers(1, max_run + 1, size=400)
  run_c = jnp.asarray(_bank(rng, lens, pad_after=(9,), pad_end=13))
  s = jnp.asarray(np.round(rng.normal(size=(2, run_c.size)) * 3) / 3, jnp.float32)
  run_key = jnp.asarray(rng.permutation(run_c.size).astype(np.int32))
  import jax
  fn = jax.jit(br.run_top_k, static_argnums=(2, 3, 4), static_argnames=("method", "tree_row"))
  outs = [fn(s, run_c, 12, 16, max_run, run_key_r=run_key, method=m, tree_row=r)
          for m, r in (("sort", 128), ("rank", tree_row))]
  for a, b in zip(*outs):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_codes_mark_padding_and_row_heads():
  """``run_codes``: 0 padding (negative label or not valid), 2 a chunk continuing the run the
  previous row ends with (rows of 4 here), 1 otherwise."""
  from pallas_kernels import route_tail
  #                 row 0       | row 1       | row 2
  run_c = np.array([0, 1, 1, 1,   1, 2, 2, 3,   3, -1, 4, 4], np.int32)
  valid = np.array([1, 1, 1, 1,   1, 1, 1, 1,   1, 1, 1, 0], bool)
  got = route_tail.run_codes(jnp.asarray(run_c), 4, jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(got), [1, 1, 1, 1, 2, 1, 1, 1, 2, 0, 1, 0])
  assert got.dtype == jnp.int8


@pytest.mark.parametrize("max_run", [3, 40])
def test_run_top_k_with_codes_equals_masking_the_scores(max_run):
  """``run_top_k(codes_c=run_codes(...))`` (the engine's, codes built with the bank) gives the
  list of the same tail on scores masked to ``-inf`` wherever a chunk is not valid (the
  engine's padding chunks: a run of their own, document -1); both tail paths, run keys."""
  rng = np.random.default_rng(max_run + 1)
  lens = rng.integers(1, max_run + 1, size=300)
  run_c = _bank(rng, lens, pad_after=(4, 50), pad_end=9)
  valid = run_c >= 0
  run_c = np.where(valid, run_c, 10_000 + np.arange(run_c.size)).astype(np.int32)  # own runs
  s = jnp.asarray(np.round(rng.normal(size=(2, run_c.size)) * 3) / 3, jnp.float32)
  s = s.at[:, :5].set(9.0)          # padding would win if it were not masked
  valid = valid.copy()
  valid[:5] = False
  key = jnp.asarray(rng.permutation(20_000).astype(np.int32))
  codes = br.run_codes(jnp.asarray(run_c), 16, jnp.asarray(valid))
  fn = jax.jit(br.run_top_k, static_argnums=(2, 3, 4))
  got = fn(s, jnp.asarray(run_c), 10, 16, max_run, run_key_r=key, codes_c=codes)
  want = fn(jnp.where(jnp.asarray(valid)[None], s, -jnp.inf), jnp.asarray(run_c), 10, 16,
            max_run, run_key_r=key)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.all(np.asarray(got[0]) < 9.0)


def test_memory_parallel_unfused_route_with_the_run_tail(monkeypatch):
  """The engine's default Pallas route over a bank sharded on a 2-device ``memory`` axis
  (each shard whole documents, padded at its end; chunk runs built once per shard by
  ``sharded_layouts``): the same documents and scores as the tiled XLA scan with the same
  bf16 query rounding, and as the unsharded route. The chunk scores come from their XLA
  formulation (bf16 operands, as the kernel's): the kernel in interpret mode inside a
  2-device ``shard_map`` hung the CPU suite (2026-12-04); the kernel itself is tested
  above and compiled on the GPU; what is tested here is the tail under memory parallel."""
  import jax
  from jax.sharding import Mesh
  real = br.chunk_scores
  monkeypatch.setattr(br, "chunk_scores", lambda *a, **kw: real(*a, **{
      **kw, "implementation": "xla", "block_sizes": None}))
  rng = np.random.default_rng(5)
  f, shard_rows, k = 64, 192, 6
  docs, rows, d = [], [], 0
  for _ in range(2):                                       # per shard: documents, then padding
    lens = []
    while sum(lens) < shard_rows - 40:
      lens.append(int(rng.integers(1, 20)))
    shard = np.concatenate([np.full(n, d + i, np.int32) for i, n in enumerate(lens)])
    d += len(lens)
    docs.append(np.concatenate([shard, np.full(shard_rows - shard.size, -1, np.int32)]))
    rows.append(max(lens))
  doc = np.concatenate(docs)
  kr = rng.normal(size=(doc.size, f)).astype(np.float32)
  kr /= np.linalg.norm(kr, axis=1, keepdims=True)
  kr = jnp.asarray(kr, jnp.bfloat16)
  rq = jnp.asarray(rng.normal(size=(2, 5, f)).astype(np.float32))
  mask = jnp.asarray(np.arange(5)[None] < np.array([[5], [2]]))
  mesh = Mesh(np.array(jax.devices()[:2]), ("memory",))
  bs = br.BlockSizes(fused=False, chunks=64, features=64, stages=2)
  layouts = bank_routing.sharded_layouts(mesh, jnp.asarray(doc))
  s2, d2 = bank_routing.sharded_top_k(mesh, rq, mask, kr, jnp.asarray(doc), k,
                                      implementation="pallas", block_sizes=bs, layouts=layouts,
                                      max_doc_chunks=max(rows))
  s1, d1 = bank_routing.tiled_top_k(rq, mask, kr, jnp.asarray(doc), k, score_dtype="bfloat16")
  np.testing.assert_array_equal(np.asarray(d2), np.asarray(d1))
  np.testing.assert_allclose(np.asarray(s2), np.asarray(s1), rtol=1e-5, atol=1e-6)
  s0, d0 = bank_routing.local_top_k(rq, mask, kr, jnp.asarray(doc), k, implementation="pallas",
                                    block_sizes=bs, max_doc_chunks=max(rows))
  np.testing.assert_array_equal(np.asarray(d0), np.asarray(d1))


def test_routing_tail_benchmark_tails_agree_on_cpu():
  """``benchmarks.routing_tail`` at a CPU size: every tail picks the same documents."""
  from benchmarks import routing_tail
  for doc_chunks in (2, 16):
    row = routing_tail.bench(64 * 1500, doc_chunks, 2, profile=False)   # 750 rows of 128
    assert all(row[f"{n}_same_documents"] for n in (
        "segmax_sorted", "segmax", "runs", "runs_codes", "runs_sort", "runs_rank1k",
        "runs_rank4k", "runs_plain"))
    assert row["runs_ms"] > 0


def test_routing_tail_scores_spec_parses_tilings():
  from benchmarks.routing_tail import parse_scores_spec
  assert parse_scores_spec("int8") == ("int8", {})
  assert parse_scores_spec("int8@256x128x2") == ("int8", {"chunks": 256, "features": 128,
                                                          "stages": 2})
  assert parse_scores_spec("float8_e4m3fn@128x256x2x1")[1]["fp8_query_terms"] == 1


@pytest.mark.parametrize("dtype,score_dtype", [("int8", "kernel"), ("float8_e4m3fn", "kernel"),
                                               ("float8_e4m3fn", "kernel_fp8q1"),
                                               ("bfloat16", "kernel")])
def test_xla_scan_with_kernel_numerics_equals_the_pallas_route_interpret(dtype, score_dtype):
  """``score_dtype="kernel"`` makes the XLA scan score as the GPU kernels do (queries
  quantised per token to the codes' dtype; fp8 as one or two e4m3 terms): the same
  documents and scores as the unfused Pallas route (interpret mode), and not the float32
  scan's scores (so the option is not ignored)."""
  lens, doc, _, rq, mask, keys, scale = _route_case(5, 12, 50, 7, 4, dtype)
  doc, k = jnp.asarray(doc), 8
  terms = 1 if score_dtype == "kernel_fp8q1" else 2
  bs = br.BlockSizes(fused=False, chunks=64, features=64, stages=2, fp8_query_terms=terms)
  got_s, got_d = bank_routing.tiled_top_k(rq, mask, keys, doc, k, tile=64, kr_scale_c=scale,
                                          score_dtype=score_dtype)
  want_s, want_d = bank_routing.local_top_k(rq, mask, keys, doc, k, implementation="pallas",
                                            kr_scale_c=scale, block_sizes=bs,
                                            max_doc_chunks=max(lens))
  np.testing.assert_array_equal(np.asarray(got_d), np.asarray(want_d))
  np.testing.assert_allclose(np.asarray(got_s), np.asarray(want_s), rtol=1e-6, atol=1e-6)
  f32_s, _ = bank_routing.tiled_top_k(rq, mask, keys, doc, k, tile=64, kr_scale_c=scale)
  assert np.max(np.abs(np.asarray(f32_s) - np.asarray(got_s))) > 1e-5


def test_own_and_head_maxima_in_one_reduce():
  """The run tail's first pass: each row's max over its own runs and over its head (the
  previous row's last run) equal the two masked maxima, and come from ONE reduce over the
  scores (a variadic reduce: the two plain ``.max`` reduces were two kernels on the GPU,
  each reading every chunk score)."""
  from pallas_kernels import route_tail
  rng = np.random.default_rng(7)
  x = rng.normal(size=(3, 40, 16)).astype(np.float32)
  x[1, 5] = -np.inf                                   # a padding row
  cont = rng.random((40, 16)) < 0.3
  own, head = route_tail._own_and_head_maxima(jnp.asarray(x), jnp.asarray(cont))
  np.testing.assert_array_equal(np.asarray(own), np.where(cont[None], -np.inf, x).max(axis=2))
  np.testing.assert_array_equal(np.asarray(head), np.where(cont[None], x, -np.inf).max(axis=2))
  hlo = jax.jit(route_tail._own_and_head_maxima).lower(jnp.asarray(x), jnp.asarray(cont)).as_text()
  assert hlo.count("stablehlo.reduce") == 1


@pytest.mark.parametrize("max_run", [1, 2, 5, 8])
def test_window_run_max_by_shifts_equals_the_masked_max(max_run):
  """Runs of at most ``SHIFT_MAX_RUN`` chunks take their max from shifted copies (fusable,
  no ``L²`` reduce): at every run's first entry it equals the masked max over the window."""
  from pallas_kernels import route_tail
  rng = np.random.default_rng(max_run)
  ids = []
  for _ in range(2 * 3):                              # windows of 40 entries, runs of 1..max_run
    row, label = [], 0
    while len(row) < 40:
      n = int(rng.integers(1, max_run + 1))
      row += [label if rng.random() > 0.2 else -1] * n
      label += 1
    ids.append(row[:40])
  win_id = jnp.asarray(np.array(ids, np.int32).reshape(2, 3, 40))
  s = jnp.asarray(np.round(rng.normal(size=(2, 3, 40)) * 2) / 2, jnp.float32)
  s = jnp.where(win_id >= 0, s, -jnp.inf)
  got = np.asarray(route_tail._window_run_max(s, win_id, max_run))
  want = np.asarray(route_tail._window_run_max(s, win_id, route_tail.SHIFT_MAX_RUN + 1))
  wid = np.asarray(win_id)
  first = np.concatenate([np.ones((2, 3, 1), bool), wid[:, :, 1:] != wid[:, :, :-1]], axis=2)
  np.testing.assert_array_equal(got[first & (wid >= 0)], want[first & (wid >= 0)])
