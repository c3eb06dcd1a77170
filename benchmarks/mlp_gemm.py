r"""The MLP's GEMMs at the 0.6b step's shapes: what cuBLAS, a merged gate/up GEMM and a
Pallas Mosaic GPU GEMM reach, against the measured matmul rate (issue 10).

The 0.6b step spends ~60 % of its device time in GEMMs (725 TFLOP/s on an H100 against
~900 on a large square GEMM) and ~30 % in elementwise passes between them, the SwiGLU
product and its backward among the largest (BENCHMARKS.md). Fusing SwiGLU into a GEMM's
epilogue needs a GEMM we write ourselves, which pays only if it runs near cuBLAS at these
shapes (``tokens x 1,024 x 3,072``: a short K). This measures, one layer's MLP forward at
``--tokens`` rows:

* ``cublas_two``: ``silu(x @ Wg) * (x @ Wu)`` as the model writes it (two GEMMs, XLA's
  elementwise product after them);
* ``cublas_merged``: the same from one GEMM against ``[Wg | Wu]`` (N 6,144), split after;
* ``gemm_gate``: ``x @ Wg`` alone through cuBLAS (the rate of one GEMM of this shape);
* ``pallas_gemm[tm,tn,stages]``: ``x @ [Wg | Wu]`` through JAX's own Hopper Pallas GEMM
  (``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``, the library's example kernel,
  used as is: the rate a warp-specialised Pallas GEMM reaches here);
* ``down``: ``h @ Wd`` (K 3,072) through cuBLAS;

each with its TFLOP/s and the ratio of its time to the FLOP floor (FLOPs over a large square
bf16 GEMM's rate measured in the same run) and to the byte floor (bytes over a pure read's
rate). GPU only (the Pallas GEMM compiles for Hopper).

Run: python -m benchmarks.mlp_gemm [--tokens 65536] [--hidden 1024] [--inter 3072]
Prints a table and writes ``mlp_gemm_<tokens>.json`` to ``$OUT`` (or benchmarks/results).
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

from benchmarks import attempt, out_dir, read_bandwidth_gbs, time_ms, write_json
from msa_jax import metrics


def pallas_gemm(tile_m: int, tile_n: int, stages: int):
  """``a @ b`` through JAX's example Hopper GEMM with this tiling (raises off a Hopper GPU
  or where the tiling does not fit)."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
  cfg = hm.TuningConfig(tile_m=tile_m, tile_n=tile_n, tile_k=64, max_concurrent_steps=stages,
                        epi_tile_n=64, epi_tile_m=64, grid_minor_dim=hm.MatmulDimension.N,
                        grid_tile_width=8, wg_dimension=hm.MatmulDimension.N)
  return jax.jit(lambda a, b: hm.matmul(a, b, None, cfg))


def swiglu_two(x, wg, wu):
  """The model's MLP input path: two GEMMs, then XLA's SwiGLU product."""
  return jax.nn.silu(x @ wg) * (x @ wu)


def gemm(a, b):
  return a @ b


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tokens", type=int, default=65536)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--inter", type=int, default=3072)
  p.add_argument("--tilings", default="128x128x4,128x256x4,256x128x4,128x128x6",
                 help="Pallas GEMM tilings tile_m x tile_n x stages (each warpgroup's tile)")
  args = p.parse_args(argv)
  t, d, i = args.tokens, args.hidden, args.inter
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
  wg = (jax.random.normal(keys[1], (d, i), jnp.float32) / d ** 0.5).astype(jnp.bfloat16)
  wu = (jax.random.normal(keys[2], (d, i), jnp.float32) / d ** 0.5).astype(jnp.bfloat16)
  wd = (jax.random.normal(keys[3], (i, d), jnp.float32) / i ** 0.5).astype(jnp.bfloat16)
  wgu = jnp.concatenate([wg, wu], axis=1)
  h = jax.jit(swiglu_two)(x, wg, wu)
  gu = jax.jit(gemm)(x, wgu)       # what the merged GEMMs compute: the Pallas GEMM's check
  rate, read_gbs = metrics.matmul_rate(), read_bandwidth_gbs()
  print(f"device {jax.devices()[0].device_kind}: bf16 GEMM {rate / 1e12:.1f} TFLOP/s, "
        f"read {read_gbs:.0f} GB/s; x [{t}, {d}], W [{d}, {i}]", flush=True)

  def swiglu_merged(x, wgu):
    gu = x @ wgu
    return jax.nn.silu(gu[:, :i]) * gu[:, i:]

  mlp_flops = 2 * t * d * 2 * i
  swiglu_bytes = 2 * (t * d + 2 * d * i + t * i)
  merged_bytes = 2 * (t * d + 2 * d * i + 2 * t * i)
  cases = {   # name: (builds the function, its args, FLOPs, least bytes moved, want or None)
      "cublas_two": (lambda: jax.jit(swiglu_two), (x, wg, wu), mlp_flops, swiglu_bytes, None),
      "cublas_merged": (lambda: jax.jit(swiglu_merged), (x, wgu), mlp_flops, swiglu_bytes,
                        None),
      "gemm_gate": (lambda: jax.jit(gemm), (x, wg), 2 * t * d * i, 2 * (t * d + d * i + t * i),
                    None),
      "gemm_merged": (lambda: jax.jit(gemm), (x, wgu), mlp_flops, merged_bytes, None),
      "down": (lambda: jax.jit(gemm), (h, wd), 2 * t * d * i, 2 * (t * i + d * i + t * d),
               None),
  }
  for tiling in filter(None, args.tilings.split(",")):
    tm, tn, st = (int(v) for v in tiling.split("x"))
    cases[f"pallas_gemm[{tiling}]"] = (lambda tm=tm, tn=tn, st=st: pallas_gemm(tm, tn, st),
                                        (x, wgu), mlp_flops, merged_bytes, gu)

  def run(build, fn_args, want):
    f = build()
    out = {"ms": time_ms(f, *fn_args)}
    if want is not None:   # against cuBLAS's product (both bf16: rounding apart)
      out["max_abs_err"] = float(jnp.max(jnp.abs(f(*fn_args).astype(jnp.float32)
                                                 - want.astype(jnp.float32))))
    return out

  rows = []
  for name, (build, fn_args, flops, nbytes, want) in cases.items():
    row = {"case": name, "tflop": flops / 1e12, "gb": nbytes / 1e9}
    attempt(row, "result", lambda: run(build, fn_args, want))
    row.update(row.pop("result", {}))
    if "ms" in row:
      row["tflops"] = flops / row["ms"] / 1e9
      row["x_flop_floor"] = row["ms"] / (flops / rate * 1e3)
      row["x_byte_floor"] = row["ms"] / (nbytes / read_gbs / 1e6)
      print(f"{name:28s} {row['ms']:8.3f} ms {row['tflops']:6.1f} TFLOP/s "
            f"{row['x_flop_floor']:5.2f} x FLOP floor {row['x_byte_floor']:5.2f} x byte floor"
            + (f" err {row['max_abs_err']:.3g}" if "max_abs_err" in row else ""), flush=True)
    else:
      print(f"{name:28s} failed: {row['result_error']}", flush=True)
    rows.append(row)
  payload = {"tokens": t, "hidden": d, "inter": i, "matmul_tflops": rate / 1e12,
             "read_gbs": read_gbs, "rows": rows}
  write_json(os.path.join(out_dir(), f"mlp_gemm_{t}.json"), payload)
  return payload


if __name__ == "__main__":
  main()
