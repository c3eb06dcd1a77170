"""Where a fresh run's state initialisation goes: the init program's trace, compile and run.

On the H200 the 0.6b recipe's state took 79-133 s to initialise before its first step
(``benchmarks/train_step.py``'s "state initialised in" line), longer than the training
step's own compile. The init program holds no matmuls (Flax traces the forward, and
everything but the parameters' random draws is dead); what it holds is one random draw per
parameter. This times ``TrainSetup``'s init program as the trainer builds it (``threefry``,
JAX's default key) and the same program drawing from other key implementations (``rbg``,
``unsafe_rbg``: XLA's RngBitGenerator), each compiled fresh (no compilation cache).

  python -m benchmarks.init_time --variants 0.6b --impls threefry2x32,rbg,unsafe_rbg

Prints a table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
from flax import linen as nn


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default="0.6b", help="recipe variants, comma-separated")
  p.add_argument("--impls", default="threefry2x32,rbg,unsafe_rbg",
                 help="jax.random key implementations to draw the parameters with")
  p.add_argument("--tiny", action="store_true", help="the recipes' structure at tiny sizes")
  p.add_argument("--out", default="", help="JSON path (default: $OUT or benchmarks/results/)")
  return p.parse_args(argv)


def time_init(setup, impl: str, seed: int = 0):
  """``(row, state)``: seconds to trace, compile and run the init program drawing from a
  key of ``impl`` (and the parameters' count), and the state it made; for
  ``threefry2x32`` the same program and state as ``setup.init_state(seed)``."""
  from msa_jax import sharding
  from msa_jax.train_step import init_train_state
  init_model = setup.model.clone(config=setup.model_cfg.replace(kernels="xla"))
  init_boxed = functools.partial(init_train_state, init_model, setup.tx)
  ids = jnp.zeros((1, 8), jnp.int32)
  fn = jax.jit(lambda k: nn.unbox(init_boxed(k, ids)), out_shardings=setup.state_shardings)
  key = jax.random.key(seed, impl=impl)
  row = {"impl": impl}
  with sharding.mesh_context(setup.mesh):
    t0 = time.perf_counter()
    lowered = fn.lower(key)
    row["trace_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = jax.block_until_ready(compiled(key))
    row["run_s"] = time.perf_counter() - t0
  row["params"] = sum(x.size for x in jax.tree.leaves(state.params))
  return row, state


def main(argv=None) -> dict:
  args = _parse(argv)
  from benchmarks import out_dir, write_json
  from benchmarks import train_step as ts
  from msa_jax import sharding, trainer
  cache_was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)   # every program compiled fresh
  rows = []
  try:
    for variant in args.variants.split(","):
      cfg = ts.recipe(variant, 16384, args.tiny, "1,-1,1")
      setup = trainer.TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape),
                                 trainer.resolve_model_config(cfg))
      for impl in args.impls.split(","):
        row = {"variant": variant, **time_init(setup, impl)[0]}
        rows.append(row)
        print(f"{variant:5s} {impl:13s} trace {row['trace_s']:6.1f} s  compile "
              f"{row['compile_s']:6.1f} s  run {row['run_s']:6.2f} s  "
              f"({row['params'] / 1e9:.2f}B parameters)", flush=True)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_was)
  result = {"rows": rows}
  out = args.out or os.path.join(out_dir(), f"init_time_{jax.default_backend()}.json")
  write_json(out, result)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
