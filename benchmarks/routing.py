"""Routing benchmark: one router layer of Qwen3-4B shape against 1M-100M memory tokens.

F = Hkv·D = 1024, M = 64 question tokens, P = 64 (100M tokens = 1.56M chunks),
documents of ``--doc-chunks`` chunks. For each memory size it times:
  * floor: bytes of K̄R (bf16) / read bandwidth measured in this run (a pure-read
    reduction over 4 GiB; the copy bandwidth, read + write, is reported beside it);
  * xla_scores: the best plain-XLA chunk scores (bf16 matmul, f32 acc, masked max);
  * xla_route: xla_scores + segment max + top-k (the full XLA path, same tail);
  * pallas_scores: the Mosaic GPU chunk-score kernel (each ``--configs`` tiling);
  * pallas_route: the full ``route_top_k`` with the kernel;
  * pallas_route_runs: the same with ``max_doc_chunks`` (documents ranked from the chunk
    scores' row maxima, ``block_routing.run_top_k``: no segment max over the bank);
  * pallas_fused_route: ``route_top_k`` with ``BlockSizes(fused=True)``: per-document
    max and block-local top-k inside the kernel, candidates merged in XLA (each
    ``--fused-blocks`` count; the bank layout is built once, its time reported apart);
  * tail: segment max + top-k alone (host-dispatch bound when small);
  * with --profile, per-kernel device times from a profiler trace.
Prints a table, writes ``routing.json`` and ``routing.png`` to ``$OUT`` (or
benchmarks/results). Run: ``python -m benchmarks.routing``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import (copy_bandwidth_gbs, device_name, gpu_kernel_times, out_dir,
                        read_bandwidth_gbs, time_ms, write_json)
from msa_jax import routing as ref_routing
from pallas_kernels import block_routing as br
from pallas_kernels import block_top_k as bt

F, M, P, K_DOCS = 1024, 64, 64, 16
CONFIGS = {  # name: (chunks, features, stages)
    "c128f128s4": (128, 128, 4),
    "c128f64s4": (128, 64, 4),
    "c128f64s3": (128, 64, 3),
    "c64f128s3": (64, 128, 3),
    "c256f64s3": (256, 64, 3),
}


def make_bank(num_chunks: int, doc_chunks: int, seed: int = 0, real_chunks: int | None = None):
  """Random unit-norm-ish bf16 keys, a contiguous chunk→doc map, 64 routing queries."""
  key_kr, key_q = jax.random.split(jax.random.key(seed))
  kr_cf = jax.jit(lambda k: (jax.random.normal(k, (num_chunks, F), jnp.bfloat16)
                             * jnp.bfloat16(F ** -0.5)), )(key_kr)
  real = num_chunks if real_chunks is None else real_chunks
  ids = jnp.arange(num_chunks, dtype=jnp.int32)
  chunk_doc_c = jnp.where(ids < real, ids // doc_chunks, -1)
  num_docs = -(-real // doc_chunks)
  rq = jax.random.normal(key_q, (1, M, 32, 128), jnp.float32)
  rq_bmf = ref_routing.group_sum_queries(rq, 8)
  mask_bm = jnp.arange(M)[None, :] < M - 3  # a few padding tokens
  return rq_bmf, mask_bm, kr_cf, chunk_doc_c, num_docs


def bench_size(tokens: int, doc_chunks: int, bw_gbs: float, configs: dict, best: str | None,
               profile: bool = False, tail_variants: bool = True, fused_blocks=(0,)):
  c = -(-(tokens // P) // 128) * 128  # bank padded to a multiple of 128 chunks (doc -1)
  rq_bmf, mask_bm, kr_cf, chunk_doc_c, n = make_bank(c, doc_chunks, real_chunks=tokens // P)
  row = {"tokens": tokens, "chunks": c, "docs": n, "kr_bytes": c * F * 2}
  row["floor_ms"] = c * F * 2 / bw_gbs / 1e6

  xla_scores = jax.jit(lambda q, m, kr: br.chunk_scores(q, m, kr, implementation="xla"))
  row["xla_scores_ms"] = time_ms(xla_scores, rq_bmf, mask_bm, kr_cf)
  xla_route = jax.jit(lambda q, m, kr, d: br.route_top_k(q, m, kr, d, n, K_DOCS,
                                                         implementation="xla"))
  row["xla_route_ms"] = time_ms(xla_route, rq_bmf, mask_bm, kr_cf, chunk_doc_c)
  s_ref = xla_scores(rq_bmf, mask_bm, kr_cf)
  _, sel_xla = xla_route(rq_bmf, mask_bm, kr_cf, chunk_doc_c)

  tail = jax.jit(lambda s, d: br.pruned_top_k(ref_routing.document_scores(s, d, n), K_DOCS,
                                              128, "sort"))
  row["tail_ms"] = time_ms(tail, s_ref, chunk_doc_c)  # host-dispatch bound at small sizes

  seg = jax.jit(lambda s, d: ref_routing.document_scores(s, d, n))
  row["tail_segmax_ms"] = time_ms(seg, s_ref, chunk_doc_c)
  doc_s = seg(s_ref, chunk_doc_c)
  topk = jax.jit(lambda x: br.pruned_top_k(x, K_DOCS, 128, "sort"))
  row["tail_topk_ms"] = time_ms(topk, doc_s)
  v, i = topk(doc_s)
  selj = jax.jit(lambda v, i: br.selection_from_top_k(v, i, K_DOCS))
  row["tail_select_ms"] = time_ms(selj, v, i)
  row["pallas"] = {}
  for name, (ch, fe, st) in configs.items():
    bs = br.BlockSizes(chunks=ch, features=fe, stages=st)
    fn = jax.jit(lambda q, m, kr, bs=bs: br.chunk_scores(q, m, kr, implementation="pallas",
                                                         block_sizes=bs))
    try:
      s_p = fn(rq_bmf, mask_bm, kr_cf)
      err = float(jnp.max(jnp.abs(s_p - s_ref)))
      ms = time_ms(fn, rq_bmf, mask_bm, kr_cf)
      row["pallas"][name] = {"scores_ms": ms, "max_abs_err_vs_xla": err}
    except Exception as e:  # a tiling that does not fit: record and go on
      row["pallas"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  ok = {k: v["scores_ms"] for k, v in row["pallas"].items() if "scores_ms" in v}
  if ok:
    pick = best if best in ok else min(ok, key=ok.get)
    ch, fe, st = configs[pick]
    bs = br.BlockSizes(chunks=ch, features=fe, stages=st)
    route = jax.jit(lambda q, m, kr, d: br.route_top_k(q, m, kr, d, n, K_DOCS,
                                                       implementation="pallas", block_sizes=bs))
    _, sel_p = route(rq_bmf, mask_bm, kr_cf, chunk_doc_c)
    row["pallas_config"] = pick
    row["pallas_scores_ms"] = ok[pick]
    row["pallas_route_ms"] = time_ms(route, rq_bmf, mask_bm, kr_cf, chunk_doc_c)
    # the same route ranking documents from the chunk scores' row maxima (run_top_k)
    runs = jax.jit(lambda q, m, kr, d: br.route_top_k(q, m, kr, d, n, K_DOCS,
                                                      implementation="pallas", block_sizes=bs,
                                                      max_doc_chunks=doc_chunks))
    _, sel_r = runs(rq_bmf, mask_bm, kr_cf, chunk_doc_c)
    row["pallas_route_runs_ms"] = time_ms(runs, rq_bmf, mask_bm, kr_cf, chunk_doc_c)
    row["runs_selection_equal_xla"] = bool(np.array_equal(np.asarray(sel_r.doc_idx_bk),
                                                          np.asarray(sel_xla.doc_idx_bk)))
    # Fused kernel (document max + block top-k inside): the bank layout is a bank
    # property built once with the bank; its build time is reported on its own.
    tile = br.fused_plan(*rq_bmf.shape, dataclasses.replace(bs, fused=True))[0]
    lay_fn = jax.jit(lambda d: bt.bank_layout(d, tile))
    layout = lay_fn(chunk_doc_c)
    row["bank_layout_ms"] = time_ms(lay_fn, chunk_doc_c)
    row["fused"] = {}
    for blocks in fused_blocks:
      bs_f = dataclasses.replace(bs, fused=True, blocks=blocks)
      fused = jax.jit(lambda q, m, kr, d, lay, bs_f=bs_f: br.route_top_k(
          q, m, kr, d, n, K_DOCS, implementation="pallas", block_sizes=bs_f, layout=lay))
      try:
        top_f, sel_f = fused(rq_bmf, mask_bm, kr_cf, chunk_doc_c, layout)
        res = {"route_ms": time_ms(fused, rq_bmf, mask_bm, kr_cf, chunk_doc_c, layout),
               "selection_equal_unfused": bool(np.array_equal(
                   np.asarray(sel_f.doc_idx_bk), np.asarray(sel_p.doc_idx_bk)))}
        if profile:
          ker = gpu_kernel_times(fused, rq_bmf, mask_bm, kr_cf, chunk_doc_c, layout)
          res["kernels_us"] = ker
          print(f"fused blocks={blocks}: {sum(t for _, t in ker):.1f} us of kernels", flush=True)
          for name, t in ker:
            print(f"  {t:9.1f} us  {name[:110]}", flush=True)
      except Exception as e:
        res = {"error": f"{type(e).__name__}: {str(e)[:3000]}"}
        print(res["error"], flush=True)
      row["fused"][str(blocks)] = res
    ok_f = {b: r["route_ms"] for b, r in row["fused"].items() if "route_ms" in r}
    if ok_f:
      pick_f = min(ok_f, key=ok_f.get)
      row["pallas_fused_route_ms"] = ok_f[pick_f]
      row["fused_blocks"] = pick_f
      row["fused_selection_equal_unfused"] = row["fused"][pick_f]["selection_equal_unfused"]
    for tname, tb in (("two_stage1024", dict(top_k="two_stage", block_docs=1024)),
                      ("two_stage4096", dict(top_k="two_stage", block_docs=4096)),
                      ("onestage", dict(top_k="two_stage", block_docs=0)),
                      ("pruned128", dict(top_k="pruned", block_docs=128)),
                      ("prunedsort64", dict(top_k="pruned_sort", block_docs=64)),
                      ("prunedsort256", dict(top_k="pruned_sort", block_docs=256))
                     ) if tail_variants else ():
      bs_t = dataclasses.replace(bs, **tb)
      fn_t = jax.jit(lambda q, m, kr, d, bs_t=bs_t: br.route_top_k(
          q, m, kr, d, n, K_DOCS, implementation="pallas", block_sizes=bs_t))
      row[f"pallas_route_{tname}_ms"] = time_ms(fn_t, rq_bmf, mask_bm, kr_cf, chunk_doc_c)
      if profile:
        ker = gpu_kernel_times(fn_t, rq_bmf, mask_bm, kr_cf, chunk_doc_c)
        print(f"route {tname}: " + ", ".join(f"{nm[:40]} {t:.1f}" for nm, t in ker[:6]), flush=True)
    if profile:
      for label, f in (("pallas_route", route), ("xla_route", xla_route)):
        ker = gpu_kernel_times(f, rq_bmf, mask_bm, kr_cf, chunk_doc_c)
        row[f"{label}_kernels_us"] = ker
        print(f"{label}: {sum(t for _, t in ker):.1f} us of kernels", flush=True)
        for name, t in ker:
          print(f"  {t:9.1f} us  {name[:110]}", flush=True)
    row["selection_equal_xla"] = bool(np.array_equal(np.asarray(sel_p.doc_idx_bk),
                                                     np.asarray(sel_xla.doc_idx_bk)))
  del kr_cf
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", default="1e6,1e7,3e7,1e8")
  ap.add_argument("--doc-chunks", type=int, default=16)
  ap.add_argument("--configs", default=",".join(CONFIGS))
  ap.add_argument("--profile", action="store_true", help="per-kernel device times at the largest size")
  ap.add_argument("--no-tail-variants", action="store_true", help="skip the top-k variants")
  ap.add_argument("--fused-blocks", default="0",
                  help="programs of the fused kernel to try (0 = one per SM)")
  ap.add_argument("--sweep-at", type=float, default=1e8, help="memory size that tries every config")
  args = ap.parse_args()
  size = {} if jax.default_backend() == "gpu" else {"num_bytes": 1 << 26}
  bw = read_bandwidth_gbs(**size)
  copy_bw = copy_bandwidth_gbs(**size)
  print(f"device {device_name()}  read bandwidth {bw:.0f} GB/s (the floor's), "
        f"copy bandwidth {copy_bw:.0f} GB/s (read+write)", flush=True)
  configs = {k: CONFIGS[k] for k in args.configs.split(",")}
  rows, best = [], None
  sizes = sorted((int(float(t)) for t in args.tokens.split(",")), reverse=True)
  for tokens in sizes:
    cfg = configs if tokens == int(args.sweep_at) or best is None else {best: configs[best]}
    row = bench_size(tokens, args.doc_chunks, bw, cfg, best, args.profile and tokens == sizes[0],
                     not args.no_tail_variants,
                     tuple(int(b) for b in args.fused_blocks.split(",")))
    best = row.get("pallas_config", best)
    rows.append(row)
    print(row, flush=True)
  rows.sort(key=lambda r: r["tokens"])
  hdr = (f"{'tokens':>10} {'chunks':>9} {'floor':>7} {'xla_sc':>7} {'xla_rt':>7} "
         f"{'pl_sc':>7} {'pl_runs':>7} {'fused':>7} {'tail':>6} {'pl/floor':>8} {'fu/floor':>8} "
         f"{'cfg':>11} sel==xla fused==unfused")
  print(hdr)
  for r in rows:
    pr = r.get("pallas_route_runs_ms", float("nan"))
    fu = r.get("pallas_fused_route_ms", float("nan"))
    print(f"{r['tokens']:>10.0e} {r['chunks']:>9} {r['floor_ms']:>7.3f} {r['xla_scores_ms']:>7.3f} "
          f"{r['xla_route_ms']:>7.3f} {r.get('pallas_scores_ms', float('nan')):>7.3f} {pr:>7.3f} "
          f"{fu:>7.3f} {r['tail_ms']:>6.3f} {pr / r['floor_ms']:>8.3f} {fu / r['floor_ms']:>8.3f} "
          f"{r.get('pallas_config', '-'):>11} {r.get('runs_selection_equal_xla')} "
          f"{r.get('fused_selection_equal_unfused')}")
  od = out_dir()
  write_json(os.path.join(od, "routing.json"), {"read_bw_gbs": bw, "copy_bw_gbs": copy_bw,
                                                "F": F, "M": M, "P": P,
                                                "k": K_DOCS, "rows": rows})
  try:
    from msa_jax import plots
    t = [r["tokens"] for r in rows]
    fig, ax = plots.subplots(figsize=(6, 4))
    for key, lab in (("floor_ms", "read floor"), ("xla_route_ms", "XLA route"),
                     ("pallas_route_ms", "Pallas route"),
                     ("pallas_route_runs_ms", "Pallas route, row-max tail"),
                     ("pallas_fused_route_ms", "Pallas fused route"), ("xla_scores_ms", "XLA scores+max")):
      ax.loglog(t, [r.get(key, np.nan) for r in rows], marker="o", label=lab)
    ax.set_xlabel("memory tokens")
    ax.set_ylabel("ms per router layer")
    ax.legend()
    ax.set_title(f"Routing, one layer ({device_name()})")
    plots.save(fig, os.path.join(od, "routing.png"))
  except Exception as e:  # plotting is optional
    print("no plot:", e)


if __name__ == "__main__":
  main()
