"""SLURM: one job-array script per group of points with the same resources.

Each array task starts its point with ``srun`` as one task per GPU on each of its
nodes; every task runs ``python -m msa_jax.train`` and ``jax.distributed``
finds the coordinator (first node of the step, a port from the job id), the
process count and its own index in SLURM's environment (``msa_jax.distributed``).
Finished points are left out of ``--array``; an unfinished one resumes.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Optional

from launch import results
from launch.spec import Point, Sweep, sweep_dir, train_command, workdir


def _groups(sweep: Sweep) -> list[tuple[dict, list[tuple[int, Point]]]]:
  """Points grouped by identical resources, in sweep order (index = position in the sweep)."""
  groups: list[tuple[dict, list[tuple[int, Point]]]] = []
  for i, p in enumerate(sweep.points):
    for res, members in groups:
      if res == p.resources:
        members.append((i, p))
        break
    else:
      groups.append((p.resources, [(i, p)]))
  return groups


def script(sweep: Sweep, root: str, resources: dict, members: list[tuple[int, Point]],
           array: list[int], *, python: str = sys.executable, repo: str = results.REPO,
           setup: str = "", account: str = "", log_dir: Optional[str] = None) -> str:
  """The text of one ``sbatch`` job-array script; task ``i`` trains ``members[i]``."""
  gpus = int(resources["gpus_per_node"])
  log_dir = log_dir or os.path.join(sweep_dir(sweep, root), "slurm")
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={sweep.name}",
           f"#SBATCH --array={','.join(str(a) for a in array)}",
           f"#SBATCH --nodes={int(resources['nodes'])}",
           f"#SBATCH --ntasks-per-node={max(gpus, 1)}"]
  if gpus > 0:
    lines.append(f"#SBATCH --gpus-per-node={gpus}")
  lines += [f"#SBATCH --cpus-per-task={int(resources['cpus_per_task'])}",
            f"#SBATCH --time={resources['time']}",
            f"#SBATCH --output={os.path.abspath(log_dir)}/%x_%A_%a.out"]
  if resources.get("partition"):
    lines.append(f"#SBATCH --partition={resources['partition']}")
  if account:
    lines.append(f"#SBATCH --account={account}")
  lines += ["# Written by: python -m launch.sweep --runner=slurm (" + sweep.source + ")",
            "set -euo pipefail",
            f"cd {shlex.quote(os.path.abspath(repo))}"]
  if setup:
    lines.append(setup)
  lines.append('case "$SLURM_ARRAY_TASK_ID" in')
  for task, (_, point) in enumerate(members):
    argv = train_command(sweep, point, os.path.abspath(root), python)
    lines.append(f"  {task}) ARGS=({' '.join(shlex.quote(a) for a in argv)}) ;;  "
                 f"# {point.name}")
  lines += ['  *) echo "no sweep point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
            "esac",
            "# One task per GPU; jax.distributed reads SLURM_* (coordinator, count, rank).",
            'srun --kill-on-bad-exit=1 "${ARGS[@]}"',
            ""]
  return "\n".join(lines)


def run(sweep: Sweep, root: str, *, dry_run: bool = False, submit: bool = False,
        python: str = sys.executable, setup: str = "", account: str = "",
        sweep_arg: str = "") -> list[str]:
  """Writes (or with ``dry_run`` prints) the scripts; ``submit`` runs ``sbatch`` on them and
  queues a results collection after them. Returns the script paths."""
  out_dir = os.path.join(sweep_dir(sweep, root), "slurm")
  paths, job_ids = [], []
  for g, (resources, members) in enumerate(_groups(sweep)):
    for _, p in members:
      results.check_same_point(sweep, p, root)
    pending = [t for t, (_, p) in enumerate(members)
               if results.status(workdir(sweep, p, root)) != "finished"]
    for t, (i, p) in enumerate(members):
      state = "pending" if t in pending else "finished, left out"
      print(f"[{i + 1}/{len(sweep.points)}] {p.name} (group {g}, array task {t}): {state}",
            flush=True)
    if not pending:
      continue
    text = script(sweep, root, resources, members, pending, python=python, setup=setup,
                  account=account, log_dir=out_dir)
    path = os.path.join(out_dir, f"{sweep.name}_{g}.sbatch")
    paths.append(path)
    if dry_run:
      print(f"--- {path} ---\n{text}", flush=True)
      continue
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
    for t in pending:
      _, p = members[t]
      results.record_launch(sweep, p, root, train_command(sweep, p, os.path.abspath(root), python),
                            "slurm")
    print(f"wrote {path}", flush=True)
    if submit:
      job = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
      if job.returncode:
        raise RuntimeError(f"sbatch {path} failed ({job.returncode}): {job.stderr.strip()}")
      job_ids.append(job.stdout.strip().split(";")[0])
      print(f"submitted {path}: job {job_ids[-1]}", flush=True)
  if submit and job_ids:
    collect = [python, "-m", "launch.sweep", f"--sweep={sweep_arg or sweep.source}",
               f"--root={os.path.abspath(root)}", "--collect"]
    wrap = f"cd {shlex.quote(results.REPO)} && {shlex.join(collect)}"
    job = subprocess.run(["sbatch", "--parsable", f"--job-name={sweep.name}-collect",
                          f"--dependency=afterany:{':'.join(job_ids)}", "--ntasks=1",
                          f"--output={os.path.abspath(out_dir)}/%x_%j.out", f"--wrap={wrap}"],
                         capture_output=True, text=True)
    if job.returncode:
      print(f"could not queue the results collection ({job.stderr.strip()}); run: "
            f"{shlex.join(collect)}", flush=True)
    else:
      print(f"results collection queued after the sweep: job {job.stdout.strip()}", flush=True)
  return paths
