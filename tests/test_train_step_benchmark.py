"""``benchmarks/train_step.py``'s command line: model switches override the recipe's in both
directions, and an absent switch leaves the recipe's value; ``--compare``'s sets and the
ratios of their step times."""
import pytest

from benchmarks import train_step


def _recipe(*argv):
  args = train_step._parse(["--variants", "0.6b", *argv])
  return train_step.recipe("0.6b", 16384, False, "1,1,1", **train_step.cli_model_overrides(args))


def test_absent_switches_keep_the_recipes_values():
  cfg = _recipe()
  assert cfg.model.attention_short_persistent is True    # the 0.6b recipe's own
  assert cfg.model.attention_pad_free is True
  assert cfg.model.remat_policy == "full"
  assert cfg.model.qk_norm_rope_vjp == "pallas"
  assert cfg.model.rope_tables is False
  assert cfg.model.attention_short_persistent_bwd is False


def test_switches_turn_recipe_settings_off_and_on():
  cfg = _recipe("--no-attention_short_persistent", "--no-attention_pad_free",
                "--remat_policy", "mlp_input", "--qk_norm_rope_vjp", "autodiff")
  assert cfg.model.attention_short_persistent is False
  assert cfg.model.attention_pad_free is False
  assert cfg.model.remat_policy == "mlp_input"
  assert cfg.model.qk_norm_rope_vjp == "autodiff"
  assert _recipe("--attention_short_persistent").model.attention_short_persistent is True
  assert _recipe("--rope_tables").model.rope_tables is True
  assert _recipe("--attention_short_persistent_bwd").model.attention_short_persistent_bwd is True


def test_compare_sets_parse_and_refuse_unknown_fields():
  switches = train_step.cli_model_overrides(train_step._parse([]))
  assert train_step.compare_sets("", switches) == [("", {})]
  assert train_step.compare_sets("base; rope_tables=true,qk_norm_rope_vjp=fused", switches) == [
      ("base", {}), ("rope_tables=true,qk_norm_rope_vjp=fused",
                     {"rope_tables": True, "qk_norm_rope_vjp": "fused"})]
  with pytest.raises(ValueError, match="not field=value for one of"):
    train_step.compare_sets("base;hidden_size=8", switches)
  with pytest.raises(ValueError, match="not field=value"):
    train_step.compare_sets("rope_tables", switches)


def test_compare_ratios_are_against_the_first_set_at_the_same_shape():
  row = dict(variant="0.6b", memory_tokens=16384, scan_layers=True)
  rows = [dict(row, batch=32, compare="base", step_s=4.0),
          dict(row, batch=32, compare="x=1", step_s=3.0),
          dict(row, batch=16, compare="base", step_s=2.0),
          dict(row, batch=16, compare="x=1", step_s=2.5),
          dict(row, batch=8, compare="base")]            # compiled only: no ratio
  train_step.add_compare_ratios(rows)
  assert [r.get("step_vs_first") for r in rows] == [1.0, 0.75, 1.0, 1.25, None]


def test_overlapped_init_gives_the_same_state_and_step(tmp_path):
  """``--overlap_init`` initialises the state in another thread while the step compiles:
  the same state, so the same loss after the same step, and the row says how it ran."""
  rows = {}
  for overlap in (False, True):
    out = tmp_path / f"ts_{overlap}.json"
    argv = ["--tiny", "--variants", "0.6b", "--memory", "1024", "--batches", "8",
            "--steps", "1", "--out", str(out)] + (["--overlap_init"] if overlap else [])
    result = train_step.main(train_step._parse(argv))
    (rows[overlap],) = [r for r in result["rows"] if "loss" in r]
  assert rows[True]["overlap_init"] is True and rows[False]["overlap_init"] is False
  assert rows[True]["loss"] == rows[False]["loss"] > 0
