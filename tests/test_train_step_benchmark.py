"""``benchmarks/train_step.py``'s command line: model switches override the recipe's in both
directions, and an absent switch leaves the recipe's value."""
from benchmarks import train_step


def _recipe(*argv):
  args = train_step._parse(["--variants", "0.6b", *argv])
  return train_step.recipe("0.6b", 16384, False, "1,1,1", **train_step.cli_model_overrides(args))


def test_absent_switches_keep_the_recipes_values():
  cfg = _recipe()
  assert cfg.model.attention_short_persistent is True    # the 0.6b recipe's own
  assert cfg.model.attention_pad_free is True
  assert cfg.model.remat_policy == "full"
  assert cfg.model.qk_norm_rope_vjp == "autodiff"
  assert cfg.model.rope_tables is False


def test_switches_turn_recipe_settings_off_and_on():
  cfg = _recipe("--no-attention_short_persistent", "--no-attention_pad_free",
                "--remat_policy", "mlp_input", "--qk_norm_rope_vjp", "fused")
  assert cfg.model.attention_short_persistent is False
  assert cfg.model.attention_pad_free is False
  assert cfg.model.remat_policy == "mlp_input"
  assert cfg.model.qk_norm_rope_vjp == "fused"
  assert _recipe("--attention_short_persistent").model.attention_short_persistent is True
  assert _recipe("--rope_tables").model.rope_tables is True
