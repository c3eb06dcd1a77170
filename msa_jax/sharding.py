"""Device mesh and logical-axis → mesh-axis rules.

Every parameter and activation carries logical axis names (``embed``, ``q_heads``,
``mlp``, ``batch`` ...). The rules below turn them into shardings over a mesh
with axes ``data`` (batch; documents are flattened into the batch, so they are
sharded along ``data`` too), ``fsdp`` (batch and parameter rows) and ``tensor``
(heads, MLP width, vocabulary). Flax uses each mesh axis at most once per
array, so ``embed`` shards parameters over ``fsdp`` but activations, whose
batch already took ``fsdp``, keep it whole.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # The leading axis of a run's stacked layer parameters in a scanned forward
    # (``ModelConfig.scan_layers``): every device holds its shard of every layer.
    ("layers", None),
)


def make_mesh(shape: Sequence[int] | dict, devices=None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh; one ``-1`` entry takes the remaining devices.

  Raises a clear error when the shape does not match the device count.
  """
  if isinstance(shape, dict):
    shape = [shape.get(a, 1) for a in MESH_AXES]
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if n % known:
      raise ValueError(f"mesh shape {shape} does not divide {n} devices")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} "
                     f"devices but {n} are available; set config.mesh_shape to match "
                     "(use -1 for 'the rest')")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_from_config(rules) -> tuple[tuple[str, object], ...]:
  """Logical axis rules as a tuple of pairs (lists from a config become tuples)."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for name, target in rules:
    out.append((name, tuple(target) if isinstance(target, list) else target))
  return tuple(out)


def mesh_context(mesh: Mesh):
  """The context under which a step is traced so that its logical sharding constraints
  take effect: ``jax.set_mesh`` (under the legacy ``with mesh:`` Flax's
  ``with_logical_constraint`` lowers to nothing, so activations and stacked layer
  parameters would go unconstrained)."""
  return jax.set_mesh(mesh)
