"""The native msa_jax checkpoint: ``msa_config.json`` plus orbax-saved params.

Layout of one checkpoint dir::

    <dir>/msa_config.json   ModelConfig.to_dict()
    <dir>/params/           the param tree, orbax StandardCheckpointer

A workdir of params-only step dirs holds ``<workdir>/<step>/`` or
``<workdir>/checkpoints/<step>/`` (``<step>`` has digits), each with ``params/``;
``msa_config.json`` sits in the step dir or in a dir above it, up to the workdir.

A ``msa_jax.trainer`` workdir (what ``python -m msa_jax.train`` writes)::

    <workdir>/config.json                  the training ConfigDict; its ``model`` is
                                           ModelConfig.to_dict()
    <workdir>/checkpoints/<step>/state/    orbax StandardSave of TrainState(step, params,
                                           opt_state)
    <workdir>/checkpoints/<step>/data/     the data iterator

Only ``params`` is read from ``state`` (orbax partial restore).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from msa_jax.config import ModelConfig
from msa_jax.export.errors import CheckpointError

CONFIG_FILE = "msa_config.json"
PARAMS_DIR = "params"


def save_msa_jax_checkpoint(model, params, directory: str) -> str:
  """Writes ``model.config`` and ``params`` (boxed or not) as an msa_jax checkpoint.

  Overwrites an existing ``params/``. Returns the absolute checkpoint dir.
  """
  import flax.linen as nn
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(model.config.to_dict(), f, indent=2, sort_keys=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), nn.unbox(params), force=True)
  checkpointer.wait_until_finished()
  return directory


def is_msa_jax_checkpoint(directory: str) -> bool:
  return os.path.isdir(os.path.join(directory, PARAMS_DIR)) and find_config_file(directory) is not None


def find_config_file(step_dir: str, root: Optional[str] = None) -> Optional[str]:
  """``msa_config.json`` in ``step_dir`` or a parent, not above ``root`` (default: itself)."""
  d = os.path.abspath(step_dir)
  stop = os.path.abspath(root or step_dir)
  while True:
    candidate = os.path.join(d, CONFIG_FILE)
    if os.path.isfile(candidate):
      return candidate
    if d == stop or os.path.dirname(d) == d:
      return None
    d = os.path.dirname(d)


def _step_of(name: str) -> Optional[int]:
  digits = re.findall(r"\d+", name)
  return int(digits[-1]) if digits else None


def find_workdir_checkpoint(workdir: str, step: Optional[int] = None) -> Optional[str]:
  """The newest (or ``step``'s) step dir of a trainer workdir, or None if it has none."""
  found: dict[int, str] = {}
  for parent in (os.path.join(workdir, "checkpoints"), workdir):
    if not os.path.isdir(parent):
      continue
    for name in os.listdir(parent):
      s = _step_of(name)
      path = os.path.join(parent, name)
      if (s is not None and os.path.isdir(os.path.join(path, PARAMS_DIR))
          and find_config_file(path, workdir) is not None):
        found.setdefault(s, path)
    if found:
      break
  if not found:
    return None
  if step is None:
    return found[max(found)]
  if step not in found:
    raise CheckpointError(f"{workdir}: no checkpoint for step {step}; steps: {sorted(found)}")
  return found[step]


def read_model_config(step_dir: str, root: Optional[str] = None) -> ModelConfig:
  path = find_config_file(step_dir, root)
  if path is None:
    raise CheckpointError(f"{step_dir}: no {CONFIG_FILE}")
  with open(path) as f:
    try:
      return ModelConfig.from_dict(json.load(f))
    except (json.JSONDecodeError, ValueError, TypeError) as e:
      raise CheckpointError(f"{path}: {e}") from None


def _stored_tree(checkpointer, path: str) -> Any:
  """The metadata tree of a saved pytree (its layout differs across orbax versions)."""
  with _restore_errors(path):
    stored = checkpointer.metadata(path)
  stored_tree = getattr(stored, "item_metadata", stored)
  stored_tree = getattr(stored_tree, "tree", stored_tree)
  if stored_tree is None:   # orbax returns None when it cannot read the tree's metadata
    raise CheckpointError(f"{path}: cannot restore (step {_step_of(os.path.dirname(path))}): "
                          "its metadata is missing or unreadable (corrupt or truncated files)")
  return stored_tree


def restore_params(step_dir: str, abstract_params: Any) -> Any:
  """Restores ``<step_dir>/params`` into the structure, shapes and dtypes of ``abstract_params``."""
  path = os.path.abspath(os.path.join(step_dir, PARAMS_DIR))
  checkpointer = ocp.StandardCheckpointer()
  stored_tree = _stored_tree(checkpointer, path)
  _check_shapes(path, abstract_params, stored_tree)
  with _restore_errors(path):
    return checkpointer.restore(path, abstract_params)


TRAINER_CONFIG = "config.json"
TRAINER_STATE_DIR = "state"


def read_config_json(directory: str, path: Optional[str] = None) -> Optional[dict]:
  """``<directory>/config.json`` (or ``path``) as a dict; None when absent or not a JSON object."""
  path = path or os.path.join(directory, TRAINER_CONFIG)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  return config if isinstance(config, dict) else None


def trainer_model_dict(workdir: str) -> Optional[dict]:
  """The ``model`` entry of a trainer workdir's ``config.json``; None if ``workdir`` is not one."""
  from msa_jax.run_config import saved_config_path   # a resume's accepted change wins
  config = read_config_json(workdir, saved_config_path(workdir))
  model = config.get("model") if config is not None else None
  if not isinstance(model, dict) or "model_type" in config:
    return None
  return model


def is_trainer_workdir(workdir: str) -> bool:
  return trainer_model_dict(workdir) is not None


def find_trainer_checkpoint(workdir: str, step: Optional[int] = None) -> str:
  """``<workdir>/checkpoints/<step>`` holding ``state/``: the newest, or ``step``'s."""
  parent = os.path.join(workdir, "checkpoints")
  found = {}
  if os.path.isdir(parent):
    for name in os.listdir(parent):
      if name.isdigit() and os.path.isdir(os.path.join(parent, name, TRAINER_STATE_DIR)):
        found[int(name)] = os.path.join(parent, name)
  if not found:
    raise CheckpointError(f"{workdir}: a training workdir ({TRAINER_CONFIG} with a 'model' "
                          f"entry) without checkpoints: no {parent}/<step>/{TRAINER_STATE_DIR}")
  if step is None:
    return found[max(found)]
  if step not in found:
    raise CheckpointError(f"{workdir}: no checkpoint for step {step}; steps: {sorted(found)}")
  return found[step]


def read_trainer_model_config(workdir: str) -> ModelConfig:
  try:
    return ModelConfig.from_dict(trainer_model_dict(workdir))
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{os.path.join(workdir, TRAINER_CONFIG)}: model: {e}") from None


def restore_trainer_params(step_dir: str, abstract_params: Any) -> Any:
  """Restores only ``params`` of the ``TrainState`` in ``<step_dir>/state`` (on one device)."""
  path = os.path.abspath(os.path.join(step_dir, TRAINER_STATE_DIR))
  checkpointer = ocp.PyTreeCheckpointer()
  stored_tree = _stored_tree(checkpointer, path)
  if not isinstance(stored_tree, dict) or "params" not in stored_tree:
    raise CheckpointError(f"cannot read checkpoint {path}: its metadata has no train state "
                          "with 'params' (a damaged or incomplete save, or not written by "
                          "msa_jax.train); use another step (step=) or re-save it")
  _check_shapes(path, abstract_params, stored_tree["params"])
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract_params)
  with _restore_errors(path):
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args},
        partial_restore=True))
  return restored["params"]


@contextlib.contextmanager
def _restore_errors(path: str):
  """Re-raises an orbax/TensorStore failure as a ``CheckpointError`` naming the step dir and
  the cause's first line (not the multi-line TensorStore spec dump)."""
  from msa_jax.checkpointing import install_async_noise_filter
  install_async_noise_filter()
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - orbax raises many types
    lines = str(e).strip().splitlines()
    raise CheckpointError(f"{path}: cannot restore (step {_step_of(os.path.dirname(path))}): "
                          f"missing or corrupt file ({type(e).__name__}: "
                          f"{lines[0][:300] if lines else ''})") from e


def _check_shapes(path: str, abstract_params: Any, stored_tree: Any) -> None:
  want = {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  have = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(stored_tree)[0]}
  missing = sorted(set(want) - set(have))
  if missing:
    raise CheckpointError(f"{path}: missing params {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}")
  for key, shape in want.items():
    if have[key] != tuple(shape):
      raise CheckpointError(f"{path}: shape mismatch: param {key} has shape {have[key]} in the "
                            f"checkpoint, the config asks for {tuple(shape)}")
