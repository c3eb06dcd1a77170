r"""Runs a sweep: one training run per point of a grid of config overrides.

  python -m launch.sweep --sweep=launch/sweeps/smoke_topk.py --root=runs
  python -m launch.sweep --sweep=launch/sweeps/smoke_topk.py --root=runs --dry_run

A sweep file defines ``get_sweep() -> dict`` with ``name``, ``config`` (the
``--config`` string) and ``grid`` (``{override_key: [values...]}``; the product is
taken). Each run gets ``ROOT/NAME/<key=value,...>/`` as its workdir, so a rerun
resumes unfinished runs and skips finished ones (those with ``eval.json``, or
with a final metrics row when evaluation is off). At the end ``ROOT/NAME/summary.json``
holds each run's overrides, last metrics and eval rows, and ``summary.png`` plots
the final router recall@1 and answer exact match per run.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep definition file.", required=True)
_ROOT = flags.DEFINE_string("root", "runs", "Where sweep folders go.")
_DRY = flags.DEFINE_bool("dry_run", False, "Print the commands only.")


def load_sweep(path: str) -> dict:
  """The sweep dict of a sweep file, checked."""
  spec = importlib.util.spec_from_file_location("sweep_def", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  sweep = mod.get_sweep()
  for key in ("name", "config", "grid"):
    if key not in sweep:
      raise ValueError(f"{path}: get_sweep() must return a dict with '{key}'")
  if not sweep["grid"] or any(not v for v in sweep["grid"].values()):
    raise ValueError(f"{path}: every grid entry needs at least one value")
  return sweep


def points(grid: dict) -> list[dict]:
  """The product of the grid, in a stable order."""
  keys = sorted(grid)
  return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def run_name(point: dict) -> str:
  return ",".join(f"{k.replace('.', '_')}={v}" for k, v in sorted(point.items()))


def command(config: str, workdir: str, point: dict) -> list[str]:
  return ([sys.executable, "-m", "msa_jax.train", f"--config={config}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in sorted(point.items())])


def _finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "eval.json"))


def _last_metrics(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  return json.loads(lines[-1]) if lines else {}


def summarise(sweep_dir: str, runs: list[tuple[str, dict]]) -> list[dict]:
  """Writes summary.json and summary.png for the runs that produced metrics."""
  rows = []
  for name, point in runs:
    wd = os.path.join(sweep_dir, name)
    row = {"run": name, "overrides": point, "final": _last_metrics(wd)}
    if _finished(wd):
      with open(os.path.join(wd, "eval.json")) as f:
        row["eval"] = json.load(f)["rows"]
    rows.append(row)
  with open(os.path.join(sweep_dir, "summary.json"), "w") as f:
    json.dump(rows, f, indent=2)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [r["run"] for r in rows]
  recall = [r["final"].get("router_recall@1", float("nan")) for r in rows]
  em = [r["eval"][0]["answer_exact_match"] if r.get("eval") else float("nan") for r in rows]
  fig, ax = plt.subplots(figsize=(max(5, len(rows) * 1.2), 4))
  xs = range(len(rows))
  ax.bar([x - 0.2 for x in xs], recall, 0.4, label="router recall@1 (final step)")
  ax.bar([x + 0.2 for x in xs], em, 0.4, label="answer EM (1× memory)")
  ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(sweep_dir, "summary.png"), dpi=120)
  plt.close(fig)
  return rows


def main(argv):
  del argv
  sweep = load_sweep(_SWEEP.value)
  sweep_dir = os.path.join(_ROOT.value, sweep["name"])
  os.makedirs(sweep_dir, exist_ok=True)
  runs = [(run_name(p), p) for p in points(sweep["grid"])]
  t0 = time.perf_counter()
  for i, (name, point) in enumerate(runs):
    wd = os.path.join(sweep_dir, name)
    cmd = command(sweep["config"], wd, point)
    if _DRY.value:
      print(" ".join(cmd))
      continue
    if _finished(wd):
      print(f"[{i + 1}/{len(runs)}] {name}: finished, skipping", flush=True)
      continue
    print(f"[{i + 1}/{len(runs)}] {name} (elapsed {time.perf_counter() - t0:.0f}s)", flush=True)
    rc = subprocess.call(cmd)
    if rc:
      print(f"[{i + 1}/{len(runs)}] {name}: exit code {rc}; its workdir keeps what it saved",
            flush=True)
  if not _DRY.value:
    rows = summarise(sweep_dir, runs)
    print(f"summary of {len(rows)} runs: {os.path.join(sweep_dir, 'summary.json')}")


if __name__ == "__main__":
  app.run(main)
