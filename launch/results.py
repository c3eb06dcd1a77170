"""A sweep's state and results: which runs finished, and ``results.jsonl``/``results.csv``.

Every launched point gets ``ROOT/NAME/RUN/sweep_point.json`` (overrides, resources,
command and the git commit it was launched at). ``collect`` reads each run's
``config.json``, ``metrics.jsonl`` and ``eval.json`` and writes, under ``ROOT/NAME/``:

* ``results.jsonl``: one object per finished run: ``run``, ``commit`` (of the last
  launch; ``commits``: every distinct one, when a resumed run spans several), ``overrides``,
  ``params``, ``tokens``, ``compute`` (6 · params · tokens), ``final`` (the last
  metrics row) and ``eval`` (the rows of ``eval.json``);
* ``results.csv``: the same, flat: one line per run and evaluated memory size
  (``eval.*`` columns), ``overrides.*`` and ``final.*`` columns;
* ``summary.png``: final router recall@1 and answer exact match (1× memory) per run.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import subprocess
from typing import Any, Optional

from launch.spec import Point, Sweep, sweep_dir, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINT_FILE = "sweep_point.json"


def git_commit(repo: str = REPO) -> str:
  """``HEAD``'s hash, with ``-dirty`` when tracked files differ from it ("unknown" outside git)."""
  try:
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("-dirty" if dirty else "")


