"""Where a fresh run's state initialisation goes: the init program's trace, compile and run.

On an H100 (2026-12-05) the 0.6b recipe's init program, each weight matrix drawn apart,
compiled for 62-90 s (whatever the key implementation) and ran in 0.02 s: XLA compiled each
of its 197 normal draws into kernels of its own. The trainer now draws each group of alike
matrices in one loop (``msa_jax.batched_init``; the same values). This times the init
program both ways, ``grouped`` (the trainer's: ``TrainSetup``'s init model, without remat)
and ``per_param`` (every draw apart, as before), for each key implementation asked
(``threefry2x32`` is JAX's default and the trainer's; ``rbg``/``unsafe_rbg``: XLA's
RngBitGenerator), each compiled fresh (no compilation cache).

  python -m benchmarks.init_time --variants 0.6b --impls threefry2x32

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
  p.add_argument("--impls", default="threefry2x32",
                 help="jax.random key implementations to draw the parameters with")
  p.add_argument("--tiny", action="store_true", help="the recipes' structure at tiny sizes")
  p.add_argument("--out", default="", help="JSON path (default: $OUT or benchmarks/results/)")
  return p.parse_args(argv)


def time_init(setup, impl: str, seed: int = 0, grouped: bool = True):
  """``(row, state)``: seconds to trace, compile and run the init program drawing from a
  key of ``impl`` (and the parameters' count), and the state it made. ``grouped``: the
  trainer's program (``setup.init_state(seed)``'s for ``threefry2x32``); else every
  parameter drawn apart (``model.init`` through the remat model, as before grouping)."""
  from msa_jax import sharding
  from msa_jax.train_step import TrainState
  ids = jnp.zeros((1, 8), jnp.int32)
  if grouped:
    from msa_jax.train_step import init_train_state
    init_model = setup.model.clone(config=setup.model_cfg.replace(kernels="xla",
                                                                  remat_policy="none"))
    init = functools.partial(init_train_state, init_model, setup.tx)
  else:
    init_model = setup.model.clone(config=setup.model_cfg.replace(kernels="xla"))

    def init(key, ids_):
      params = init_model.init(key, ids_)["params"]
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=setup.tx.init(params))
  fn = jax.jit(lambda k: nn.unbox(init(k, ids)), out_shardings=setup.state_shardings)
  key = jax.random.key(seed, impl=impl)
  row = {"impl": impl, "draws": "grouped" if grouped else "per_param"}
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
  row["fusions"] = compiled.as_text().count(" fusion(")
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
        for grouped in (True, False):
          row = {"variant": variant, **time_init(setup, impl, grouped=grouped)[0]}
          rows.append(row)
          print(f"{variant:5s} {impl:13s} {row['draws']:9s} trace {row['trace_s']:6.1f} s  "
                f"compile {row['compile_s']:6.1f} s  run {row['run_s']:6.2f} s  "
                f"{row['fusions']:5d} fusions  ({row['params'] / 1e9:.2f}B parameters)",
                flush=True)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_was)
  result = {"rows": rows}
  out = args.out or os.path.join(out_dir(), f"init_time_{jax.default_backend()}.json")
  write_json(out, result)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
