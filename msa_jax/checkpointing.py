"""Orbax checkpoints of the train state and the grain data iterator, kept side by side."""
from __future__ import annotations

import os
from typing import Any, Optional

import grain.checkpoint
import orbax.checkpoint as ocp


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


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iter: Any) -> Optional[tuple[int, Any]]:
  """Restores the newest checkpoint into ``abstract_state``'s shardings and rewinds ``data_iter``.

  Returns ``(step, state)`` or ``None`` when there is no checkpoint yet.
  A checkpoint that cannot be read raises with the path, never silently restarts.
  """
  step = manager.latest_step()
  if step is None:
    return None
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
  except Exception as e:  # noqa: BLE001 - re-raised with the location
    raise RuntimeError(
        f"could not restore checkpoint step {step} from {manager.directory}: {e}. "
        "If it is corrupt, move that step's folder aside to resume from the previous one; "
        "nothing was deleted.") from e
  return step, restored["state"]