def record_launch(sweep: Sweep, point: Point, root: str, command: list[str], runner: str,
                  commit: Optional[str] = None) -> str:
  """Writes ``RUN/sweep_point.json`` (what ran, where, at which commit); returns its path.

  A relaunch (resume) appends to ``launches``, so a run trained at two commits shows both.
  """
  wd = workdir(sweep, point, root)
  os.makedirs(wd, exist_ok=True)
  path = os.path.join(wd, POINT_FILE)
  launch = {"commit": commit or git_commit(), "runner": runner,
            "launched_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  launches = (_read_json(path) or {}).get("launches", []) + [launch]
  record = {"sweep": sweep.name, "sweep_file": sweep.source, "run": point.name,
            "config": sweep.config, "overrides": point.overrides, "resources": point.resources,
            "command": command, **launch, "launches": launches}
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  return path


def check_same_point(sweep: Sweep, point: Point, root: str) -> None:
  """Raises when ``RUN/`` was launched with other overrides (e.g. the sweep file's
  ``fixed`` changed): a finished run would be skipped, an unfinished one resumed, with
  settings that are not the sweep's. Nothing is moved or deleted."""
  record = _read_json(os.path.join(workdir(sweep, point, root), POINT_FILE))
  if record is None:
    return
  now = json.loads(json.dumps(point.overrides))   # tuples as lists, as the record holds them
  then = record.get("overrides", {})
  diff = {k: (then.get(k), now.get(k)) for k in sorted(set(now) | set(then))
          if then.get(k) != now.get(k)}
  if diff:
    raise ValueError(
        f"{workdir(sweep, point, root)} was launched with other overrides "
        f"({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in diff.items())}); move "
        "that folder aside, or use another --root or sweep name, to run the new setting")


def _read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def metric_rows(wd: str) -> list[dict]:
  """``metrics.jsonl`` rows by step, a resumed run's re-logged steps keeping the newest."""
  path = os.path.join(wd, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  by_step: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        by_step[int(row["step"])] = row
  return [by_step[s] for s in sorted(by_step)]


def status(wd: str) -> str:
  """``finished``, ``unfinished`` (started: resumes from its checkpoint) or ``not started``.

  Finished: the last logged step reached ``num_steps`` of its ``config.json`` and,
  when the config evaluates at the end, ``eval.json`` exists.
  """
  config = _read_json(os.path.join(wd, "config.json"))
  if config is None:
    return "not started"
  rows = metric_rows(wd)
  if not rows or rows[-1]["step"] < int(config["num_steps"]):
    return "unfinished"
  wants_eval = bool(config.get("eval")) and config["eval"].get("at_end", True)
  if wants_eval and not os.path.exists(os.path.join(wd, "eval.json")):
    return "unfinished"
  return "finished"


def param_count(model: dict) -> int:
  """Parameters of a ``config.json`` model (embedding counted once: tied) from the same
  formula as ``msa_jax.metrics.model_flops_per_token`` (its 6·N term at context 0)."""
  from msa_jax.config import ModelConfig
  from msa_jax.metrics import model_flops_per_token
  return int(round(model_flops_per_token(ModelConfig.from_dict(model), 0) / 6))


def tokens_seen(rows: list[dict]) -> Optional[float]:
  """Training tokens over the run: Σ ``tokens_per_step`` × steps per logging interval."""
  total, prev = 0.0, 0
  for row in rows:
    if row.get("tokens_per_step") is None:
      return None
    total += row["tokens_per_step"] * (row["step"] - prev)
    prev = row["step"]
  return total


def _scalars(row: dict) -> dict[str, Any]:
  return {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None}


TAIL_SHARE = 0.1   # the tail: logged rows in the last 10 % of a run's steps


def tail_means(rows: list[dict], share: float = TAIL_SHARE) -> dict[str, Any]:
  """Each numeric metric's mean over the logged rows in the last ``share`` of the run's
  steps (at least the last row), with ``tail_rows`` and ``tail_from_step``.

  One logged row is one step's loss: on a synthetic task whose batches differ a lot, a
  law fitted to final rows fits their noise. Every training batch is fresh data, so the
  tail's mean is a held-out estimate of the end of training.
  """
  if not rows:
    return {}
  last = rows[-1]["step"]
  tail = [r for r in rows if r["step"] > last * (1.0 - share)] or rows[-1:]
  keys = [k for k, v in tail[-1].items() if k != "step" and isinstance(v, (int, float))
          and not isinstance(v, bool)]
  out: dict[str, Any] = {}
  for k in keys:
    values = [r[k] for r in tail if isinstance(r.get(k), (int, float))]
    out[k] = float(sum(values) / len(values))
  out.update(tail_rows=len(tail), tail_from_step=int(tail[0]["step"]))
  return out


def run_result(sweep: Sweep, point: Point, root: str) -> dict[str, Any]:
  """The result record of one run (``status`` says whether it finished)."""
  wd = workdir(sweep, point, root)
  launched = _read_json(os.path.join(wd, POINT_FILE)) or {}
  config = _read_json(os.path.join(wd, "config.json"))
  rows = metric_rows(wd)
  evaluation = _read_json(os.path.join(wd, "eval.json"))
  params = param_count(config["model"]) if config else None
  tokens = tokens_seen(rows) if rows else None
  return {
      "sweep": sweep.name, "run": point.name, "status": status(wd), "workdir": wd,
      "commit": launched.get("commit", "unknown"),
      "commits": list(dict.fromkeys(l["commit"] for l in launched.get("launches", [])))
                 or [launched.get("commit", "unknown")],
      "overrides": point.overrides,
      "params": params, "tokens": tokens,
      "compute": 6.0 * params * tokens if params and tokens else None,
      "final": _scalars(rows[-1]) if rows else {},
      "tail": tail_means(rows),
      "eval": evaluation["rows"] if evaluation else [],
  }


def _flat_rows(results: list[dict]) -> list[dict]:
  out = []
  for r in results:
    base = {k: r[k] for k in ("sweep", "run", "status", "commit", "params", "tokens", "compute")}
    base.update({f"overrides.{k}": v for k, v in r["overrides"].items()})
    base.update({f"final.{k}": v for k, v in r["final"].items()})
    base.update({f"tail.{k}": v for k, v in r.get("tail", {}).items()})
    for e in r["eval"] or [{}]:
      out.append({**base, **{f"eval.{k}": v for k, v in _scalars(e).items()}})
  return out


def collect(sweep: Sweep, root: str, plot: bool = True) -> list[dict]:
  """Writes ``results.jsonl``, ``results.csv`` (finished runs) and ``summary.png``; returns
  the records of all points (finished or not)."""
  out_dir = sweep_dir(sweep, root)
  os.makedirs(out_dir, exist_ok=True)
  records = [run_result(sweep, p, root) for p in sweep.points]
  done = [r for r in records if r["status"] == "finished"]
  with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
    for r in done:
      f.write(json.dumps(r) + "\n")
  flat = _flat_rows(done)
  columns: list[str] = []
  for row in flat:
    columns += [k for k in row if k not in columns]
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
  if plot and done:
    plot_summary(done, os.path.join(out_dir, "summary.png"))
  return records


def plot_summary(results: list[dict], path: str) -> None:
  """Bars: final router recall@1 and answer exact match at 1× memory, per run."""
  from msa_jax import plots
  names = [r["run"] for r in results]
  recall = [r["final"].get("router_recall@1", float("nan")) for r in results]
  em = [r["eval"][0]["answer_exact_match"] if r["eval"] else float("nan") for r in results]
  fig, ax = plots.subplots(figsize=(max(5, len(results) * 1.2), 4))
  xs = range(len(results))
  ax.bar([x - 0.2 for x in xs], recall, 0.4, label="router recall@1 (final step)")
  ax.bar([x + 0.2 for x in xs], em, 0.4, label="answer EM (1× memory)")
  ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
  ax.set_ylim(0, 1.05)
  ax.set_title(results[0]["sweep"])
  ax.legend(fontsize=8)
  plots.save(fig, path)
