"""benchmarks.data_pipeline: one row per (stage, worker count), each stage timed on the
dataset training reads, and config overrides that refuse unknown fields."""
import json

import pytest

from benchmarks import data_pipeline
from msa_jax.data import from_config
from msa_jax.run_config import load_config_file


def test_override_parses_literals_and_refuses_unknown_fields():
  cfg = load_config_file("configs/16k_to_100m.py:tiny")
  data_pipeline.apply_override(cfg, "data.kv.fact_gaps=6")
  data_pipeline.apply_override(cfg, "data.memory_curriculum=((0,368),(5800,None))")
  assert cfg.data.kv.fact_gaps == 6
  assert tuple(map(tuple, cfg.data.memory_curriculum)) == ((0, 368), (5800, None))
  with pytest.raises(ValueError, match="no field 'data.kv.fact_gap'"):
    data_pipeline.apply_override(cfg, "data.kv.fact_gap=6")
  with pytest.raises(ValueError, match="no field 'data.kvv'"):   # the first missing part
    data_pipeline.apply_override(cfg, "data.kvv.fact_gaps=6")
  with pytest.raises(ValueError, match="no field 'seed.x'"):      # a leaf is no parent
    data_pipeline.apply_override(cfg, "seed.x=6")
  with pytest.raises(ValueError, match="expected KEY=VALUE"):
    data_pipeline.apply_override(cfg, "data.kv.fact_gaps")


def test_each_stage_is_timed_with_its_own_shape(tmp_path):
  out = data_pipeline.main(["--config=configs/16k_to_100m.py:tiny", "--workers=0",
                            "--batches=3", "--warmup=1", "--stages=0,3",
                            "--set", "data.batch_curriculum=((0,8),(5800,None))",
                            f"--out={tmp_path}"])
  rows = out["rows"]
  cfg = load_config_file("configs/16k_to_100m.py:tiny")
  cfg.data.batch_curriculum = ((0, 8), (5800, None))
  shapes = from_config.training_stages(cfg.data, cfg.batch_size)
  assert [r["stage"] for r in rows] == [0, 3]
  assert [(r["first_batch"], r["facts_per_doc"], r["batch_size"]) for r in rows] == [
      (shapes[i][0], shapes[i][2], shapes[i][3]) for i in (0, 3)]
  assert [r["facts_per_doc"] for r in rows] == [1, 6]
  for r in rows:
    assert r["timed_batches"] == 3 and r["batches_per_s"] > 0
    assert r["examples_per_s"] == pytest.approx(r["batches_per_s"] * r["batch_size"])
  with open(tmp_path / "data_pipeline.json") as f:
    assert json.load(f)["rows"] == rows
  with pytest.raises(ValueError, match="stage 9 does not exist"):
    data_pipeline.main(["--workers=0", "--batches=1", "--stages=9", f"--out={tmp_path}"])
