r"""Router health over training: recall@K and precision@k per router layer, plotted.

  python -m msa_jax.router_health --workdir=DIR      # any time, also while DIR trains

reads ``DIR/metrics.jsonl`` and writes ``DIR/router_health.png``: one line per router layer
for recall@1, recall@5 and precision@k against the step. The trainer writes the same plot
at the end of every run. A router that silently fails (recall flat near chance in one
layer, or in all) shows here within the first logged steps, long before answers do.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

PANELS = ("router_recall@1", "router_recall@5", "router_precision@k")


def read_rows(metrics_path: str) -> list[dict[str, Any]]:
  """The logged rows of ``metrics.jsonl`` (a partly written last line is skipped)."""
  rows = []
  with open(metrics_path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue   # the trainer may be writing this line right now
  return rows


def per_layer_series(rows: list[dict[str, Any]], metric: str) -> tuple[list[int], list[list[float]]]:
  """``(steps, series)``: ``series[l][i]`` is router layer l's ``metric`` at ``steps[i]``."""
  key = f"{metric}_per_layer"
  steps, columns = [], []
  for row in rows:
    values = row.get(key)
    if values is None:
      continue
    steps.append(int(row["step"]))
    columns.append([float(v) for v in values])
  n_layers = max((len(c) for c in columns), default=0)
  series = [[c[l] if l < len(c) else float("nan") for c in columns] for l in range(n_layers)]
  return steps, series


def plot(workdir: str, router_layers: Optional[list[int]] = None) -> Optional[str]:
  """Writes ``workdir/router_health.png`` from its metrics; returns the path (None: no rows)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = read_rows(path)
  if not any(f"{PANELS[0]}_per_layer" in r for r in rows):
    return None
  from msa_jax import plots
  fig, axes = plots.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4), sharey=True)
  for ax, metric in zip(axes, PANELS):
    steps, series = per_layer_series(rows, metric)
    for l, values in enumerate(series):
      name = f"layer {router_layers[l]}" if router_layers and l < len(router_layers) else f"router {l}"
      ax.plot(steps, values, lw=1.2, label=name)
    ax.set_title(metric, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle(f"router health: {os.path.basename(os.path.normpath(workdir))}", fontsize=10)
  out = os.path.join(workdir, "router_health.png")
  plots.save(fig, out, dpi=110)
  return out


def main(argv) -> None:
  del argv
  from absl import flags
  out = plot(flags.FLAGS.workdir)
  print(out or f"no per-layer router metrics in {flags.FLAGS.workdir}/metrics.jsonl yet")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "A training run's directory.", required=True)
  app.run(main)
