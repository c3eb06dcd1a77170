"""``launch.plot_variants``: the last logged losses per run, chance levels from the task,
and a shell glob over a results folder (which also matches the plot and summary files)."""
import json
import math
import subprocess
import sys


def _run(path, answers, ids):
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"data": {"kv": {
      "value_len": 2, "id_len": 4, "num_value_symbols": 64, "num_id_symbols": 128}}}))
  rows = [{"step": 10 * (i + 1), "lm_loss_answer": a, "lm_loss_retrieval": b,
           "router_recall@1": 0.5} for i, (a, b) in enumerate(zip(answers, ids))]
  rows.insert(0, {"step": 5, "lm_loss": 7.0})          # a row without the split: skipped
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_chance_and_glob_outputs_skipped(tmp_path):
  _run(tmp_path / "a", [2.0, 1.5], [3.9, 3.0])
  _run(tmp_path / "b", [2.1, 1.1], [3.8, 0.1])
  args = [sys.executable, "-m", "launch.plot_variants", f"--out={tmp_path}"]
  subprocess.run(args + [str(tmp_path / "a"), str(tmp_path / "b")], check=True,
                 capture_output=True)
  # Again over everything in the folder, the first call's variants.json/png included.
  runs = sorted(str(p) for p in tmp_path.iterdir())
  subprocess.run(args + runs, check=True, capture_output=True)
  out = json.loads((tmp_path / "variants.json").read_text())
  assert out["runs"]["a"] == {"step": 20, "lm_loss_answer": 1.5, "lm_loss_retrieval": 3.0,
                              "router_recall@1": 0.5}
  assert out["runs"]["b"]["lm_loss_retrieval"] == 0.1
  assert math.isclose(out["chance"]["lm_loss_answer"], 2 * math.log(64) / 4)
  assert math.isclose(out["chance"]["lm_loss_retrieval"], 4 * math.log(128) / 5)
  assert (tmp_path / "variants.png").stat().st_size > 0
