"""Parameter initialisation with each group of alike random draws made in one loop.

A fresh model's init program draws every weight matrix apart: at the 0.6b recipe, 197
normal draws of 1-156M elements, each (a threefry hash and the normal transform) compiled
by XLA into kernels of its own. That program took 62-90 s to compile on an H100 and ran in
0.02 s (BENCHMARKS.md, session 33). Drawing the same matrices with the same keys in one
loop per (shape, dtype, scale) gives the same values (a key's draw does not depend on the
others drawn beside it) from a program that compiles each group's draw once: on the CPU
the 0.6b init program went from 2,947 fusions to 1,679 and from 15.1 to 10.0 s of compile
(``python -m benchmarks.init_time``). What is left is Flax's key per parameter (one
``fold_in`` of the parameter's path each, 338 at 0.6b, ~1,600 small fusions on the CPU).

* :func:`normal` is ``jax.nn.initializers.normal`` that, inside :func:`grouped_draws`,
  records its key and returns a placeholder instead of drawing;
* :func:`grouped_draws` runs a Flax ``init`` that way, then draws each group in one loop
  over its keys and puts the values where the placeholders were.

Outside :func:`grouped_draws` :func:`normal` draws at once, as the plain initializer.
"""
from __future__ import annotations

import contextvars
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging

# the draws deferred by the innermost grouped_draws: [(placeholder, key, shape, dtype, stddev)]
_DEFERRED: contextvars.ContextVar = contextvars.ContextVar("msa_jax_deferred_draws",
                                                           default=None)


def normal(stddev: float):
  """``jax.nn.initializers.normal(stddev)``; inside :func:`grouped_draws` the draw is
  deferred (a zero placeholder is returned and the key recorded)."""
  plain = jax.nn.initializers.normal(stddev)

  def init(key, shape, dtype=jnp.float32):
    deferred = _DEFERRED.get()
    if deferred is None:
      return plain(key, shape, dtype)
    placeholder = jnp.zeros(shape, dtype)
    deferred.append((placeholder, key, tuple(shape), jnp.dtype(dtype), stddev))
    return placeholder
  return init


def grouped_draws(init_fn: Callable[[], Any]) -> Any:
  """``init_fn()`` (e.g. ``lambda: model.init(rng, ids)``) with :func:`normal`'s draws made
  in one loop per (shape, dtype, stddev): the same values, bit for bit, as calling
  ``init_fn()`` alone (each jitted).

  Each placeholder must reach ``init_fn``'s result unchanged (a parameter created inside a
  lifted transform such as ``nn.remat`` or ``nn.scan`` leaves it as another array): if one
  does not, the grouping is abandoned with a warning and ``init_fn()`` runs again,
  drawing each parameter alone.
  """
  deferred = []
  token = _DEFERRED.set(deferred)
  try:
    out = init_fn()
  finally:
    _DEFERRED.reset(token)
  if not deferred:
    return out
  index = {id(entry[0]): i for i, entry in enumerate(deferred)}
  found = set()

  def find(leaf):
    if id(leaf) in index:
      found.add(index[id(leaf)])
    return leaf
  jax.tree.map(find, out)
  if len(found) != len(deferred):
    logging.warning("grouped_draws: %d of %d deferred parameter draws did not reach init's "
                    "result unchanged (a lifted transform?); drawing each alone instead",
                    len(deferred) - len(found), len(deferred))
    return init_fn()
  groups: dict[tuple, list[int]] = {}
  for i, (_, _, shape, dtype, stddev) in enumerate(deferred):
    groups.setdefault((shape, dtype, stddev), []).append(i)
  drawn = [None] * len(deferred)
  for (shape, dtype, stddev), members in groups.items():
    keys = jnp.stack([deferred[i][1] for i in members])
    draw = jax.nn.initializers.normal(stddev)
    # a loop over the keys, not a vmap: XLA would fuse a vmapped draw into each member's
    # slice, compiling the draw once per member again
    values = jax.lax.map(lambda k, s=shape, t=dtype, d=draw: d(k, s, t), keys)
    for j, i in enumerate(members):
      drawn[i] = values[j]
  return jax.tree.map(lambda leaf: drawn[index[id(leaf)]] if id(leaf) in index else leaf,
                      out)
