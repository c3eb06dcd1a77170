"""``from_pretrained`` / ``save_pretrained``: HF Qwen3, MSA-4B and msa_jax checkpoints.

Detection order of :func:`from_pretrained` on a dir:

1. ``msa_config.json`` + ``params/``           → an msa_jax (orbax) checkpoint;
2. a ``msa_jax.trainer`` workdir (``config.json`` whose ``model`` entry is a
   ModelConfig, ``checkpoints/<step>/state``) → the params of the newest step's
   train state, or ``step=``'s;
3. ``config.json``, by its ``model_type``:
   ``qwen3`` → HF Qwen3 safetensors, ``msa`` → the MSA-4B release; other → error;
4. params-only step dirs ``<dir>/checkpoints/<step>`` or ``<dir>/<step>`` holding
   ``params/`` (and ``msa_config.json`` there or above) → the newest step, or
   ``step=`` if given;
5. anything else → :class:`CheckpointError`.

Router initialisation when reading a plain Qwen3 checkpoint (which has no
router projections): ``router_init="copy_qk"`` (default) sets
``router_q_proj := q_proj`` and ``router_k_proj := k_proj`` of the same layer,
so routing starts as the pretrained attention's query-key similarity (without
q/k-norm and RoPE, which the router does not use); ``router_init="normal"``
draws ``normal(0, initializer_range)`` from ``jax.random.key(seed)``, folded
with the layer index and 0 (q) / 1 (k).

Weights are streamed tensor by tensor, so converting a 4B/8B model holds one
copy of the params plus one tensor (read) or one shard (write) in memory.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msa_jax.config import ModelConfig
from msa_jax.export import hf_config as hf_config_lib
from msa_jax.export import msa_jax_checkpoint as native
from msa_jax.export import names as names_lib
from msa_jax.export import safetensors_io
from msa_jax.export.errors import CheckpointError
from msa_jax.model import MSAModel

CONFIG_JSON = "config.json"
ROUTER_INITS = ("copy_qk", "normal")
_EMBED_NAME = "model.embed_tokens.weight"


def abstract_params(model: MSAModel) -> dict:
  """The unboxed param tree of ``model`` as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return nn.unbox(variables)["params"]


