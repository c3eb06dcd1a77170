"""The full CPU smoke recipe through the CLI learns to route and answer (issue 3 "done when").

``python -m msa_jax.train --config=configs/16k_to_100m.py:smoke --workdir=DIR`` in a
subprocess, as a user runs it: the router reaches recall@1 ≥ 0.9 by the last
logged step, and the end-of-run evaluation (Memory Interleave generation) answers
≥ 80% exactly at the training memory size, with eval rows for every memory
multiplier up to 256×. Takes minutes: ``pytest -m slow tests/test_train_smoke.py``.
"""
import json
import os
import subprocess
import sys

import pytest

from train_common import CONFIG_FILE, REPO, get_config


@pytest.mark.slow
def test_smoke_recipe_routes_and_answers(tmp_path):
  workdir = tmp_path / "smoke"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)      # the CLI on this machine's real device count
  r = subprocess.run([sys.executable, "-m", "msa_jax.train", f"--config={CONFIG_FILE}:smoke",
                      f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=3600)
  assert r.returncode == 0, r.stderr[-4000:]

  cfg = get_config("smoke")
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]["step"] == cfg.num_steps
  assert rows[-1]["router_recall@1"] >= 0.9, rows[-1]
  assert rows[-1]["lm_loss"] < rows[0]["lm_loss"]

  with open(workdir / "eval.json") as f:
    evaluation = json.load(f)
  by_mult = {row["memory_multiplier"]: row for row in evaluation["rows"]}
  assert sorted(by_mult) == sorted(cfg.eval.memory_multipliers)
  assert max(by_mult) >= 256
  assert by_mult[1]["answer_exact_match"] >= 0.8, by_mult[1]
  for row in by_mult.values():
    assert 0.0 <= row["answer_exact_match"] <= 1.0
  assert (workdir / "config.json").is_file()
  assert (workdir / "checkpoints" / str(cfg.num_steps) / "state").is_dir()
