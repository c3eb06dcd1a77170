r"""How far the float32 RoPE angle is from the exact one at the positions a global-RoPE
bank reaches (the question is numbered after all memory: 16.8M at 1024 × 16K, 99.9M at
6104 × 16K tokens).

  python -m benchmarks.rope_precision [--head_dim=32] [--theta=1e6]
      [--positions=16384,261760,4188160,16752640,99861440] [--out=DIR]

For each position P, the 64 positions below it, against the float64 angle ``p × ω`` (ω
the float32 frequencies the model uses, read as float64): the plain float32 product
``float32(p) × ω`` (transformers' and this project's computation before session 16) and
``msa_jax.layers.rope_angles`` (digits of the position, each reduced mod 2π from float64
constants). Reports the largest angle error in radians and how many of the D/2
frequencies are off by more than 0.1 rad. Writes ``rope_precision.json`` to ``--out``
(default ``$OUT`` or benchmarks/results). CPU or GPU: the arithmetic is the same.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax.layers import rope_angles, rope_inv_freq


def angle_error(angles_f32, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
  """``[N, D/2]`` absolute error in radians of float32 angles (as their cos/sin) against
  the float64 angles ``positions × inv_freq``, wrapped to [0, π]."""
  exact = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None]
  c = np.asarray(jnp.cos(angles_f32), np.float64)
  s = np.asarray(jnp.sin(angles_f32), np.float64)
  return np.abs(np.angle(np.exp(1j * exact) * (c - 1j * s)))


def float32_product_angles(positions, head_dim: int, theta: float):
  """``[N, D/2]`` angles as ``float32(p) × ω``: the computation ``rope_angles`` replaced
  (and transformers' own), the baseline here."""
  inv_freq = rope_inv_freq(head_dim, theta)
  return jnp.asarray(positions, jnp.float32)[:, None] * jnp.asarray(inv_freq)[None]


def measure(position: int, head_dim: int, theta: float, window: int = 64) -> dict:
  """The plain float32 product and ``rope_angles`` at the ``window`` positions below
  ``position``: the largest error and the frequencies off by more than 0.1 rad."""
  pos = np.arange(position - window, position, dtype=np.int64)
  inv_freq = rope_inv_freq(head_dim, theta)
  plain = float32_product_angles(pos, head_dim, theta)
  reduced = rope_angles(jnp.asarray(pos, jnp.int32), head_dim, theta)
  row = {"position": position}
  for name, angles in (("float32_product", plain), ("rope_angles", reduced)):
    err = angle_error(angles, pos, inv_freq)
    row[name] = {"max_error_rad": float(err.max()),
                 "frequencies_over_0.1_rad": int((err.max(0) > 0.1).sum())}
  return row


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--head_dim", type=int, default=32)
  ap.add_argument("--theta", type=float, default=1e6)
  ap.add_argument("--positions", default="16384,261760,4188160,16752640,99861440")
  ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
  args = ap.parse_args(argv)
  rows = [measure(int(p), args.head_dim, args.theta) for p in args.positions.split(",")]
  half = args.head_dim // 2
  print(f"| position | float32 product: max error (rad) | freqs > 0.1 rad (of {half}) "
        f"| rope_angles: max error (rad) | freqs > 0.1 rad |")
  print("|---:|---:|---:|---:|---:|")
  for r in rows:
    a, b = r["float32_product"], r["rope_angles"]
    print(f"| {r['position']:,} | {a['max_error_rad']:.3g} | {a['frequencies_over_0.1_rad']} "
          f"| {b['max_error_rad']:.3g} | {b['frequencies_over_0.1_rad']} |")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "rope_precision.json")
  with open(path, "w") as f:
    json.dump({"head_dim": args.head_dim, "theta": args.theta, "device": str(jax.devices()[0]),
               "rows": rows}, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
