"""Sparse attention benchmark: Qwen3-4B heads (H 32, Hkv 8, D 128), bf16.

Active queries attend ``[context (prefix + gathered chunks) ; causal self]``. For each
shape it times the Pallas forward, cuDNN (``jax.nn.dot_product_attention``) on the
same gathered K/V concatenated with the own tokens and given the same boolean mask,
cuDNN without a mask (all keys, an upper bound on its speed) and the XLA reference.
Throughput counts the useful FLOPs, ``4·B·H·D·M·(S + (M+1)/2)``, for every method.
Prints a table and writes ``sparse_attention.json`` to ``$OUT`` (or benchmarks/results).
Run: ``python -m benchmarks.sparse_attention``.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_name, out_dir, time_ms, write_json
from pallas_kernels import sparse_attention as sa

H, G, D = 32, 8, 128
SHAPES = {  # name: (B, M, S)
    "prefill_q64_s1k": (1, 64, 1024),
    "train_m1k_s2k": (4, 1024, 2048),
    "train_m2k_s4k": (2, 2048, 4096),
    "long_m4k_s8k": (1, 4096, 8192),
}
CONFIGS = {
    "q64k64s2": sa.BlockSizes(block_q=64, block_kv=64, stages=2),
    "q64k128s2": sa.BlockSizes(block_q=64, block_kv=128, stages=2),
    "q64k64s3": sa.BlockSizes(block_q=64, block_kv=64, stages=3),
}


def make_inputs(b, m, s, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (b, m, H, D), bf)
  k = jax.random.normal(ks[1], (b, m, G, D), bf)
  v = jax.random.normal(ks[2], (b, m, G, D), bf)
  kc = jax.random.normal(ks[3], (b, s, G, D), bf)
  vc = jax.random.normal(ks[4], (b, s, G, D), bf)
  return q, k, v, jnp.ones((b, m), bool), kc, vc, jnp.ones((b, s), bool)


def bench_shape(name, b, m, s, configs):
  q, k, v, smask, kc, vc, cmask = make_inputs(b, m, s)
  flops = 4 * b * H * D * m * (s + (m + 1) / 2)
  row = {"shape": name, "B": b, "M": m, "S": s, "useful_gflop": flops / 1e9}
  ref = jax.jit(lambda *a: sa.attend(*a, implementation="xla"))
  out_ref = ref(q, k, v, smask, kc, vc, cmask).astype(jnp.float32)
  row["xla_ms"] = time_ms(ref, q, k, v, smask, kc, vc, cmask)
  k_all = jnp.concatenate([kc, k], axis=1)
  v_all = jnp.concatenate([vc, v], axis=1)
  allow = jnp.concatenate([jnp.ones((m, s), bool), jnp.tril(jnp.ones((m, m), bool))], axis=1)
  allow = jnp.broadcast_to(allow[None, None], (b, 1, m, s + m))
  try:
    cud = jax.jit(lambda q, k, v, mk: jax.nn.dot_product_attention(
        q, k, v, mask=mk, implementation="cudnn"))
    o = cud(q, k_all, v_all, allow).astype(jnp.float32)
    row["cudnn_mask_err"] = float(jnp.max(jnp.abs(o - out_ref)))
    row["cudnn_mask_ms"] = time_ms(cud, q, k_all, v_all, allow)
  except Exception as e:
    row["cudnn_mask_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  try:
    cud0 = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    row["cudnn_nomask_ms"] = time_ms(cud0, q, k_all, v_all)
  except Exception as e:
    row["cudnn_nomask_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  row["pallas"] = {}
  for cname, bs in configs.items():
    fn = jax.jit(lambda *a, bs=bs: sa.attend(*a, implementation="pallas", block_sizes=bs))
    try:
      o = fn(q, k, v, smask, kc, vc, cmask).astype(jnp.float32)
      err = float(jnp.max(jnp.abs(o - out_ref)))
      row["pallas"][cname] = {"ms": time_ms(fn, q, k, v, smask, kc, vc, cmask), "max_abs_err": err}
    except Exception as e:
      row["pallas"][cname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  ok = {c: r["ms"] for c, r in row["pallas"].items() if "ms" in r}
  if ok:
    row["pallas_config"] = min(ok, key=ok.get)
    row["pallas_ms"] = ok[row["pallas_config"]]
  for key in ("xla_ms", "cudnn_mask_ms", "cudnn_nomask_ms", "pallas_ms"):
    if key in row:
      row[key.replace("_ms", "_tflops")] = flops / row[key] / 1e9
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--configs", default=",".join(CONFIGS))
  args = ap.parse_args()
  configs = {c: CONFIGS[c] for c in args.configs.split(",")}
  rows = []
  print(f"device {device_name()}", flush=True)
  for name in args.shapes.split(","):
    row = bench_shape(name, *SHAPES[name], configs)
    rows.append(row)
    print(row, flush=True)
  print(f"{'shape':>16} {'xla':>8} {'cudnn+m':>8} {'cudnn':>8} {'pallas':>8}  (ms)   "
        f"{'pallas TF/s':>11} {'cudnn+m TF/s':>12} {'ratio':>6} cfg")
  nan = float("nan")
  for r in rows:
    ratio = r.get("pallas_tflops", nan) / r.get("cudnn_mask_tflops", nan)
    print(f"{r['shape']:>16} {r['xla_ms']:>8.3f} {r.get('cudnn_mask_ms', nan):>8.3f} "
          f"{r.get('cudnn_nomask_ms', nan):>8.3f} {r.get('pallas_ms', nan):>8.3f}        "
          f"{r.get('pallas_tflops', nan):>11.1f} {r.get('cudnn_mask_tflops', nan):>12.1f} "
          f"{ratio:>6.2f} {r.get('pallas_config', '-')}")
  write_json(os.path.join(out_dir(), "sparse_attention.json"),
             {"H": H, "Hkv": G, "D": D, "rows": rows})


if __name__ == "__main__":
  main()
