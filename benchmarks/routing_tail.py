"""The unfused route's tail alone: from chunk scores ``[B, C]`` to the top-k documents.

At 100M tokens the chunk-score kernel reads K̄R at ~1.02× its read floor; what the unfused
route adds is this tail. It times, on random float32 chunk scores (the tail's cost does not
depend on their values) and a contiguous chunk→document map:
  * ``read``: one pass over the ``[B, C]`` scores (a sum): the tail's own floor;
  * ``segmax_sorted``: segment max over the documents with sorted indices, then the
    pruned top-k (the engine's unfused tail before 2026-12-04);
  * ``segmax``: the same with an unsorted segment max (``benchmarks.routing``'s tail);
  * ``runs``: ``block_routing.run_top_k`` as the engine runs it (runs credited to the row
    they start in when documents span at most two rows of 128 chunks; each top-k a tree of
    rank-and-select levels over 128-entry rows);
  * ``runs_codes``: ``runs`` reading the map's chunk codes (``run_codes``, one byte a chunk)
    instead of its labels in the first pass, as the engine does;
  * ``runs_sort``: the same with two-key sorts as the tree's levels (the engine's tail
    before 2026-12-04T21Z); ``runs_rank1k`` / ``runs_rank4k``: rank levels over 1,024- /
    4,096-entry rows (fewer levels, more compares);
  * ``runs_plain``: ``run_top_k``'s path for longer documents (the ``k · rows_per_run``
    rows with the largest maxima), forced;
each beside its per-kernel device times (profiler) for ``runs``. Every tail must choose the
same documents (checked). Prints a table, writes ``routing_tail.json`` to ``$OUT`` (or
benchmarks/results).

  python -m benchmarks.routing_tail                  # 100M tokens: 2M chunks of 2-chunk docs
  python -m benchmarks.routing_tail --tokens 1e8 --doc_chunks 2 \
      --scores_profile bfloat16,int8,float8_e4m3fn    # + the chunk-score step per key dtype
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_name, gpu_kernel_times, out_dir, time_ms, write_json
from pallas_kernels import block_routing as br

K_DOCS, ROW = 16, 128


def tails(num_docs: int, doc_chunks: int, codes_c):
  """name → jitted ``(scores_bc, chunk_doc_c) → (values, docs)``; ``codes_c`` the map's
  ``run_codes`` (a bank builds them once; passed to ``runs_codes`` as an argument)."""
  bs = br.BlockSizes(top_k="pruned_sort", block_docs=ROW)
  with_codes = jax.jit(lambda s, d, c: br.run_top_k(s, d, K_DOCS, ROW, doc_chunks, codes_c=c))

  def segmax(sorted_docs):
    def fn(s, d):
      doc_s = br.document_scores(s, d, num_docs, sorted_docs)
      return br.document_top_k(doc_s, K_DOCS, bs)
    return jax.jit(fn)

  return {
      "read": jax.jit(lambda s, d: jnp.sum(s, axis=1)),
      "segmax_sorted": segmax(True),
      "segmax": segmax(False),
      "runs": jax.jit(lambda s, d: br.run_top_k(s, d, K_DOCS, ROW, doc_chunks)),
      "runs_codes": lambda s, d: with_codes(s, d, codes_c),
      "runs_sort": jax.jit(lambda s, d: br.run_top_k(s, d, K_DOCS, ROW, doc_chunks,
                                                     method="sort")),
      "runs_rank1k": jax.jit(lambda s, d: br.run_top_k(s, d, K_DOCS, ROW, doc_chunks,
                                                       tree_row=1024)),
      "runs_rank4k": jax.jit(lambda s, d: br.run_top_k(s, d, K_DOCS, ROW, doc_chunks,
                                                       tree_row=4096)),
      "runs_plain": jax.jit(lambda s, d: br.run_top_k(s, d, K_DOCS, ROW,
                                                      max(doc_chunks, ROW + 2))),
  }


def bench(tokens: int, doc_chunks: int, batch: int, profile: bool) -> dict:
  chunks = tokens // 64
  num_docs = -(-chunks // doc_chunks)
  doc = jnp.asarray(np.arange(chunks, dtype=np.int32) // doc_chunks)
  s = jax.random.normal(jax.random.key(0), (batch, chunks), jnp.float32)
  row = {"tokens": tokens, "chunks": chunks, "doc_chunks": doc_chunks, "batch": batch,
         "score_bytes": 4 * batch * chunks}
  fns = tails(num_docs, doc_chunks, br.run_codes(doc, ROW))
  want = None
  for name, fn in fns.items():
    # (off the GPU the kernel tail runs interpreted: one timed call, as a correctness check)
    few = name.endswith("_kernel") and jax.default_backend() != "gpu"
    row[f"{name}_ms"] = time_ms(fn, s, doc, **(dict(warmup=0, iters=1, reps=1) if few else {}))
    if name != "read":
      v, d = fn(s, doc)
      got = (np.asarray(v), np.asarray(d))
      want = got if want is None else want
      row[f"{name}_same_documents"] = bool(np.array_equal(got[1], want[1]))
  if profile:
    for name in fns:
      if name.startswith("runs"):
        ker = gpu_kernel_times(fns[name], s, doc)
        row[f"{name}_device_us"] = sum(t for _, t in ker)
        row[f"{name}_kernel_count"] = len(ker)
        row[f"{name}_kernels_us"] = ker
  return row


def top16_primitives(n: int, batch: int = 1) -> dict:
  """ms (wall, one jitted call) and device µs (profiler, sum of kernels) of ways to take the
  16 largest of ``[batch, n]`` float32 (indices too)."""
  x = jax.random.normal(jax.random.key(1), (batch, n), jnp.float32)
  iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))

  def by_sort(x):
    neg, idx = jax.lax.sort((-x, iota), dimension=1, num_keys=1)
    return -neg[:, :16], idx[:, :16]

  def by_argmax(x):
    vals, idxs = [], []
    for _ in range(16):
      i = jnp.argmax(x, axis=1)
      vals.append(jnp.take_along_axis(x, i[:, None], axis=1))
      idxs.append(i[:, None])
      x = x.at[jnp.arange(x.shape[0]), i].set(-jnp.inf)
    return jnp.concatenate(vals, 1), jnp.concatenate(idxs, 1)

  fns = {"top_k": lambda x: jax.lax.top_k(x, 16), "sort": by_sort, "argmax16": by_argmax,
         "two_stage128": lambda x: br.two_stage_top_k(x, 16, 128),
         "pruned_sort128": lambda x: br.pruned_top_k(x, 16, 128, "sort")}
  out = {"n": n, "batch": batch}
  want = None
  for name, fn in fns.items():
    f = jax.jit(fn)
    out[f"{name}_ms"] = time_ms(f, x)      # host-dispatch bound at these sizes
    if jax.default_backend() == "gpu":     # device time: what it costs inside a route
      ker = gpu_kernel_times(f, x)
      out[f"{name}_device_us"] = sum(t for _, t in ker)
      out[f"{name}_kernels_us"] = ker[:4]
    got = np.asarray(f(x)[1])
    want = got if want is None else want
    out[f"{name}_same"] = bool(np.array_equal(got, want))
  return out


def parse_scores_spec(spec: str) -> tuple[str, dict]:
  """``dtype[@chunks x features x stages[x terms]]`` → (dtype, BlockSizes overrides), e.g.
  ``int8@128x128x4`` or ``float8_e4m3fn@64x128x2x1`` (one fp8 query term)."""
  dtype, _, tiling = spec.partition("@")
  if not tiling:
    return dtype, {}
  vals = [int(v) for v in tiling.split("x")]
  names = ("chunks", "features", "stages", "fp8_query_terms")[:len(vals)]
  return dtype, dict(zip(names, vals))


def _route_shape(tokens: int):
  """``(F, C, queries [1, 64, F], mask)`` of one Qwen3-4B router layer at ``tokens`` memory
  tokens: whole 256-chunk tiles, as a bank (else TMA's row padding copies K̄R each call)."""
  f = 1024
  rq = jax.random.normal(jax.random.key(3), (1, 64, f), jnp.float32)
  return f, tokens // 64 // 256 * 256, rq, jnp.ones((1, 64), bool)


def chunk_scores_profile(tokens: int, spec: str, bw_gbs: float) -> dict:
  """The engine's chunk-score step alone (kernel + glue: query quantisation, scales, the
  max over query groups) for keys of the dtype in ``spec`` at ``tokens`` memory tokens
  (P 64, F 1024, 64 query tokens, batch 1, the engine's block sizes with ``spec``'s
  overrides, :func:`parse_scores_spec`), against its read floor; with each kernel's device
  time. GPU only (the Mosaic GPU kernels)."""
  from msa_jax.inference.bank_routing import engine_block_sizes
  key_dtype, overrides = parse_scores_spec(spec)
  f, c, rq, mask = _route_shape(tokens)
  key = jax.random.key(2)
  if key_dtype == "int8":
    kr = jax.random.randint(key, (c, f), -127, 128, jnp.int32).astype(jnp.int8)
  else:
    kr = (jax.random.normal(key, (c, f), jnp.float32) * 100).astype(key_dtype)
  scale = None if key_dtype == "bfloat16" else jnp.full((c,), 1e-3, jnp.float32)
  bs = engine_block_sizes(f, key_dtype, **overrides)
  fn = jax.jit(lambda q, m, k, sc: br.chunk_scores(q, m, k, implementation="pallas",
                                                   block_sizes=bs, kr_scale_c=sc))
  key_bytes = c * f * jnp.dtype(key_dtype).itemsize + (0 if scale is None else 4 * c)
  floor = key_bytes / bw_gbs / 1e6
  ms = time_ms(fn, rq, mask, kr, scale)
  ker = gpu_kernel_times(fn, rq, mask, kr, scale)
  return {"tokens": tokens, "spec": spec, "key_dtype": key_dtype, "chunks": c, "block_sizes": str(bs),
          "floor_ms": floor, "ms": ms, "x_floor": ms / floor,
          "device_us": sum(t for _, t in ker), "kernels_us": ker[:8]}


def call_overheads(tokens: int) -> list[dict]:
  """Wall time of one call (``time_ms``: back-to-back calls) against the device time of its
  kernels (profiler) for a pure XLA read, the chunk-score step (the Mosaic GPU kernel), two
  chunk-score steps in one program, and the run tail alone: where a route's wall time goes
  beyond its kernels (launch gaps, host work the device waits for). GPU only."""
  from msa_jax.inference.bank_routing import engine_block_sizes
  f, c, rq, mask = _route_shape(tokens)
  kr = (jax.random.normal(jax.random.key(2), (c, f), jnp.float32) / 32).astype(jnp.bfloat16)
  bs = engine_block_sizes(f, "bfloat16")
  scores = lambda q, k: br.chunk_scores(q, mask, k, implementation="pallas",  # noqa: E731
                                        block_sizes=bs)
  doc = jnp.asarray(np.arange(c, dtype=np.int32) // 2)
  s = jax.random.normal(jax.random.key(0), (1, c), jnp.float32)
  cases = {
      "xla_read": (jax.jit(lambda q, k: jnp.sum(k, dtype=jnp.float32)), (rq, kr)),
      "chunk_scores": (jax.jit(scores), (rq, kr)),
      "chunk_scores_x2": (jax.jit(lambda q, k: scores(q, k) + scores(q * 2, k)), (rq, kr)),
      "run_tail": (jax.jit(lambda s, d: br.run_top_k(s, d, K_DOCS, ROW, 2)), (s, doc)),
  }
  out = []
  for name, (fn, args) in cases.items():
    ms = time_ms(fn, *args, iters=5)
    ker = gpu_kernel_times(fn, *args)
    dev = sum(t for _, t in ker) / 1e3
    out.append({"case": name, "ms": ms, "device_ms": dev, "gap_us": 1e3 * (ms - dev),
                "kernels": len(ker), "kernels_us": ker[:8]})
    print(f"overhead {name:16s} wall {ms:.4f} ms, device {dev:.4f} ms, gap "
          f"{1e3 * (ms - dev):6.1f} us over {len(ker)} kernels: " + "; ".join(
              f"{nm[:28]} {us:.1f}" for nm, us in ker[:6]), flush=True)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", default="1e7,1e8", help="bank sizes ('' for none)")
  ap.add_argument("--doc_chunks", default="2,16", help="chunks per document (100-token docs: 2)")
  ap.add_argument("--batches", default="1")
  ap.add_argument("--profile", action="store_true", help="kernel times of the runs tail")
  ap.add_argument("--primitives", default="", help="sizes n: time top-16 of [1, n] ways")
  ap.add_argument("--scores_profile", default="",
                  help="key dtypes (e.g. bfloat16,int8,float8_e4m3fn), each optionally with a "
                       "tiling (int8@128x128x4: chunks x features x stages [x fp8 terms]): the "
                       "chunk-score step alone at the largest --tokens, its kernels and read "
                       "floor (GPU)")
  ap.add_argument("--overheads", action="store_true",
                  help="wall vs device time of a read, the chunk-score kernel and the tail (GPU)")
  args = ap.parse_args()
  overheads = []
  if args.overheads and jax.default_backend() == "gpu":
    overheads = call_overheads(max(int(float(x)) for x in args.tokens.split(",") if x))
  scores = []
  if args.scores_profile and jax.default_backend() == "gpu":
    from benchmarks import read_bandwidth_gbs
    bw = read_bandwidth_gbs()
    top = max(int(float(x)) for x in args.tokens.split(",") if x)
    for dtype in args.scores_profile.split(","):
      r = chunk_scores_profile(top, dtype, bw)
      scores.append(r)
      print(f"chunk scores {dtype:24s} {r['ms']:.3f} ms (floor {r['floor_ms']:.3f}, "
            f"{r['x_floor']:.2f}x), device {r['device_us']:.1f} us: " + "; ".join(
                f"{n[:40]} {t:.1f}" for n, t in r["kernels_us"]), flush=True)
  elif args.scores_profile:
    print("--scores_profile needs a GPU (the Mosaic GPU kernels): skipped", flush=True)
  prims = [top16_primitives(int(float(n))) for n in args.primitives.split(",") if n]
  for p in prims:
    print(f"top-16 of [1, {p['n']}], device us: " + ", ".join(
        f"{k[:-10]} {v:.1f}" for k, v in p.items() if k.endswith("_device_us")), flush=True)
    for k, v in p.items():
      if k.endswith("_kernels_us"):
        print(f"    {k[:-11]}: " + "; ".join(f"{nm[:50]} {t:.1f}" for nm, t in v), flush=True)
  rows = []
  for t in (int(float(x)) for x in args.tokens.split(",") if x):
    for dc in (int(x) for x in args.doc_chunks.split(",")):
      for b in (int(x) for x in args.batches.split(",")):
        r = bench(t, dc, b, args.profile)
        rows.append(r)
        print(r, flush=True)
  names = ["read", "segmax_sorted", "segmax", "runs", "runs_codes",
           "runs_sort", "runs_rank1k", "runs_rank4k", "runs_plain"]
  print(f"\n{'tokens':>8} {'doc_ch':>6} {'B':>2} " + " ".join(f"{n:>13}" for n in names)
        + "  same documents")
  for r in rows:
    print(f"{r['tokens']:>8.0e} {r['doc_chunks']:>6} {r['batch']:>2} "
          + " ".join(f"{r[n + '_ms']:>13.4f}" for n in names) + "  "
          + str(all(r[f"{n}_same_documents"] for n in names[1:])))
    for name in names:
      if f"{name}_device_us" in r:
        print(f"    {name}: device {r[name + '_device_us']:.1f} us in "
              f"{r[name + '_kernel_count']} kernels: " + "; ".join(
                  f"{nm[:28]} {us:.1f}" for nm, us in r[name + "_kernels_us"][:12]))
  write_json(os.path.join(out_dir(), "routing_tail.json"),
             {"device": device_name(), "jax": jax.__version__, "k": K_DOCS, "row": ROW,
              "rows": rows, "top16_primitives": prims, "chunk_scores": scores,
              "overheads": overheads})


if __name__ == "__main__":
  main()
