"""launch.question_position_probe: the question moved, the bank kept."""
import json
import os

import pytest

from launch import question_position_probe
from msa_jax.config import ModelConfig
from msa_jax.inference import engine, interleave


def test_question_at_moves_the_global_question_and_restores_the_engine():
  cfg = ModelConfig(rope_mode="global")
  assert interleave.active_start(cfg, 3, 99) == 102
  with question_position_probe.question_at(5_000):
    assert interleave.active_start(cfg, 3, 99) == 5_003
  assert interleave.active_start is engine.active_start
  with pytest.raises(RuntimeError):
    with question_position_probe.question_at(7):
      raise RuntimeError("inside")
  assert interleave.active_start is engine.active_start


@pytest.mark.slow
def test_probe_at_the_banks_own_size_equals_the_engines_evaluation(tmp_path):
  """A 4-step global-RoPE smoke run: the probe's row with the question where the engine
  puts it (after the bank) scores as the unpatched evaluation; the probe refuses a
  document-RoPE run (~1 min)."""
  from launch import reproduce_reading
  from msa_jax import evaluate
  root = tmp_path / "root"
  reproduce_reading.main([
      "--config=configs/16k_to_100m.py:smoke", f"--root={root}", f"--out={tmp_path / 'train'}",
      "--budget_s=600", "--num_questions=8", "--batch_size=8", "--train_only", "--rope=global",
      "--train_s=400", "--train_args=--config.num_steps=4 --config.log_every_steps=2 "
      "--config.checkpoint.every_steps=4 --config.batch_size=8 "
      "--config.optim.warmup_phase_steps=2 --config.optim.lr_ramp_steps=1"])
  run = str(root / "train_global")
  probe_root = tmp_path / "probe"
  rows = question_position_probe.probe(run, str(probe_root), [256, 10_000_000], 8,
                                       batch_size=8)
  assert [r["question_at"] for r in rows] == [256, 10_000_000]
  assert rows[0]["bank_tokens"] == 256          # 32 smoke documents of 8 tokens
  plain = evaluate.run_bank(run, str(probe_root / "bank_1x"),
                            str(probe_root / "questions_32_8.jsonl"), batch_size=8,
                            oracle=False, out=str(tmp_path / "plain.json"))
  assert rows[0]["router_recall@1"] == plain["router_recall@1"]
  assert rows[0]["answer_exact_match"] == plain["answer_exact_match"]
  assert interleave.active_start is engine.active_start
  question_position_probe.main([f"--workdir={run}", f"--out={tmp_path / 'out'}",
                                f"--root={probe_root}", "--question_at=256", "--num_questions=8"])
  saved = json.load(open(tmp_path / "out" / "question_position.json"))
  assert saved["rows"][0]["router_recall@1"] == plain["router_recall@1"]
  assert os.path.exists(tmp_path / "out" / "question_position.png")
  cfg_path = os.path.join(run, "config.json")
  cfg = json.load(open(cfg_path))
  cfg["model"]["rope_mode"] = "document"
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(ValueError, match="rope_mode='document'"):
    question_position_probe.probe(run, str(probe_root), [256], 8)
