r"""Runs a sweep (``configs/sweeps/NAME.py``) on a runner: local, slurm or tpu_vm.

  python -m launch.sweep --sweep=configs/sweeps/smoke_topk.py --runner=local --dry_run
  python -m launch.sweep --sweep=configs/sweeps/model_size.py:smoke --runner=local
  python -m launch.sweep --sweep=configs/sweeps/model_size.py --runner=slurm --submit
  python -m launch.sweep --sweep=configs/sweeps/rope_mode.py --runner=tpu_vm \
      --tpu_name=my-v5p-32 --zone=us-east5-a
  python -m launch.sweep --sweep=configs/sweeps/model_size.py --collect

Each point trains in ``ROOT/NAME/RUN/`` (``RUN`` = the overrides that vary, e.g.
``model.top_k=2``); rerunning skips finished points and resumes unfinished ones.
``--dry_run`` prints every run and every file a runner would write, and runs nothing.
After a local sweep (or with ``--collect``, e.g. once SLURM jobs are done) the
results of the finished runs go to ``ROOT/NAME/results.jsonl`` and ``results.csv``
(``launch.results``); fit them with ``python -m launch.fit``.
"""
from __future__ import annotations

import sys

from absl import app, flags

from launch import results
from launch.spec import load_sweep

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file, optionally with an argument: "
                             "configs/sweeps/NAME.py[:smoke].", required=True)
_RUNNER = flags.DEFINE_enum("runner", "local", ["local", "slurm", "tpu_vm"], "Where to run.")
_ROOT = flags.DEFINE_string("root", "runs", "Sweeps go to ROOT/NAME/.")
_DRY = flags.DEFINE_bool("dry_run", False, "Print runs and generated files; run nothing.")
_SUBMIT = flags.DEFINE_bool("submit", False, "slurm: sbatch the scripts; tpu_vm: run "
                            "run_all.sh. Without it the files are only written.")
_COLLECT = flags.DEFINE_bool("collect", False, "Only gather results.jsonl/results.csv.")
_PYTHON = flags.DEFINE_string("python", None, "Python that runs msa_jax.train (default: this "
                              "one; 'python3' on TPU VMs).")
_SETUP = flags.DEFINE_string("setup", "", "slurm/tpu_vm: shell run before training, e.g. "
                             "'source .venv/bin/activate'.")
# local
_DEVICES = flags.DEFINE_list("devices", None, "local: GPU ids for one point per device "
                             "(CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "local, without --devices: points at once.")
# slurm
_ACCOUNT = flags.DEFINE_string("account", "", "slurm: #SBATCH --account.")
_PARTITION = flags.DEFINE_string("partition", "", "slurm: partition of every point (else the "
                                 "sweep's resources.partition).")
# tpu_vm
_TPU_NAME = flags.DEFINE_string("tpu_name", "", "tpu_vm: the TPU VM slice.")
_ZONE = flags.DEFINE_string("zone", "", "tpu_vm: its zone.")
_PROJECT = flags.DEFINE_string("project", "", "tpu_vm: its Google Cloud project.")
_REPO_DIR = flags.DEFINE_string("repo_dir", "", "tpu_vm: this repository's path on the "
                                "workers (default: the same path as here).")
_XPK_CLUSTER = flags.DEFINE_string("xpk_cluster", "", "tpu_vm: GKE cluster for the xpk lines.")
_DOCKER_IMAGE = flags.DEFINE_string("docker_image", "", "tpu_vm: image for the xpk lines.")


def main(argv):
  del argv
  sweep = load_sweep(_SWEEP.value)
  if _PARTITION.value:
    for p in sweep.points:
      p.resources["partition"] = _PARTITION.value
  print(f"sweep {sweep.name}: {len(sweep.points)} point(s) of {sweep.config} "
        f"under {_ROOT.value}/{sweep.name}/", flush=True)
  if _COLLECT.value:
    _report(results.collect(sweep, _ROOT.value), sweep)
    return
  if _RUNNER.value == "local":
    from launch.runners import local
    codes = local.run(sweep, _ROOT.value, dry_run=_DRY.value, devices=_DEVICES.value,
                      parallel=_PARALLEL.value, python=_PYTHON.value or sys.executable)
    if not _DRY.value:
      _report(results.collect(sweep, _ROOT.value), sweep)
      if any(codes.values()):
        sys.exit(f"{sum(1 for c in codes.values() if c)} run(s) failed: "
                 f"{[n for n, c in codes.items() if c]}")
  elif _RUNNER.value == "slurm":
    from launch.runners import slurm
    slurm.run(sweep, _ROOT.value, dry_run=_DRY.value, submit=_SUBMIT.value,
              python=_PYTHON.value or sys.executable, setup=_SETUP.value,
              account=_ACCOUNT.value, sweep_arg=_SWEEP.value)
  else:
    from launch.runners import tpu_vm
    tpu_vm.run(sweep, _ROOT.value, tpu_name=_TPU_NAME.value, zone=_ZONE.value,
               project=_PROJECT.value, repo_dir=_REPO_DIR.value,
               python=_PYTHON.value or "python3", setup=_SETUP.value,
               xpk_cluster=_XPK_CLUSTER.value, docker_image=_DOCKER_IMAGE.value,
               dry_run=_DRY.value, submit=_SUBMIT.value)


def _report(records, sweep) -> None:
  done = sum(r["status"] == "finished" for r in records)
  root = results.sweep_dir(sweep, _ROOT.value)
  print(f"{done}/{len(records)} run(s) finished; results: {root}/results.jsonl, "
        f"{root}/results.csv", flush=True)


if __name__ == "__main__":
  app.run(main)
