"""Runs of identical layers for the scanned forward (``ModelConfig.scan_layers``): each
maximal run of consecutive router (or plain) layers is one ``lax.scan`` of a pure,
rematerialised layer function over the run's stacked parameters."""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from msa_jax.config import ModelConfig
from msa_jax.decoder_layer import MLP_INPUT, DecoderLayer


@dataclasses.dataclass(frozen=True)
class LayerRun:
  """Layers ``start..stop-1``: consecutive, all router layers or none."""

  start: int
  stop: int
  is_router: bool

  def __len__(self) -> int:
    return self.stop - self.start


def layer_runs(cfg: ModelConfig, stop: Optional[int] = None) -> list[LayerRun]:
  """The maximal runs of consecutive identical layers (same ``is_router``) of layers
  ``0..stop-1`` (default: all)."""
  stop = cfg.num_layers if stop is None else stop
  router = set(cfg.router_layer_ids)
  runs, start = [], 0
  for i in range(1, stop + 1):
    if i == stop or (i in router) != (start in router):
      runs.append(LayerRun(start, i, start in router))
      start = i
  return runs


def remat_policy_fn(name: str):
  """``jax.checkpoint``'s policy for ``ModelConfig.remat_policy`` ("none" has none)."""
  return {"none": None, "full": None,
          "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          "mlp_input": jax.checkpoint_policies.save_only_these_names(MLP_INPUT)}[name]


def pure_layer(cfg: ModelConfig, is_router: bool, method: str, in_scan: bool = True):
  """``fn(params, *args)``: one layer's ``method`` as a pure function of its parameters,
  checkpointed by ``cfg.remat_policy`` (a scan body unless ``in_scan=False``)."""
  layer = DecoderLayer(cfg, is_router=is_router, parent=None)

  def fn(params, *args):
    return layer.apply({"params": params}, *args, method=getattr(DecoderLayer, method))
  if cfg.remat_policy == "none":
    return fn
  # Inside a scan, XLA cannot merge the recomputation with the forward anyway: the
  # barriers of prevent_cse would only cost; outside one they keep the remat.
  return jax.checkpoint(fn, policy=remat_policy_fn(cfg.remat_policy), prevent_cse=not in_scan)


def kernels_in(params, dtype):
  """``params`` with every matmul ``kernel`` cast to ``dtype`` (norm scales kept)."""
  return {k: (kernels_in(v, dtype) if isinstance(v, collections.abc.Mapping)
              else v.astype(dtype) if k == "kernel" else v)
          for k, v in params.items()}


@functools.lru_cache(maxsize=None)
def layer_param_axes(cfg: ModelConfig, is_router: bool):
  """A layer's parameter tree of ``nn.LogicallyPartitioned`` boxes (logical axis names)."""
  # The names do not depend on the attention implementation; XLA's traces anywhere.
  layer = DecoderLayer(cfg.replace(kernels="xla"), is_router=is_router, parent=None)
  x = jax.ShapeDtypeStruct((1, 1, cfg.hidden_size), cfg.jnp_dtype)
  pos = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  return jax.eval_shape(lambda x, pos, mask: layer.init(jax.random.PRNGKey(0), x, pos, mask,
                                                        method=DecoderLayer.encode),
                        x, pos, mask)["params"]
