"""Sparse attention benchmark: Qwen3-4B heads (H 32, Hkv 8, D 128), bf16, forward and backward.

Active queries attend ``[context (prefix + gathered chunks) ; causal self]``. Methods,
all on the same gathered K/V:

* Pallas: ``pallas_kernels.sparse_attention`` (forward kernel; backward kernels).
* cuDNN split (forward only): the best structured masks cuDNN supports for this
  pattern, exactly the useful work: the context unmasked plus the own tokens causal,
  two ``jax.nn.dot_product_attention(implementation="cudnn", return_residual=True)``
  calls merged by their log-sum-exps. (jax exposes only top-left causal masks, so
  one call cannot express ``[context ; causal self]``; cuDNN's VJP ignores the
  log-sum-exp's cotangent, so the split has no correct backward.)
* cuDNN + mask: one cuDNN call over ``[context ; own]`` with the same boolean mask.
* cuDNN no mask: one cuDNN call attending every key: more work than asked
  (``(S+M)/(S+M/2)`` times the useful FLOPs), its unmasked rate.
* XLA: the reference (``msa_jax.attention``), which materialises the logits.

Throughput counts the useful FLOPs for every method: forward ``4·B·H·D·M·(S+(M+1)/2)``,
backward 2.5 × that (five matmuls instead of two). Backward times: Pallas is timed
alone (its two kernels and their XLA glue, given the forward's output and
log-sum-exp); for cuDNN and XLA it is (forward + backward) − forward.
Prints tables, writes ``sparse_attention.json`` and ``sparse_attention.png`` to
``$OUT`` (or benchmarks/results). Run: ``python -m benchmarks.sparse_attention``.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import attempt, device_name, out_dir, time_ms, write_json
from pallas_kernels import sparse_attention as sa

H, G, D = 32, 8, 128
SHAPES = {  # name: (B, M, S)
    "prefill_q64_s1k": (1, 64, 1024),
    "train_m1k_s2k": (4, 1024, 2048),
    "train_m2k_s4k": (2, 2048, 4096),
    "long_m4k_s8k": (1, 4096, 8192),
}
# Forward tilings; "ws_": the warp-specialised kernel (the GPU default is ws_q64k128s2).
CONFIGS = {
    "q64k64s2": sa.BlockSizes(block_q=64, block_kv=64, stages=2, warp_specialized=False),
    "q64k128s2": sa.BlockSizes(block_q=64, block_kv=128, stages=2, warp_specialized=False),
    "q64k64s3": sa.BlockSizes(block_q=64, block_kv=64, stages=3, warp_specialized=False),
    "ws_q64k128s2": sa.BlockSizes(block_q=64, block_kv=128, stages=2, warp_specialized=True),
    "ws_q64k64s3": sa.BlockSizes(block_q=64, block_kv=64, stages=3, warp_specialized=True),
    "ws_q64k64s4": sa.BlockSizes(block_q=64, block_kv=64, stages=4, warp_specialized=True),
}
BWD_CONFIGS = {  # backward tilings (the forward part of each: the default)
    "b64x64s2": sa.BlockSizes(bwd_block_q=64, bwd_block_kv=64, bwd_stages=2),
    "b64x64s3": sa.BlockSizes(bwd_block_q=64, bwd_block_kv=64, bwd_stages=3),
}


def make_inputs(b, m, s, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (b, m, H, D), bf)
  k = jax.random.normal(ks[1], (b, m, G, D), bf)
  v = jax.random.normal(ks[2], (b, m, G, D), bf)
  kc = jax.random.normal(ks[3], (b, s, G, D), bf)
  vc = jax.random.normal(ks[4], (b, s, G, D), bf)
  dout = jax.random.normal(ks[5], (b, m, H, D), bf)
  return (q, k, v, jnp.ones((b, m), bool), kc, vc, jnp.ones((b, s), bool)), dout


def _cudnn(q, k, v, mask=None, causal=False, residual=False):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                      implementation="cudnn", return_residual=residual)


def cudnn_split(q, k, v, kc, vc):
  """Context unmasked + own tokens causal (two cuDNN calls), merged by log-sum-exp."""
  o_ctx, lse_ctx = _cudnn(q, kc, vc, residual=True)
  o_self, lse_self = _cudnn(q, k, v, causal=True, residual=True)
  lse_ctx, lse_self = lse_ctx.astype(jnp.float32), lse_self.astype(jnp.float32)
  top = jnp.maximum(lse_ctx, lse_self)
  w_ctx, w_self = jnp.exp(lse_ctx - top), jnp.exp(lse_self - top)
  out = (o_ctx.astype(jnp.float32) * w_ctx[..., None]
         + o_self.astype(jnp.float32) * w_self[..., None]) / (w_ctx + w_self)[..., None]
  return out.astype(q.dtype)


def _with_grad(f):
  """jit of ``f``'s forward + backward: ``(dout, *args) -> grads``."""
  def run(dout, *a):
    _, vjp = jax.vjp(f, *a)
    return vjp(dout)
  return jax.jit(run)


