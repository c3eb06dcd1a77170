"""What the fused kernel's quantised-query arithmetic costs in routing agreement (synthetic).

  python -m benchmarks.routing_numerics                  # CPU, about a minute

The fused routing kernel multiplies fp8 / int8 K̄R codes by queries quantised per column to
the same dtype (8-bit wgmma needs one dtype); the XLA scan multiplies the codes by float32
queries. This measures, on random unit keys at the Qwen3-4B width (F = 1024) and questions
of 64 tokens built around a few target chunks plus noise, how often each arithmetic picks
the same top-k documents as float64 routing over the unquantised keys:
  * ``float queries``: codes × scale against float32 queries (the XLA scan);
  * ``kernel``: the kernel's numerics in plain XLA (``quantised_queries.fused_chunk_scores``):
    bf16 queries for bf16 keys, int8 queries, e4m3 queries as one term or as two (the
    code plus its e4m3 residual, the default).
RANDOM KEYS: a stress test of near ties (random keys score close together), not a trained
model's recall: ``benchmarks.quant_accuracy`` measures that on a real bank. Prints a table
and writes ``routing_numerics.json`` / ``.png`` to ``--out`` (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np

from benchmarks import write_json

CASES = (   # (K̄R dtype, query arithmetic, fp8 query terms)
    ("bfloat16", "float", 1), ("bfloat16", "kernel", 1),
    ("int8", "float", 1), ("int8", "kernel", 1),
    ("float8_e4m3fn", "float", 1), ("float8_e4m3fn", "kernel", 1),
    ("float8_e4m3fn", "kernel", 2),
)


def synthetic_case(seed: int, chunks: int, f: int, b: int, m: int, targets: int):
  """Unit keys, contiguous documents of 1-8 chunks, questions around ``targets`` chunks."""
  rng = np.random.default_rng(seed)
  kr = rng.normal(size=(chunks, f)).astype(np.float32)
  kr /= np.linalg.norm(kr, axis=1, keepdims=True)
  lens = rng.integers(1, 9, chunks)
  doc = np.repeat(np.arange(chunks), lens)[:chunks].astype(np.int32)
  tgt = rng.integers(0, chunks, (b, targets))
  rq = 0.5 * rng.normal(size=(b, m, f)).astype(np.float32)
  rq += 2.0 * kr[tgt].sum(1)[:, None, :] / np.sqrt(targets)
  return kr, doc, rq


def doc_top_k(chunk_scores_bc, doc, k: int):
  """Top-k documents (score desc, id asc) of per-chunk scores, as sets."""
  n = int(doc.max()) + 1
  out = []
  for s in np.asarray(chunk_scores_bc, np.float64):
    d = np.full(n, -np.inf)
    np.maximum.at(d, doc, s)
    out.append(set(np.lexsort((np.arange(n), -d))[:k].tolist()))
  return out


def measure(kr, doc, rq, k: int) -> list[dict]:
  from msa_jax.inference import quantize
  from pallas_kernels import quantised_queries as qq
  ref = doc_top_k((rq.astype(np.float64) @ kr.astype(np.float64).T).max(1), doc, k)
  rows = []
  for kr_dtype, arith, terms in CASES:
    codes, scale = quantize.quantise(kr, kr_dtype, 1)
    if arith == "float":
      deq = quantize.dequantise_np(codes, scale)
      s = (rq @ deq.T).max(1)
    else:
      queries = qq.route_queries(jnp.asarray(rq)[:, None], codes.dtype, terms)
      s = qq.fused_chunk_scores(queries, jnp.asarray(codes),
                                None if scale is None else jnp.asarray(scale))
    got = doc_top_k(s, doc, k)
    overlap = float(np.mean([len(a & g) / k for a, g in zip(ref, got)]))
    exact = float(np.mean([a == g for a, g in zip(ref, got)]))
    label = f"K̄R {kr_dtype}, {arith} queries" + (f" ({terms} e4m3 terms)"
                                                  if arith == "kernel" and kr_dtype.startswith(
                                                      "float8") else "")
    rows.append({"kr_dtype": kr_dtype, "queries": arith, "fp8_query_terms": terms,
                 "label": label, "top_k_overlap": overlap, "same_top_k_set": exact})
    print(f"  {label:48s} top-{k} overlap {overlap:.4f}   same set {exact:.3f}", flush=True)
  return rows


def plot(rows, k: int, path: str) -> None:
  from msa_jax import plots
  fig, ax = plots.subplots(figsize=(8, 3.6))
  y = np.arange(len(rows))
  ax.barh(y, [100 * (1 - r["top_k_overlap"]) for r in rows],
          color=["C0" if r["queries"] == "float" else "C1" for r in rows])
  ax.set_yticks(y)
  ax.set_yticklabels([r["label"] for r in rows], fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel(f"% of top-{k} documents that differ from float64 routing")
  ax.set_title("routing agreement: float-query scan (blue) vs the kernel's arithmetic (orange)",
               fontsize=8)
  ax.grid(axis="x", alpha=0.3)
  plots.save(fig, path)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--chunks", type=int, default=30_000)
  ap.add_argument("--features", type=int, default=1024)
  ap.add_argument("--questions", type=int, default=64)
  ap.add_argument("--tokens", type=int, default=64)
  ap.add_argument("--targets", type=int, default=4, help="chunks each question is built around")
  ap.add_argument("--k", type=int, default=16)
  ap.add_argument("--seeds", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = ap.parse_args()
  t0 = time.perf_counter()
  per_seed = []
  for seed in range(args.seeds):
    print(f"seed {seed}: {args.chunks:,} chunks x F={args.features}, {args.questions} questions "
          f"of {args.tokens} tokens", flush=True)
    kr, doc, rq = synthetic_case(seed, args.chunks, args.features, args.questions, args.tokens,
                                 args.targets)
    per_seed.append(measure(kr, doc, rq, args.k))
  rows = [dict(r, top_k_overlap=float(np.mean([s[i]["top_k_overlap"] for s in per_seed])),
               same_top_k_set=float(np.mean([s[i]["same_top_k_set"] for s in per_seed])))
          for i, r in enumerate(per_seed[0])]
  print(f"\nmean over {args.seeds} seeds:")
  for r in rows:
    print(f"  {r['label']:48s} top-{args.k} overlap {r['top_k_overlap']:.4f}   "
          f"same set {r['same_top_k_set']:.3f}")
  os.makedirs(args.out, exist_ok=True)
  write_json(os.path.join(args.out, "routing_numerics.json"),
             {"rows": rows, "args": vars(args), "seconds": time.perf_counter() - t0,
              "random_keys": True,
              "command": "python -m benchmarks.routing_numerics " + " ".join(
                  f"--{a}={v}" for a, v in vars(args).items() if a != "out")})
  plot(rows, args.k, os.path.join(args.out, "routing_numerics.png"))
  print(f"wrote {args.out}/routing_numerics.json, .png ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  main()
