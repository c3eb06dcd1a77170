r"""The document stream's attention at the training recipes' shapes: many short causal
sequences (the 0.6b step: 5,216 documents of 104-token slots a layer, 16 query heads, 8
kv heads, D 128), forward and forward + backward, against their byte and FLOP floors.

In the 0.6b step on the H200 (BENCHMARKS.md, 2026-12-05) the Pallas attention took 417 ms
of 4,189, nearly all of it the documents'. Two floors, each measured in the same run:
bytes over the read bandwidth (the forward reads q, k, v and writes o; forward + backward
also reads dO and writes dq, dk, dv; the kernels read q, k, v and o again: the floor counts
each array once), and the FLOPs the short kernels' tiles multiply over the measured bf16
matmul rate (:func:`tile_flops`: whole ``[64, 128]`` tiles, masked halves included, the
backward recomputing the logits in its dQ and dK/dV passes; at the 0.6b shape ~0.8 of the
bytes' time for forward + backward, ~0.35 for the forward). ``x floor`` is against the
larger of the two. The documents' own causal FLOPs (:func:`useful_flops`) are ~0.19 of
the tiles'. The tilings were tuned on long sequences (M 4096, S 8192), where one
program streams many K/V tiles; here each (document, head) is one or two tiles, so this
times every forward and backward tiling given (``sparse_attention.BlockSizes``, pad-free as
the recipes run), the XLA reference and cuDNN's causal attention on the same documents
(``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)``: a baseline,
over the slots' whole 104 rows; a tiling or baseline that fails to compile is reported,
not fatal). Each result is checked against the XLA reference first.

Run: python -m benchmarks.doc_attention [--shape 0.6b|4b] [--docs N] [--fwd CFG,...]
[--bwd CFG,...] [--kernel_times]; prints a table and writes ``doc_attention.json`` to ``$OUT`` (or
benchmarks/results).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from benchmarks import (attempt, device_name, gpu_kernel_times, out_dir, read_bandwidth_gbs,
                        time_ms, write_json)
from msa_jax import metrics
from pallas_kernels import sparse_attention as sa
from pallas_kernels import sparse_attention_short as short

SLOT = 104
SHAPES = {  # recipe: (documents a layer at batch 32 / 8, query heads, kv heads, head dim)
    "0.6b": (5216, 16, 8, 128),
    "4b": (1304, 32, 8, 128),
}
FWD = {   # forward tilings (the backward's: the defaults)
    "ws_q64k128s2": sa.BlockSizes(block_q=64, block_kv=128, stages=2, warp_specialized=True),
    "q64k64s2": sa.BlockSizes(block_q=64, block_kv=64, stages=2, warp_specialized=False),
    "q128k64s2": sa.BlockSizes(block_q=128, block_kv=64, stages=2, warp_specialized=False),
    "q128k128s1": sa.BlockSizes(block_q=128, block_kv=128, stages=1, warp_specialized=False),
    # sparse_attention_short (2 items in flight: 3 would need ~257 KB of SMEM at D 128)
    "short_persistent": sa.BlockSizes(short_persistent=True),
}
BWD = {   # backward tilings (the forward's: the default)
    "b64x64s2": sa.BlockSizes(bwd_block_q=64, bwd_block_kv=64, bwd_stages=2),
    "b128x64s2": sa.BlockSizes(bwd_block_q=128, bwd_block_kv=64, bwd_stages=2),
    "b64x128s2": sa.BlockSizes(bwd_block_q=64, bwd_block_kv=128, bwd_stages=2),
    "b128x128s1": sa.BlockSizes(bwd_block_q=128, bwd_block_kv=128, bwd_stages=1),
    # the recipes' persistent forward with the tiled backward (b64x64s2), then with
    # sparse_attention_short_bwd's persistent dQ and dK/dV
    "short_fwd": sa.BlockSizes(short_persistent=True),
    "short_fwd_bwd": sa.BlockSizes(short_persistent=True, short_persistent_bwd=True),
}


def make_inputs(docs: int, heads: int, kv_heads: int, d: int, rows: int = SLOT, seed: int = 0):
  """q ``[docs, rows, H, D]``, k/v ``[docs, rows, Hkv, D]`` (bf16), their mask (each
  document 70-100 % of its slot, as the kv task's), and a cotangent ``dO``."""
  ks = jax.random.split(jax.random.key(seed), 5)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (docs, rows, heads, d), bf)
  k = jax.random.normal(ks[1], (docs, rows, kv_heads, d), bf)
  v = jax.random.normal(ks[2], (docs, rows, kv_heads, d), bf)
  lengths = jax.random.randint(ks[3], (docs,), int(0.7 * rows), rows + 1)
  mask = jnp.arange(rows)[None, :] < lengths[:, None]
  dout = jax.random.normal(ks[4], (docs, rows, heads, d), bf)
  return (q, k, v, mask), dout


