"""Orbax checkpoints of the train state and the grain data iterator, kept side by side.

A checkpoint that cannot be restored raises ``CheckpointRestoreError``: one message
naming the step, the path and the cause (a shape mismatch with both shapes, a
missing or corrupt file). Falling back to an older complete step happens only when
asked (``fallback=True``), and the unreadable step is moved aside, never deleted.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional

import grain.checkpoint
import jax
import orbax.checkpoint as ocp

from msa_jax import overlap

SET_ASIDE_DIR = "checkpoints.set_aside"   # beside checkpoints/: steps moved out of the way


class CheckpointRestoreError(RuntimeError):
  """A checkpoint step that cannot be restored: step, path and cause in the message."""

  def __init__(self, step: int, path: str, cause: str, advice: str):
    super().__init__(f"could not restore checkpoint step {step} from {path}: {cause}. {advice}")
    self.step, self.path, self.cause = step, path, cause


def make_manager(workdir: str, max_to_keep: int, save_interval_steps: int,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """A ``CheckpointManager`` under ``workdir/checkpoints`` holding ``state`` and ``data`` items."""
  # Every ``save_interval_steps`` steps (and on a multi-host preemption notice); not
  # orbax's default extra save at the first step of a fresh run.
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(save_interval_steps),
          policies.PreemptionCheckpointingPolicy()]),
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
      item_names=("state", "data"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         force: bool = False) -> bool:
  """Saves ``state`` and the iterator position at ``step`` (respects the save interval unless forced)."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter)), force=force)


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def shape_mismatches(abstract_tree: Any, stored_tree: Any) -> list[str]:
  """``"<key>: checkpoint (a, b), this config (c, d)"`` for every leaf whose shape differs
  (and ``missing``/``unexpected`` leaves); empty when the trees agree."""
  want = {_path_str(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]}
  have = {_path_str(p): tuple(getattr(x, "shape", ()) or ())
          for p, x in jax.tree_util.tree_flatten_with_path(stored_tree)[0]}
  params_first = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/"), k))
  out = [f"{k}: checkpoint {have[k]}, this config {want[k]}"
         for k in params_first(set(want) & set(have)) if have[k] != want[k]]
  out += [f"{k}: not in the checkpoint" for k in sorted(set(want) - set(have))]
  out += [f"{k}: in the checkpoint, not in this config" for k in sorted(set(have) - set(want))]
  return out


def _path_str(path) -> str:
  """``params/layers_0/mlp/kernel``: a key path with dict keys, indices and attribute names
  alike (orbax's metadata tree stores a state's attributes and tuples as dict keys and lists)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _summarise(mismatches: list[str], limit: int = 4) -> str:
  more = f" (and {len(mismatches) - limit} more)" if len(mismatches) > limit else ""
  return "; ".join(mismatches[:limit]) + more


def _cause(e: BaseException) -> str:
  """The first line of an exception (orbax/TensorStore append multi-line spec dumps)."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def _is_async_noise(exc_type, exc) -> bool:
  return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def install_async_noise_filter() -> None:
  """Silences the 'Event loop is closed' tracebacks that TensorStore's callbacks print (via
  ``sys.excepthook`` / ``sys.unraisablehook``, one per abandoned read, from several threads)
  when a failed restore leaves asynchronous reads behind: a failed restore then ends with
  its cause rather than hundreds of unrelated lines. Every other error is printed as before."""
  if getattr(sys.excepthook, "_msa_filters_async_noise", False):
    return
  previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc, tb):
    if not _is_async_noise(exc_type, exc):
      previous_hook(exc_type, exc, tb)

  def unraisablehook(unraisable):
    if not _is_async_noise(unraisable.exc_type, unraisable.exc_value):
      previous_unraisable(unraisable)

  excepthook._msa_filters_async_noise = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _restore_step(manager, step: int, abstract_state: Any, data_iter: Any, beside=None):
  """``(state, beside())``: the step's data position first (``data_iter`` rewound), then its
  state, read in another thread while ``beside`` runs here when given (None: nothing)."""
  install_async_noise_filter()
  path = step_path(manager, step)
  try:
    stored = manager.item_metadata(step)["state"]
  except Exception as e:  # noqa: BLE001 - re-raised with the step and path
    raise CheckpointRestoreError(
        step, path, f"its metadata is missing or corrupt ({_cause(e)})", _CORRUPT) from e
  mismatches = shape_mismatches(abstract_state, getattr(stored, "tree", stored))
  if mismatches:
    raise CheckpointRestoreError(
        step, path, f"shape mismatch: {_summarise(mismatches)}",
        "The model config differs from the one that saved this run: resume with the run's "
        "own config (config.json, or its newest config.<step>.json), or train the new shape in a new --workdir (nothing was changed)")
  _read(manager, step, path, data=grain.checkpoint.CheckpointRestore(data_iter))
  read_state = lambda: _read(manager, step, path,  # noqa: E731
                             state=ocp.args.StandardRestore(abstract_state))["state"]
  if beside is None:
    return read_state(), None
  return overlap.beside(read_state, beside)


