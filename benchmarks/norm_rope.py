r"""The q/k norms and RoPE at the 0.6b step's shape, forward and backward: each way of
differentiating them (``model.rms_norm_vjp``, ``model.qk_norm_rope_vjp``).

In the 0.6b training step on the H200 (16K memory tokens, batch 32; BENCHMARKS.md) the q/k
norms' backward took 271 ms of a 4,189 ms step and the norms' and RoPE's converts 202 more:
JAX's backward passes RoPE's float32 cotangent to the norm's reductions as a float32 array
of q's size. This times one layer's q path (``[5216, 104, 16, 128]`` bf16 by default; k is
half of it) six ways (timed autodiff, pallas, fused_bf16, fused, lean, tables: a run cut
short keeps the first):

* ``autodiff``: JAX's backward of the norm (``layers.rms_norm``) and of RoPE;
* ``lean``: the norm's hand-written backward (``layers.rms_norm_lean_vjp``), RoPE's by JAX;
* ``fused``: one pass forward and one backward for both (``layers.norm_rope_fused_vjp``);
* ``fused_bf16``: the same with RoPE's cotangent written once in bf16
  (``layers.norm_rope_fused_bf16_vjp``);
* ``pallas``: ``fused_bf16``'s math through the Mosaic GPU kernels of
  ``pallas_kernels/norm_rope.py`` (``layers.norm_rope_pallas_vjp``; each pass reads its
  operands once; off a GPU it is ``fused_bf16``);
* ``tables``: ``autodiff`` reading RoPE's cos/sin computed beforehand
  (``layers.RopeTables``, what ``ModelConfig.rope_tables`` does once a stream; alone, the
  forward from positions took 104 ms against 8.7 for forward and backward on an H100,
  2026-12-05: if computing the angles in every pass is what costs, this row says so);

forward plus backward in one program (what the step runs once a layer, the forward again
under remat; timed first), and the four forwards alone (``layers.norm_rope``, the fused
methods' ``layers.norm_rope_one_pass``, ``norm_rope`` reading the tables, and the
``pallas`` method's kernel), against
floors from a pure read in the same run: the forward reads ``x`` and writes ``y``; with the
backward it also reads the cotangent and writes ``dx`` (4 arrays of the activation's size,
the least any order of passes moves).
Each method's forward is compared with ``autodiff``'s (the same value: ``fused`` computes it
in one pass, ``layers.norm_rope_one_pass``, without rounding the norm's output to bf16;
inside a program with its backward XLA may skip that rounding too),
its ``dx`` and scale gradient with float32 autodiff from the same bf16 inputs (the errors
printed), before timing.

On a GPU it also times (and compiles, the time printed) the ``pallas`` method's two kernels
alone, tables given, in each ``--kernel_configs`` tiling (heads a pipeline step, stages,
programs an SM); ``--kernels_only`` times just those.

Run: python -m benchmarks.norm_rope [--tokens 542464] [--heads 16] [--head_dim 128]
[--kernel_configs 1:2:1,2:2:1,1:3:1] [--kernels_only]
Prints a table and writes ``norm_rope.json`` to ``$OUT`` (or benchmarks/results).
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import out_dir, read_bandwidth_gbs, time_ms, write_json
from msa_jax import layers

SLOT = 104          # the 0.6b recipe's document slot: tokens are [tokens / 104, 104]
METHODS = {"autodiff": ("autodiff", "autodiff"), "pallas": ("autodiff", "pallas"),
           "fused_bf16": ("autodiff", "fused_bf16"), "fused": ("autodiff", "fused"),
           "lean": ("lean", "autodiff"), "tables": ("autodiff", "tables")}
# method: (rms_norm_vjp, qk_norm_rope_vjp); "tables": autodiff reading RoPE's cos/sin
# (layers.RopeTables, computed beforehand by their own program) as the model does with
# ModelConfig.rope_tables, instead of computing the angles (two fmods a position) in every
# pass over the heads; "pallas": fused_bf16's math through pallas_kernels/norm_rope.py's
# Mosaic GPU kernels (on a GPU; elsewhere fused_bf16's own code)


def rope_tables(pos, head_dim: int, theta: float = 1e6) -> layers.RopeTables:
  """:func:`layers.rope_tables`, materialised by their own program."""
  return jax.jit(layers.rope_tables, static_argnums=(1, 2))(pos, head_dim, theta)


def programs(method: str, theta: float = 1e6, dtype=jnp.bfloat16):
  """jitted ``forward(x, scale, rope) -> y`` and ``step(x, scale, rope, g) -> (y, dx,
  dscale)`` of the q/k norm + RoPE differentiated by ``method`` (``METHODS``), computing
  in ``dtype``; ``rope`` is the positions, or for ``"tables"`` the :func:`rope_tables`."""
  norm_vjp, rope_vjp = METHODS[method]
  norm = layers.RMSNorm(1e-6, dtype, vjp=norm_vjp,
                        rope_vjp="autodiff" if rope_vjp == "tables" else rope_vjp)

  def forward(x, scale, rope):   # rope: positions, or RopeTables for "tables"
    return norm.apply({"params": {"scale": scale}}, x, rope, theta)

  def step(x, scale, rope, g):
    y, pull = jax.vjp(lambda xx, ss: forward(xx, ss, rope), x, scale)
    return (y, *pull(g))
  return jax.jit(forward), jax.jit(step)


def kernel_rows(x, g, scale, tables, floors, configs: str) -> list[dict]:
  """The ``pallas`` method's kernels alone (``pallas_kernels.norm_rope`` forward and
  backward in one program, the tables given) for each ``heads:stages:programs_per_sm`` of
  ``configs``: their share of the ``pallas`` row, and what grouping heads under one cos/sin
  box, a deeper pipeline or more programs an SM buy. A GPU only."""
  from pallas_kernels import _platform
  if not _platform.on_gpu():
    return []
  from pallas_kernels import norm_rope as kernels
  sms = getattr(jax.devices()[0], "core_count", 0)
  rows = []
  for config in (c for c in configs.split(",") if c):
    hps, stages, per_sm = (int(v) for v in config.split(":"))
    if x.shape[-2] % hps:
      continue
    kw = dict(heads_per_step=hps, stages=stages, blocks=sms * per_sm)

    def step(x, g, scale, cos, sin, kw=kw):
      y = kernels.forward(x, scale, cos, sin, 1e-6, **kw)
      return (y, *kernels.backward(x, g, scale, cos, sin, 1e-6, True, **kw))
    row = {"heads_per_step": hps, "stages": stages, "programs_per_sm": per_sm}
    operands = (x, g, scale, tables.cos, tables.sin)
    try:
      t0 = time.perf_counter()   # the two kernels' compile (Mosaic GPU, then ptxas)
      compiled = jax.jit(step).lower(*operands).compile()
      row["compile_s"] = time.perf_counter() - t0
      ms = time_ms(compiled, *operands, iters=5)
    except Exception as e:  # noqa: BLE001 (e.g. more shared memory than an SM has)
      rows.append({**row, "error": f"{type(e).__name__}: {e}"[:300]})
      print(f"kernels alone, {config}: {rows[-1]['error']}", flush=True)
      continue
    rows.append({**row, "step_ms": ms, "step_x_floor": ms / floors["step"]})
    print(f"kernels alone, {hps} head(s) a step, {stages} stages, {per_sm} program(s) an SM: "
          f"{ms:8.3f} ms, {ms / floors['step']:.2f} x the floor (compiled in "
          f"{row['compile_s']:.1f} s)", flush=True)
  return rows


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tokens", type=int, default=5216 * SLOT)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--read_bytes", type=int, default=4 << 30,
                 help="size of the read-bandwidth probe (the floors' bandwidth)")
  p.add_argument("--kernel_configs", default="1:2:1,2:2:1,1:3:1",
                 help="the kernels alone (a GPU only), each heads a pipeline step:pipeline "
                      "stages:programs an SM")
  p.add_argument("--kernels_only", action="store_true",
                 help="time (and compile) the kernels alone: no methods, no forwards")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  slots = -(-args.tokens // SLOT)
  shape = (slots, SLOT, args.heads, args.head_dim)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  scale = jnp.asarray(rng.normal(1.0, 0.3, size=(args.head_dim,)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(SLOT, dtype=jnp.int32), shape[:2])
  bw = read_bandwidth_gbs(args.read_bytes)
  act_bytes = x.size * 2
  floors = {"forward": 2 * act_bytes / bw / 1e6, "step": 4 * act_bytes / bw / 1e6}
  print(f"{jax.devices()[0]}: x {list(shape)} bf16 ({act_bytes / 1e9:.2f} GB); read "
        f"{bw:.0f} GB/s; floors: forward {floors['forward']:.3f} ms, forward + backward "
        f"{floors['step']:.3f} ms")
  methods = () if args.kernels_only else tuple(METHODS)
  if methods:
    print(f"{'method':10} {'fwd+bwd ms':>11} {'x floor':>8} {'dx err':>9} "
          f"{'dscale err':>10}  (errors against float32)")
    # the gradients' reference: the same bf16 inputs through float32 autodiff
    _, want_dx, want_dscale = programs("autodiff", dtype=jnp.float32)[1](
        x.astype(jnp.float32), scale, pos, g.astype(jnp.float32))
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))  # noqa: E731
  rows, y_autodiff = [], None
  # forward + backward first: what the step runs (the forward alone is slow to compile
  # and run at the real shape; a run cut short keeps these rows)
  tables = rope_tables(pos, args.head_dim)
  for method in methods:
    step = programs(method)[1]
    rope = tables if method == "tables" else pos
    y, dx, dscale = step(x, scale, rope, g)
    y_autodiff = y if y_autodiff is None else y_autodiff
    row = {"method": method,
           "y_rel_diff_autodiff": rel(y.astype(jnp.float32), y_autodiff.astype(jnp.float32)),
           "dx_rel_err_f32": rel(dx.astype(jnp.float32), want_dx),
           "dscale_rel_err_f32": rel(dscale, want_dscale),
           "step_ms": time_ms(step, x, scale, rope, g, iters=5)}
    row["step_x_floor"] = row["step_ms"] / floors["step"]
    rows.append(row)
    print(f"{method:10} {row['step_ms']:11.3f} {row['step_x_floor']:8.2f} "
          f"{row['dx_rel_err_f32']:9.2e} {row['dscale_rel_err_f32']:10.2e}", flush=True)
  krows = kernel_rows(x, g, scale, tables, floors, args.kernel_configs)
  # four forwards: norm_rope (autodiff, lean, tables from positions), norm_rope_one_pass
  # (fused, fused_bf16), and norm_rope with the tables given
  forwards = {}
  for name, method, rope in (() if args.kernels_only else (
      ("norm_rope", "autodiff", pos), ("one_pass", "fused", pos),
      ("tables", "tables", tables), ("pallas", "pallas", pos))):
    forwards[name] = time_ms(programs(method)[0], x, scale, rope, iters=5)
    print(f"forward alone, {name:9}: {forwards[name]:8.3f} ms, "
          f"{forwards[name] / floors['forward']:.2f} x its floor", flush=True)
  result = {"shape": list(shape), "read_gbs": bw, "floor_forward_ms": floors["forward"],
            "floor_step_ms": floors["step"], "forward_ms": forwards, "rows": rows,
            "kernel_rows": krows}
  path = args.out or os.path.join(out_dir(), "norm_rope.json")
  write_json(path, result)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