def useful_flops(lengths, heads: int, d: int) -> dict:
  """The documents' own attention FLOPs: each query against the keys it sees (``L(L+1)/2``
  pairs a document of ``L`` tokens), two matmuls forward (``QKᵀ``, ``PV``) and five
  backward (the logits again, ``dP``, ``dV``, ``dK``, ``dQ``)."""
  pairs = sum(int(n) * (int(n) + 1) // 2 for n in lengths)
  fwd = 2 * 2 * d * heads * pairs
  return {"fwd": fwd, "fb": fwd + fwd * 5 // 2}


def tile_flops(docs: int, heads: int, d: int, rows: int = SLOT) -> dict:
  """FLOPs the short kernels' tiles multiply: ``m`` (rows padded to whole 64-row blocks,
  at most 128) keys a tile; per (document, head) the forward takes each 64-query block
  against all ``m`` keys (2 matmuls), the dQ pass the same (3), the dK/dV pass each 64-key
  block against every 64-query block (4)."""
  b = short.BLOCK_Q
  m = -(-rows // b) * b
  blocks = m // b
  fwd = docs * heads * blocks * 2 * (2 * b * m * d)
  dq = docs * heads * blocks * 3 * (2 * b * m * d)
  dkv = docs * heads * blocks * blocks * 4 * (2 * b * b * d)
  return {"fwd": fwd, "fb": fwd + dq + dkv}


def _forward_backward(f):
  """jit of ``(dout, q, k, v) -> (dq, dk, dv)`` through ``f(q, k, v)``'s VJP."""
  def run(dout, q, k, v):
    _, pull = jax.vjp(f, q, k, v)
    return pull(dout)
  return jax.jit(run)


def _rel(a, ref) -> float:
  a, ref = a.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.linalg.norm(a - ref) / jnp.linalg.norm(ref))


def measure(args, dout, fwd_cfgs: dict, bwd_cfgs: dict, interpret=None,
            kernel_times: bool = False) -> dict:
  """Times and errors of every method on these inputs (see the module docstring);
  ``kernel_times``: each Pallas forward's and forward + backward's kernels too (profiler
  device time, µs a call: the delta pass, dQ, dK/dV and the forward apart)."""
  q, k, v, mask = args
  row = {}
  # interpreted (a CPU check of the rows, not a timing): one call a time, not 17
  timed = (functools.partial(time_ms, warmup=0, iters=1, reps=1) if interpret
           else functools.partial(time_ms, iters=3))
  attend = lambda impl, bs=None: (lambda q_, k_, v_: sa.attend(   # noqa: E731
      q_, k_, v_, mask, implementation=impl, block_sizes=bs, interpret=interpret))
  ref_fwd = jax.jit(attend("xla"))
  ref_fb = _forward_backward(attend("xla"))
  out_ref, grads_ref = ref_fwd(q, k, v), ref_fb(dout, q, k, v)
  row["xla"] = {"fwd_ms": timed(ref_fwd, q, k, v),
                "fb_ms": timed(ref_fb, dout, q, k, v)}
  if interpret is None:
    # cuDNN's mask is causal only: its rows past a document's end attend padding too, so
    # its error is taken over the documents' own rows (what the model reads)
    keep = mask[:, :, None, None]
    cudnn = lambda q_, k_, v_: jax.nn.dot_product_attention(  # noqa: E731
        q_, k_, v_, is_causal=True, implementation="cudnn")
    r = row["cudnn"] = {}
    attempt(r, "fwd_err", lambda: _rel(jnp.where(keep, jax.jit(cudnn)(q, k, v), 0),
                                       jnp.where(keep, out_ref, 0)))
    attempt(r, "fwd_ms", lambda: timed(jax.jit(cudnn), q, k, v))
    attempt(r, "fb_ms", lambda: timed(_forward_backward(cudnn), dout, q, k, v))
  for name, bs in fwd_cfgs.items():
    fn = jax.jit(attend("pallas", bs))
    r = row[f"pallas_fwd_{name}"] = {}
    attempt(r, "fwd_err", lambda fn=fn: _rel(fn(q, k, v), out_ref))
    if "fwd_err" in r:
      attempt(r, "fwd_ms", lambda fn=fn: timed(fn, q, k, v))
      if kernel_times:
        attempt(r, "fwd_kernels_us", lambda fn=fn: gpu_kernel_times(fn, q, k, v, calls=1))
  for name, bs in bwd_cfgs.items():
    fb = _forward_backward(attend("pallas", bs))
    r = row[f"pallas_bwd_{name}"] = {}
    attempt(r, "grad_err", lambda fb=fb: max(
        _rel(a, w) for a, w in zip(fb(dout, q, k, v), grads_ref)))
    if "grad_err" in r:
      attempt(r, "fb_ms", lambda fb=fb: timed(fb, dout, q, k, v))
      if kernel_times:
        attempt(r, "fb_kernels_us", lambda fb=fb: gpu_kernel_times(fb, dout, q, k, v, calls=1))
  return row


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shape", default="0.6b", choices=sorted(SHAPES))
  p.add_argument("--docs", type=int, default=0, help="documents (default: the recipe's)")
  p.add_argument("--heads", default="", help="H,Hkv,D instead of the recipe's (small runs)")
  p.add_argument("--fwd", default=",".join(FWD), help="forward tilings: " + ",".join(FWD))
  p.add_argument("--bwd", default=",".join(BWD), help="backward tilings: " + ",".join(BWD))
  p.add_argument("--no_pad_free", action="store_true",
                 help="the kernels' operands padded to whole tiles (the recipes run pad-free)")
  p.add_argument("--interpret", action="store_true",
                 help="interpret the Pallas kernels (a CPU check of this script)")
  p.add_argument("--read_bytes", type=int, default=4 << 30)
  p.add_argument("--kernel_times", action="store_true",
                 help="also each Pallas row's kernels' device time (profiler; a GPU only)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  docs, h, g, d = SHAPES[args.shape]
  docs = args.docs or docs
  if args.heads:
    h, g, d = (int(x) for x in args.heads.split(","))
  pad_free = not args.no_pad_free
  fwd_cfgs = {c: dataclasses.replace(FWD[c], pad_free=pad_free) for c in args.fwd.split(",") if c}
  bwd_cfgs = {c: dataclasses.replace(BWD[c], pad_free=pad_free) for c in args.bwd.split(",") if c}
  inputs, dout = make_inputs(docs, h, g, d)
  bw = read_bandwidth_gbs(args.read_bytes)
  rate = metrics.matmul_rate()
  q_bytes, kv_bytes = docs * SLOT * h * d * 2, docs * SLOT * g * d * 2
  tiles_flops = tile_flops(docs, h, d)
  own_flops = useful_flops(inputs[3].sum(axis=1).tolist(), h, d)
  byte_ms = {"fwd_ms": (2 * q_bytes + 2 * kv_bytes) / bw / 1e6,          # q, k, v in; o out
             "fb_ms": (4 * q_bytes + 4 * kv_bytes) / bw / 1e6}           # + dO in, dq/dk/dv out
  flop_ms = {"fwd_ms": tiles_flops["fwd"] / rate * 1e3, "fb_ms": tiles_flops["fb"] / rate * 1e3}
  floors = {key: max(byte_ms[key], flop_ms[key]) for key in byte_ms}
  print(f"device {device_name()} jax {jax.__version__}: {docs} documents x {SLOT} rows, H {h}, "
        f"Hkv {g}, D {d}, pad-free {pad_free}; read {bw:.0f} GB/s, bf16 matmul "
        f"{rate / 1e12:.0f} TFLOP/s; floors (bytes | tile FLOPs): forward "
        f"{byte_ms['fwd_ms']:.3f} | {flop_ms['fwd_ms']:.3f} ms, forward + backward "
        f"{byte_ms['fb_ms']:.3f} | {flop_ms['fb_ms']:.3f} ms; the documents' own FLOPs "
        f"{own_flops['fb'] / tiles_flops['fb']:.2f} of the tiles'", flush=True)
  row = measure(inputs, dout, fwd_cfgs, bwd_cfgs,
                interpret=True if args.interpret else None, kernel_times=args.kernel_times)
  print(f"{'method':26} {'fwd ms':>9} {'x floor':>8} {'fwd+bwd ms':>11} {'x floor':>8}  error")
  for name, r in row.items():
    cells = []
    for key in ("fwd_ms", "fb_ms"):
      if key in r:
        r[key.replace("_ms", "_x_floor")] = r[key] / floors[key]
        cells.append(f"{r[key]:{9 if key == 'fwd_ms' else 11}.3f} {r[key] / floors[key]:8.2f}")
      else:
        cells.append(" " * (18 if key == "fwd_ms" else 20))
    err = {k: v for k, v in r.items() if k.endswith("_err") or k.endswith("_error")}
    print(f"{name:26} {' '.join(cells)}  {err}")
    for key in ("fwd_kernels_us", "fb_kernels_us"):
      if r.get(key):
        kernels = "; ".join(f"{n} {us:.0f}" for n, us in r[key][:8])
        print(f"    {key[:-11]} kernels (µs): {kernels}")
  result = {"device": device_name(), "jax": jax.__version__, "shape": args.shape,
            "docs": docs, "rows_per_doc": SLOT, "heads": h, "kv_heads": g, "head_dim": d,
            "pad_free": pad_free, "read_gbs": bw, "matmul_tflops": rate / 1e12,
            "floors": floors, "byte_floors": byte_ms, "flop_floors": flop_ms,
            "tile_flops": tiles_flops, "useful_flops": own_flops, "methods": row}
  path = args.out or os.path.join(out_dir(), "doc_attention.json")
  write_json(path, result)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