def bench_shape(name, b, m, s, configs, bwd_configs, backward):
  args, dout = make_inputs(b, m, s)
  q, k, v, smask, kc, vc, cmask = args
  flops = 4 * b * H * D * m * (s + (m + 1) / 2)
  row = {"shape": name, "B": b, "M": m, "S": s, "useful_gflop": flops / 1e9,
         "useful_gflop_bwd": 2.5 * flops / 1e9}
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  ref = jax.jit(lambda *a: sa.attend(*a, implementation="xla"))
  out_ref = f32(ref(*args))
  row["xla_ms"] = time_ms(ref, *args)
  k_all = jnp.concatenate([kc, k], axis=1)
  v_all = jnp.concatenate([vc, v], axis=1)
  allow = jnp.concatenate([jnp.ones((m, s), bool), jnp.tril(jnp.ones((m, m), bool))], axis=1)
  allow = jnp.broadcast_to(allow[None, None], (b, 1, m, s + m))

  split = jax.jit(cudnn_split)
  attempt(row, "cudnn_split_err",
          lambda: float(jnp.max(jnp.abs(f32(split(q, k, v, kc, vc)) - out_ref))))
  attempt(row, "cudnn_split_ms", lambda: time_ms(split, q, k, v, kc, vc))
  masked = jax.jit(lambda q, k, v, mk: _cudnn(q, k, v, mask=mk))
  attempt(row, "cudnn_mask_err",
          lambda: float(jnp.max(jnp.abs(f32(masked(q, k_all, v_all, allow)) - out_ref))))
  attempt(row, "cudnn_mask_ms", lambda: time_ms(masked, q, k_all, v_all, allow))
  nomask = jax.jit(lambda q, k, v: _cudnn(q, k, v))
  attempt(row, "cudnn_nomask_ms", lambda: time_ms(nomask, q, k_all, v_all))

  row["pallas"] = {}
  for cname, bs in configs.items():
    fn = jax.jit(lambda *a, bs=bs: sa.attend(*a, implementation="pallas", block_sizes=bs))
    r = row["pallas"][cname] = {}
    attempt(r, "max_abs_err", lambda fn=fn: float(jnp.max(jnp.abs(f32(fn(*args)) - out_ref))))
    attempt(r, "ms", lambda fn=fn: time_ms(fn, *args))
  ok = {c: r["ms"] for c, r in row["pallas"].items() if "ms" in r}
  if ok:
    row["pallas_config"] = min(ok, key=ok.get)
    row["pallas_ms"] = ok[row["pallas_config"]]
  for key in ("xla_ms", "cudnn_split_ms", "cudnn_mask_ms", "cudnn_nomask_ms", "pallas_ms"):
    if key in row:
      row[key.replace("_ms", "_tflops")] = flops / row[key] / 1e9
  if backward:
    bench_backward(row, args, dout, k_all, v_all, allow, flops, bwd_configs)
  return row


def bench_backward(row, args, dout, k_all, v_all, allow, flops, bwd_configs):
  q, k, v, smask, kc, vc, cmask = args
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  xla_fb = _with_grad(lambda q_, k_, v_, kc_, vc_: sa.attend(
      q_, k_, v_, smask, kc_, vc_, cmask, implementation="xla"))
  grads_ref = [f32(x) for x in xla_fb(dout, q, k, v, kc, vc)]
  row["xla_fb_ms"] = time_ms(xla_fb, dout, q, k, v, kc, vc)
  row["xla_bwd_ms"] = row["xla_fb_ms"] - row["xla_ms"]

  masked_fb = _with_grad(lambda q_, k_, v_: _cudnn(q_, k_, v_, mask=allow))
  attempt(row, "cudnn_mask_fb_ms", lambda: time_ms(masked_fb, dout, q, k_all, v_all))
  nomask_fb = _with_grad(lambda q_, k_, v_: _cudnn(q_, k_, v_))
  attempt(row, "cudnn_nomask_fb_ms", lambda: time_ms(nomask_fb, dout, q, k_all, v_all))
  for key in ("cudnn_mask", "cudnn_nomask"):
    if f"{key}_fb_ms" in row and f"{key}_ms" in row:
      row[f"{key}_bwd_ms"] = row[f"{key}_fb_ms"] - row[f"{key}_ms"]

  row["pallas_bwd"] = {}
  for cname, bs in bwd_configs.items():
    bs = bs.resolved(compiled=True)
    r = row["pallas_bwd"][cname] = {}
    fwd = jax.jit(lambda *a, bs=bs: sa._forward(*a, bs, False))
    bwd = jax.jit(lambda out, lse, do, *a, bs=bs: sa._backward(*a, out, lse, do, bs, False))
    fb = _with_grad(lambda q_, k_, v_, kc_, vc_, bs=bs: sa.attend(
        q_, k_, v_, smask, kc_, vc_, cmask, implementation="pallas", block_sizes=bs))

    def check(fb=fb):
      got = fb(dout, q, k, v, kc, vc)
      return {n: float(jnp.linalg.norm(f32(a) - w) / jnp.linalg.norm(w))
              for n, a, w in zip(("dq", "dk", "dv", "dk_ctx", "dv_ctx"), got, grads_ref)}
    attempt(r, "rel_err", check)
    if "rel_err" not in r:
      continue

    def time_bwd(fwd=fwd, bwd=bwd):
      out, lse = fwd(*args)
      return time_ms(bwd, out, lse, dout, *args)
    attempt(r, "ms", time_bwd)
    attempt(r, "fb_ms", lambda fb=fb: time_ms(fb, dout, q, k, v, kc, vc))
  ok = {c: r["ms"] for c, r in row["pallas_bwd"].items() if "ms" in r}
  if ok:
    row["pallas_bwd_config"] = min(ok, key=ok.get)
    row["pallas_bwd_ms"] = ok[row["pallas_bwd_config"]]
  for key in ("xla_bwd_ms", "cudnn_mask_bwd_ms", "cudnn_nomask_bwd_ms", "pallas_bwd_ms"):
    if row.get(key, 0) > 0:   # a difference of two timings can be noise at tiny shapes
      row[key.replace("_ms", "_tflops")] = 2.5 * flops / row[key] / 1e9


