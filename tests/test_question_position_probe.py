"""launch.question_position_probe: the question moved, the bank kept."""
import json
import os

import pytest

from launch import question_position_probe
from msa_jax.config import ModelConfig
from msa_jax.inference import engine, interleave


def test_question_at_numbers_the_question_after_so_many_tokens():
  """A bank batch numbers a global-RoPE question after the bank's tokens, or, with
  ``question_at``, after that many; document-wise RoPE after the top-k slots either way."""
  import types
  import numpy as np
  bank = types.SimpleNamespace(prefix_tokens=[1, 2, 3], prefix_kv=[], num_tokens=99)
  device_bank = types.SimpleNamespace(bank=bank, arrays=lambda: {})
  glob, doc = ModelConfig(rope_mode="global"), ModelConfig(rope_mode="document", top_k=2)
  starts = {(cfg.rope_mode, q): interleave.BankBatch(device_bank, 2, cfg, q).active_start_b
            for cfg in (glob, doc) for q in (0, 5_000)}
  np.testing.assert_array_equal(starts["global", 0], [102, 102])
  np.testing.assert_array_equal(starts["global", 5_000], [5_003, 5_003])
  np.testing.assert_array_equal(starts["document", 0], [5, 5])
  np.testing.assert_array_equal(starts["document", 5_000], [5, 5])
  assert engine.active_start(glob, 3, 99) == 102            # the engine itself untouched
  with pytest.raises(SystemExit, match="positive"):
    question_position_probe.main(["--workdir=x", "--out=y", "--question_at=0"])


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