def _get(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _dtype_name(dtype) -> str:
  return safetensors_io.numpy_dtype(dtype).name


def from_pretrained(path, *, dtype=None, compute_dtype=None, router_init: str = "copy_qk",
                    seed: int = 0, step: Optional[int] = None,
                    **config_overrides) -> tuple[MSAModel, dict]:
  """Loads ``(model, params)`` from a checkpoint dir (detection order: module doc).

  Args:
    path: an HF Qwen3 dir, an MSA-4B-format dir, an msa_jax checkpoint or a
      trainer workdir.
    dtype: parameter dtype ("float32", "bfloat16", ...); default: the
      checkpoint's own (its embedding's dtype).
    compute_dtype: ``ModelConfig.dtype`` (activations, matmuls); default: the
      parameter dtype for safetensors dirs (as in transformers), the saved
      config's for msa_jax checkpoints.
    router_init: ``"copy_qk"`` or ``"normal"``; only used for a plain Qwen3
      checkpoint's router layers (see module doc).
    seed: PRNG seed of ``router_init="normal"``.
    step: trainer step to load from a workdir (default: the newest).
    **config_overrides: other :class:`ModelConfig` fields (``router_layers``,
      ``top_k``, ``kernels``, ``remat``, ...).

  Returns ``(MSAModel, params)``, params unboxed: ``model.apply({"params": params}, ids)``.
  """
  for reserved in ("param_dtype",):
    if reserved in config_overrides:
      raise TypeError(f"pass the parameter dtype as dtype=, not {reserved}=")
  if router_init not in ROUTER_INITS:
    raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {router_init!r}")
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory")
  if native.is_msa_jax_checkpoint(path):
    return _load_native(path, path, dtype, compute_dtype, config_overrides)
  if native.is_trainer_workdir(path):
    step_dir = native.find_trainer_checkpoint(path, step)
    return _load_native(step_dir, path, dtype, compute_dtype, config_overrides,
                        stored_cfg=native.read_trainer_model_config(path),
                        restore=native.restore_trainer_params)
  if os.path.isfile(os.path.join(path, CONFIG_JSON)):
    return _load_safetensors(path, dtype, compute_dtype, router_init, seed, config_overrides)
  step_dir = native.find_workdir_checkpoint(path, step)
  if step_dir is not None:
    return _load_native(step_dir, path, dtype, compute_dtype, config_overrides)
  raise CheckpointError(
      f"{path}: not a checkpoint: no {CONFIG_JSON} (HF Qwen3 / MSA-4B), no "
      f"{native.CONFIG_FILE} + {native.PARAMS_DIR}/ (msa_jax checkpoint) and no trainer "
      "step dirs")


def _load_native(step_dir, root, dtype, compute_dtype, overrides, stored_cfg=None,
                 restore=native.restore_params):
  if stored_cfg is None:
    stored_cfg = native.read_model_config(step_dir, root)
  params = restore(step_dir, abstract_params(MSAModel(stored_cfg)))
  param_dtype = _dtype_name(dtype) if dtype is not None else stored_cfg.param_dtype
  cfg = stored_cfg.replace(
      param_dtype=param_dtype,
      dtype=_dtype_name(compute_dtype) if compute_dtype else stored_cfg.dtype, **overrides)
  model = MSAModel(cfg)
  want = jax.tree.map(lambda x: x.shape, abstract_params(model))
  if want != jax.tree.map(lambda x: x.shape, params):
    raise CheckpointError(f"{step_dir}: config overrides {sorted(overrides)} change the "
                          "parameter shapes; they cannot be applied to a saved checkpoint")
  params = jax.tree.map(lambda x: x.astype(param_dtype), params)
  return model, params


def _load_safetensors(path, dtype, compute_dtype, router_init, seed, overrides):
  config_path = os.path.join(path, CONFIG_JSON)
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: not valid JSON: {e}") from None
  fmt = hf_config_lib.checkpoint_format(hf, config_path)
  with safetensors_io.SafetensorsReader(path) as reader:
    param_dtype = _dtype_name(dtype) if dtype is not None else reader.dtype_name(_EMBED_NAME)
    cfg = hf_config_lib.model_config_from_hf(
        hf, config_path, param_dtype=param_dtype,
        dtype=_dtype_name(compute_dtype) if compute_dtype else param_dtype, **overrides)
    model = MSAModel(cfg)
    abstract = abstract_params(model)
    entries = names_lib.tensor_entries(cfg, fmt)
    _check_names(path, reader, entries, cfg)
    np_dtype = safetensors_io.numpy_dtype(param_dtype)
    params: dict = {}
    for entry in entries:
      want = _get(abstract, entry.param_path).shape
      want_stored = tuple(reversed(want)) if entry.transpose else tuple(want)
      got = reader.shape(entry.torch_name)
      if got != want_stored:
        raise CheckpointError(f"{path}: tensor {entry.torch_name!r} has shape {got}, expected "
                              f"{want_stored} (from {CONFIG_JSON})")
      x = reader.read(entry.torch_name)
      x = x.T if entry.transpose else x
      _set(params, entry.param_path, jnp.asarray(x.astype(np_dtype, copy=False)))
  if fmt == names_lib.FORMAT_HF:
    init_router_params(params, cfg, router_init, seed)
  return model, params


def _check_names(path, reader, entries, cfg) -> None:
  expected = {e.torch_name for e in entries}
  missing = [e.torch_name for e in entries if e.torch_name not in reader]
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{more}")
  unexpected = sorted(n for n in reader.names()
                      if n not in expected and not names_lib.is_ignorable(n, cfg))
  if unexpected:
    more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
    raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]}{more} for this "
                          f"config (router layers {list(cfg.router_layer_ids)}, tied "
                          f"embeddings {cfg.tie_word_embeddings})")


