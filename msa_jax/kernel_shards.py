"""One-device kernels inside a multi-device step: each device runs the kernel on its shard.

A Pallas (Mosaic GPU) kernel is an opaque custom call to XLA's SPMD partitioner, which
can place it only on whole arrays: inside a step sharded over several devices it gathers
the kernel's operands onto every device ("involuntary full rematerialization" in XLA's
log) and computes the whole batch on each, then slices the result back. The training
step's kernels (the attention, the q/k norm and RoPE) are independent across examples
and across heads, so they can run on each device's own rows instead:
:func:`per_shard` wraps them in ``jax.shard_map`` over the mesh the step is traced under
(``jax.set_mesh``, as the trainer does), with each operand's ``PartitionSpec`` taken from
the active logical axis rules (``flax.linen.logical_axis_rules``). A gradient flowing to
an operand that every shard shares (the norm's scale) is summed over the devices by
``shard_map``'s transpose.

Without a mesh, on a mesh of one device, inside a ``shard_map`` already, or where a
dimension does not divide by its mesh axes, the kernel runs on the whole arrays as
before (correct, slower on several devices; the last case logs a warning once).
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec

_warned: set = set()


def _entry_axes(entry) -> tuple:
  """A ``PartitionSpec`` entry (None, one mesh axis or several) as a tuple of mesh axes."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _spec(shape, names, mesh) -> PartitionSpec | None:
  """The ``PartitionSpec`` the logical ``names`` give an array of ``shape`` on ``mesh``,
  or None where a dimension does not divide by its mesh axes' sizes."""
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} do not match an operand of shape {shape}")
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  entries = []
  for dim, entry in zip(shape, nn.logical_to_mesh_axes(tuple(names))):
    axes = tuple(a for a in _entry_axes(entry) if sizes.get(a, 1) > 1)
    if dim % math.prod(sizes[a] for a in axes):
      return None
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*entries)


def _spreading_mesh():
  """The abstract mesh a step is traced on where it spreads work over several devices
  (not inside a ``shard_map`` already); None otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 or mesh.manual_axes else mesh


def local_shape(shape, names) -> tuple:
  """The shape each device holds of an array of ``shape`` with logical axes ``names`` in
  a step traced on a mesh (:func:`per_shard`'s shards); ``shape`` itself without a mesh,
  on one device, inside a ``shard_map`` already, or where it does not divide (the cases
  where :func:`per_shard` runs on the whole arrays)."""
  mesh = _spreading_mesh()
  spec = None if mesh is None else _spec(shape, names, mesh)
  if spec is None:
    return tuple(shape)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return tuple(dim // math.prod(sizes[a] for a in _entry_axes(entry))
               for dim, entry in zip(shape, spec))


def per_shard(fn: Callable, args: Sequence, axes: Sequence, *, out_like: int = 0):
  """``fn(*args)``, run by each device on its shard of ``args`` where a mesh spreads them.

  ``axes[i]`` names the logical axes of ``args[i]`` (every leaf of a pytree argument has
  the same rank); the output is laid out as ``args[out_like]`` (these kernels return an
  array of that shape). ``fn`` must treat rows of different examples and different heads
  independently, which the kernels here do.
  """
  mesh = _spreading_mesh()
  if mesh is None:
    return fn(*args)
  specs = []
  for arg, names in zip(args, axes):
    leaf_specs = jax.tree.map(lambda leaf, names=names: _spec(leaf.shape, names, mesh), arg)
    if any(s is None for s in jax.tree.leaves(leaf_specs, is_leaf=lambda s: s is None)):
      name = getattr(fn, "__name__", repr(fn))
      shapes = str(jax.tree.map(lambda a: a.shape, tuple(args)))
      if (name, shapes) not in _warned:
        _warned.add((name, shapes))
        logging.warning("%s: an operand of %s does not divide by the mesh %s; the kernel "
                        "runs on the whole arrays on every device", name, shapes,
                        dict(zip(mesh.axis_names, mesh.axis_sizes)))
      return fn(*args)
    specs.append(leaf_specs)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=specs[out_like],
                       check_vma=False)(*args)