def _read(manager, step: int, path: str, **items):
  """``manager.restore`` of the named items alone, its failures as ``CheckpointRestoreError``."""
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # noqa: BLE001 - re-raised with the step and path
    raise CheckpointRestoreError(step, path, f"missing or corrupt file ({_cause(e)})",
                                 _CORRUPT) from e


_CORRUPT = ("Nothing was deleted. Pass --restore_fallback to move this step aside (to "
            f"{SET_ASIDE_DIR}/) and resume from the previous complete step, or move it aside "
            "yourself")


def set_aside(manager: ocp.CheckpointManager, step: int, reason: str) -> str:
  """Moves step ``step`` out of ``checkpoints/`` into ``checkpoints.set_aside/`` (never
  deletes it) and returns the new path."""
  src = step_path(manager, step)
  root = os.path.join(os.path.dirname(str(manager.directory)), SET_ASIDE_DIR)
  os.makedirs(root, exist_ok=True)
  dst = os.path.join(root, f"{step}.{reason}.{time.strftime('%Y%m%d-%H%M%S')}")
  if jax.process_index() == 0:
    os.rename(src, dst)
  if jax.process_count() > 1:   # every host sees the move before it re-lists the steps
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"msa_jax set_aside {step}")
  manager.reload()
  return dst


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any, *,
                   fallback: bool = False) -> Optional[tuple[int, Any]]:
  """Restores the newest checkpoint into ``abstract_state``'s shardings and rewinds ``data_iter``.

  Returns ``(step, state)`` or ``None`` when there is no checkpoint yet. A step that
  cannot be read raises ``CheckpointRestoreError``; with ``fallback`` an unreadable
  (not a shape-mismatched) step is moved aside with a printed notice and the previous
  complete step is tried.
  """
  out = restore_latest_beside(manager, abstract_state, data_iter, None, fallback=fallback)
  return None if out is None else out[:2]


def restore_latest_beside(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any,
                          work: Optional[Callable[[int], Any]], *,
                          fallback: bool = False) -> Optional[tuple[int, Any, Any]]:
  """:func:`restore_latest` with ``work(step)`` run in this thread while the state is read
  in another (:func:`msa_jax.overlap.beside`), once ``data_iter`` is rewound to the step:
  the trainer draws the first batch there and compiles the step for it, so a resume waits
  for the longer of the read and the compile. Returns ``(step, state, work(step))`` (None
  for ``work=None``), or None when there is no checkpoint. When the state cannot be read,
  ``work`` has run for nothing: with ``fallback`` the previous step rewinds ``data_iter``
  again and ``work`` runs again for it."""
  while True:
    step = manager.latest_step()
    if step is None:
      return None
    try:
      state, out = _restore_step(manager, step, abstract_state, data_iter,
                                 None if work is None else lambda: work(step))
      return step, state, out
    except CheckpointRestoreError as e:
      if not fallback or e.cause.startswith("shape mismatch"):
        raise
      moved = set_aside(manager, step, "unreadable")
      print(f"WARNING (--restore_fallback): {e}\n  step {step} moved to {moved}; trying the "
            "previous complete step", flush=True)