def init_router_params(params: dict, cfg: ModelConfig, method: str = "copy_qk",
                       seed: int = 0) -> dict:
  """Fills ``router_{q,k}_proj`` of every router layer in place (see module doc)."""
  if method not in ROUTER_INITS:
    raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {method!r}")
  key = jax.random.key(seed)
  for i in cfg.router_layer_ids:
    layer = params[f"layers_{i}"]
    for j, (router, source) in enumerate((("router_q_proj", "q_proj"),
                                          ("router_k_proj", "k_proj"))):
      like = layer[source]["kernel"]
      if method == "copy_qk":
        value = jnp.array(like, copy=True)
      else:
        noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), j), like.shape)
        value = (cfg.initializer_range * noise).astype(like.dtype)
      layer[router] = {"kernel": value}
  return params


def save_pretrained(model: MSAModel, params: Any, path, format: str = "hf", *, dtype=None,
                    max_shard_size="5GB", extra_config: Optional[dict] = None) -> str:
  """Writes a PyTorch-format checkpoint dir: ``config.json`` + safetensors.

  Args:
    model, params: the model and its params (boxed or not; ``{"params": ...}`` ok).
    path: output dir (created; old ``model*.safetensors`` / index there are removed).
    format: ``"hf"`` (transformers ``Qwen3ForCausalLM``; router weights dropped)
      or ``"msa"`` (the MSA-4B release: router weights, ``temperature``,
      ``msa_config``; SPEC §7).
    dtype: dtype written; default: the params' own (the embedding's dtype).
    max_shard_size: bytes or "5GB"-style; more than this → numbered shards + index.
    extra_config: extra top-level config.json keys (e.g. ``max_position_embeddings``).

  Returns the output dir.
  """
  if format not in names_lib.FORMATS:
    raise ValueError(f"unknown format {format!r}; choose one of {names_lib.FORMATS}")
  params = nn.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  cfg = model.config
  path = os.fspath(path)
  abstract = abstract_params(model)
  entries = names_lib.tensor_entries(cfg, format)
  arrays = []
  for entry in entries:
    try:
      x = _get(params, entry.param_path)
    except (KeyError, TypeError):
      raise CheckpointError(f"params have no {'/'.join(entry.param_path)} (for "
                            f"{entry.torch_name!r})") from None
    want = tuple(_get(abstract, entry.param_path).shape)
    if tuple(x.shape) != want:
      raise CheckpointError(f"param {'/'.join(entry.param_path)} has shape {tuple(x.shape)}, "
                            f"expected {want} for model.config")
    arrays.append(x)
  out_dtype = safetensors_io.numpy_dtype(
      dtype if dtype is not None else params["embed_tokens"]["embedding"].dtype)
  tensor_names = [e.torch_name for e in entries]
  shapes = [tuple(a.shape) for a in arrays]
  if format == names_lib.FORMAT_MSA:
    tensor_names.append(names_lib.TEMPERATURE_NAME)
    shapes.append(())

  def produce(i: int) -> np.ndarray:
    if i == len(entries):  # the MSA temperature scalar
      return np.asarray(hf_config_lib.MSA_RELEASE_CONFIG["infonce_loss_temp"], out_dtype)
    x = np.asarray(jax.device_get(arrays[i]))
    return (x.T if entries[i].transpose else x).astype(out_dtype, copy=False)

  nbytes = [math.prod(s) * out_dtype.itemsize for s in shapes]
  safetensors_io.write_tensors(path, tensor_names, nbytes, produce, max_shard_size)
  config = hf_config_lib.hf_config_dict(cfg, format, out_dtype.name, extra_config)
  with open(os.path.join(path, CONFIG_JSON), "w") as f:
    json.dump(config, f, indent=2)
  return path
