"""Cloud TPU: the multi-host command of each point for a TPU VM slice, and an xpk line.

Every worker of the slice runs the same ``python -m msa_jax.train ...`` (one
process per host, ``--distributed=on``: JAX reads the slice's topology from the
TPU metadata). ``run_all.sh`` runs the unfinished points one after another through
``gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...``; ``xpk.sh``
holds one ``xpk workload create`` per point for a GKE cluster. The sweep root must
be a directory every worker sees (NFS, Filestore or a gcsfuse mount).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from typing import Optional

from launch import results
from launch.spec import Point, Sweep, sweep_dir, train_command, workdir


def remote_command(sweep: Sweep, point: Point, root: str, *, repo_dir: str, python: str,
                   setup: str = "") -> str:
  """The shell line each worker runs: ``cd REPO && [setup &&] python -m msa_jax.train ...``."""
  argv = train_command(sweep, point, root, python) + ["--distributed=on"]
  parts = [f"cd {shlex.quote(repo_dir)}"] + ([setup] if setup else []) + [shlex.join(argv)]
  return " && ".join(parts)


def gcloud_argv(tpu_name: str, zone: str, project: str, command: str) -> list[str]:
  argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={zone}"]
  if project:
    argv.append(f"--project={project}")
  return argv + ["--worker=all", f"--command={command}"]


def workload_name(sweep: Sweep, index: int) -> str:
  """An xpk/Kubernetes-safe name: lowercase letters, digits and '-', at most 40 chars."""
  base = re.sub(r"[^a-z0-9-]+", "-", sweep.name.lower()).strip("-") or "sweep"
  suffix = f"-{index}"
  return base[:40 - len(suffix)].rstrip("-") + suffix


def xpk_argv(sweep: Sweep, point: Point, index: int, *, cluster: str, tpu_type: str,
             docker_image: str, command: str, project: str, zone: str) -> list[str]:
  argv = ["xpk", "workload", "create", f"--cluster={cluster}",
          f"--workload={workload_name(sweep, index)}", f"--tpu-type={tpu_type}",
          "--num-slices=1"]
  if docker_image:
    argv.append(f"--docker-image={docker_image}")
  if project:
    argv.append(f"--project={project}")
  if zone:
    argv.append(f"--zone={zone}")
  return argv + [f"--command={command}"]


def run(sweep: Sweep, root: str, *, tpu_name: str, zone: str, project: str = "",
        repo_dir: str = "", python: str = "python3", setup: str = "", xpk_cluster: str = "",
        docker_image: str = "", dry_run: bool = False, submit: bool = False
        ) -> dict[str, Optional[str]]:
  """Writes ``run_all.sh`` and ``xpk.sh`` under ``ROOT/NAME/tpu_vm/`` (printed with
  ``dry_run``); ``submit`` runs ``run_all.sh``. Returns ``{"gcloud": path, "xpk": path}``."""
  if not tpu_name or not zone:
    raise ValueError("--runner=tpu_vm needs --tpu_name=NAME and --zone=ZONE (the slice's)")
  repo_dir = repo_dir or results.REPO
  gcloud_lines, xpk_lines = [], []
  for i, point in enumerate(sweep.points):
    results.check_same_point(sweep, point, root)
    state = results.status(workdir(sweep, point, root))
    print(f"[{i + 1}/{len(sweep.points)}] {point.name}: "
          f"{'finished, left out' if state == 'finished' else state}", flush=True)
    if state == "finished":
      continue
    command = remote_command(sweep, point, root, repo_dir=repo_dir, python=python, setup=setup)
    gcloud_lines.append(f"# {point.name}\n" + shlex.join(gcloud_argv(tpu_name, zone, project,
                                                                      command)))
    tpu_type = point.resources.get("tpu_type") or "TPU_TYPE"
    xpk_lines.append(f"# {point.name}\n" + shlex.join(xpk_argv(
        sweep, point, i, cluster=xpk_cluster or "CLUSTER", tpu_type=tpu_type,
        docker_image=docker_image, command=command, project=project, zone=zone)))
    if not dry_run:
      results.record_launch(sweep, point, root,
                            train_command(sweep, point, root, python) + ["--distributed=on"],
                            "tpu_vm")
  out_dir = os.path.join(sweep_dir(sweep, root), "tpu_vm")
  header = "#!/bin/bash\n# Written by: python -m launch.sweep --runner=tpu_vm (" + sweep.source + \
           ")\nset -euo pipefail\n"
  files = {"gcloud": os.path.join(out_dir, "run_all.sh"), "xpk": os.path.join(out_dir, "xpk.sh")}
  texts = {"gcloud": header + "\n".join(gcloud_lines) + "\n",
           "xpk": header + "\n".join(xpk_lines) + "\n"}
  if not gcloud_lines:
    print("every point is finished; nothing to write", flush=True)
    return {"gcloud": None, "xpk": None}
  for key, path in files.items():
    if dry_run:
      print(f"--- {path} ---\n{texts[key]}", flush=True)
      continue
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
      f.write(texts[key])
    os.chmod(path, 0o755)
    print(f"wrote {path}", flush=True)
  if submit and not dry_run:
    rc = subprocess.call(["bash", files["gcloud"]])
    if rc:
      raise RuntimeError(f"{files['gcloud']} failed with exit code {rc}; finished points are "
                         "skipped when you rerun the sweep")
  return files