def print_tables(rows):
  nan = float("nan")
  g = lambda r, k: r.get(k, nan)  # noqa: E731
  print("forward, ms (useful TFLOP/s)")
  print(f"{'shape':>16} {'xla':>14} {'cudnn split':>14} {'cudnn+mask':>14} "
        f"{'cudnn nomask':>14} {'pallas':>14}  pallas/nomask cfg")
  for r in rows:
    cells = [f"{g(r, k + '_ms'):7.3f} ({g(r, k + '_tflops'):4.0f})"
             for k in ("xla", "cudnn_split", "cudnn_mask", "cudnn_nomask", "pallas")]
    ratio = g(r, "pallas_tflops") / g(r, "cudnn_nomask_tflops")
    print(f"{r['shape']:>16} " + " ".join(f"{c:>14}" for c in cells)
          + f"  {ratio:13.2f} {r.get('pallas_config', '-')}")
  if not any("pallas_bwd" in r for r in rows):
    return
  print("backward, ms (useful TFLOP/s)")
  print(f"{'shape':>16} {'xla':>14} {'cudnn+mask':>14} {'cudnn nomask':>14} {'pallas':>14}  cfg")
  for r in rows:
    cells = [f"{g(r, k + '_bwd_ms'):7.3f} ({g(r, k + '_bwd_tflops'):4.0f})"
             for k in ("xla", "cudnn_mask", "cudnn_nomask", "pallas")]
    print(f"{r['shape']:>16} " + " ".join(f"{c:>14}" for c in cells)
          + f"  {r.get('pallas_bwd_config', '-')}")


COLORS = {"xla": "tab:gray", "cudnn_split": "tab:orange", "cudnn_mask": "tab:green",
          "cudnn_nomask": "tab:red", "pallas": "tab:blue"}


def plot(rows, path):
  from msa_jax import plots
  fig, axes = plots.subplots(1, 2, figsize=(12, 4.5))
  panels = [("forward", ("xla", "cudnn_split", "cudnn_mask", "cudnn_nomask", "pallas"), ""),
            ("backward", ("xla", "cudnn_mask", "cudnn_nomask", "pallas"), "_bwd")]
  for ax, (title, methods, suffix) in zip(axes, panels):
    x = np.arange(len(rows))
    width = 0.8 / len(methods)
    for i, meth in enumerate(methods):
      vals = [r.get(f"{meth}{suffix}_tflops", 0.0) for r in rows]
      ax.bar(x + i * width, vals, width, label=meth.replace("_", " "), color=COLORS[meth])
    ax.set_xticks(x + 0.4 - width / 2, [r["shape"] for r in rows], rotation=15)
    ax.set_ylabel("useful TFLOP/s")
    ax.set_title(f"sparse attention {title} (H 32, Hkv 8, D 128, bf16)")
    ax.legend(fontsize=8)
  plots.save(fig, path)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--configs", default=",".join(CONFIGS))
  ap.add_argument("--bwd-configs", default=",".join(BWD_CONFIGS))
  ap.add_argument("--no-backward", action="store_true")
  args = ap.parse_args()
  configs = {c: CONFIGS[c] for c in args.configs.split(",")}
  bwd_configs = {c: BWD_CONFIGS[c] for c in args.bwd_configs.split(",")}
  rows = []
  print(f"device {device_name()} jax {jax.__version__}", flush=True)
  for name in args.shapes.split(","):
    row = bench_shape(name, *SHAPES[name], configs, bwd_configs, not args.no_backward)
    rows.append(row)
    print(row, flush=True)
  print_tables(rows)
  out = out_dir()
  write_json(os.path.join(out, "sparse_attention.json"), {"H": H, "Hkv": G, "D": D, "rows": rows})
  plot(rows, os.path.join(out, "sparse_attention.png"))


if __name__ == "__main__":
  main()
