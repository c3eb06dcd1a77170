"""Router health plots (issue 14 item 6): per-layer series read back from metrics.jsonl."""
import json
import os

from msa_jax import router_health


def _write(workdir, rows, partial_last_line=False):
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    if partial_last_line:
      f.write('{"step": 30, "router_recall@1_per')


def test_per_layer_series_and_plot(tmp_path):
  rows = [{"step": s, "router_recall@1_per_layer": [0.1 * s / 10, 0.05],
           "router_recall@5_per_layer": [0.5, 0.2], "router_precision@k_per_layer": [0.3, 0.1]}
          for s in (10, 20)]
  _write(tmp_path, rows, partial_last_line=True)   # a line the trainer is still writing
  steps, series = router_health.per_layer_series(
      router_health.read_rows(str(tmp_path / "metrics.jsonl")), "router_recall@1")
  assert steps == [10, 20]
  assert series == [[0.1, 0.2], [0.05, 0.05]]      # layer 1 stuck: what the plot shows
  out = router_health.plot(str(tmp_path), [2, 3])
  assert out == str(tmp_path / "router_health.png") and os.path.getsize(out) > 1000


def test_no_metrics_no_plot(tmp_path):
  assert router_health.plot(str(tmp_path)) is None
  _write(tmp_path, [{"step": 1, "loss": 1.0}])
  assert router_health.plot(str(tmp_path)) is None
