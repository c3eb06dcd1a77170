"""Runs a sweep's points on this machine: one after another, or several at once.

Finished runs are skipped; unfinished ones rerun the same command, which resumes
from their newest checkpoint. With ``devices`` (e.g. GPU ids ``["0", "1"]``) a
point takes ``gpus_per_node`` of them (``CUDA_VISIBLE_DEVICES``) and points run
side by side, each logging to ``RUN/train.log``; with ``parallel=N`` and no
devices, N points run at once without a device assignment (CPU).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

from launch import results
from launch.spec import Point, Sweep, train_command, workdir


def _check_local(point: Point, devices: Optional[Sequence[str]]) -> int:
  """Devices the point needs here; raises for points a single machine cannot run."""
  if int(point.resources["nodes"]) > 1:
    raise ValueError(f"point {point.name} asks for {point.resources['nodes']} nodes; run this "
                     "sweep with --runner=slurm or --runner=tpu_vm, or set its resources.nodes=1")
  need = max(int(point.resources["gpus_per_node"]), 1) if devices else 1
  if devices and need > len(devices):
    raise ValueError(f"point {point.name} needs {need} devices but --devices lists "
                     f"{len(devices)}; list more or lower its resources.gpus_per_node")
  return need


def run(sweep: Sweep, root: str, *, dry_run: bool = False, devices: Optional[Sequence[str]] = None,
        parallel: int = 1, python: str = sys.executable, device_env: str = "CUDA_VISIBLE_DEVICES",
        poll_s: float = 2.0) -> dict[str, int]:
  """Runs every unfinished point; returns ``{run name: exit code}`` of those started."""
  todo = []
  for i, point in enumerate(sweep.points):
    wd = workdir(sweep, point, root)
    state = results.status(wd)
    results.check_same_point(sweep, point, root)
    cmd = train_command(sweep, point, root, python)
    need = _check_local(point, devices)
    tag = f"[{i + 1}/{len(sweep.points)}] {point.name}"
    if dry_run:
      print(f"{tag} ({state}): {shlex.join(cmd)}", flush=True)
    elif state == "finished":
      print(f"{tag}: finished, skipping", flush=True)
    else:
      todo.append((tag, point, cmd, need, state))
  if dry_run or not todo:
    return {}
  slots = list(devices) if devices else [None] * max(parallel, 1)
  codes: dict[str, int] = {}
  running: list[tuple[subprocess.Popen, str, Point, list, float, object]] = []
  t0 = time.perf_counter()
  sequential = len(slots) == 1 and not devices

  def reap(block: bool) -> None:
    while running:
      for entry in list(running):
        proc, tag, point, held, started, log = entry
        if proc.poll() is None:
          continue
        running.remove(entry)
        slots.extend(held)
        if log is not None:
          log.close()
        codes[point.name] = proc.returncode
        took = time.perf_counter() - started
        what = "done" if proc.returncode == 0 else (
            f"exit code {proc.returncode}; its workdir keeps what it saved (rerun resumes)")
        print(f"{tag}: {what} in {took:.0f}s | {len(codes)}/{len(todo)} started runs ended, "
              f"elapsed {time.perf_counter() - t0:.0f}s", flush=True)
      if not block:
        return
      if running:
        time.sleep(poll_s)
      else:
        return

  for n, (tag, point, cmd, need, state) in enumerate(todo):
    while len(slots) < need:
      time.sleep(poll_s)
      reap(block=False)
    held, slots[:] = slots[:need], slots[need:]
    env = dict(os.environ)
    if devices:
      env[device_env] = ",".join(held)
    wd = workdir(sweep, point, root)
    results.record_launch(sweep, point, root, cmd, "local")
    elapsed = time.perf_counter() - t0
    eta = f", ETA {elapsed / n * (len(todo) - n):.0f}s" if n else ""
    where = f" on {device_env}={env[device_env]}" if devices else ""
    print(f"{tag}: {'resuming' if state == 'unfinished' else 'starting'}{where} "
          f"(elapsed {elapsed:.0f}s{eta})", flush=True)
    log = None if sequential else open(os.path.join(wd, "train.log"), "a")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
    running.append((proc, tag, point, held, time.perf_counter(), log))
    if sequential:
      reap(block=True)
  reap(block=True)
  return codes
