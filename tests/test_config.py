"""Bad model configurations fail early with a message naming the field (SPEC §3, §7)."""
import pytest

from msa_jax.config import ModelConfig, parse_router_layers, preset


def tiny(**kw):
  return preset("tiny", **kw)


@pytest.mark.parametrize("kw,field", [
    (dict(router_layers=(1, 4)), "router layer 4"),          # tiny has 4 layers: 0..3
    (dict(router_layers=(-1,)), "router layer -1"),
    (dict(router_layers=(2, 2)), "router_layers"),
    (dict(top_k=0), "top_k"),
    (dict(pooling_chunk_size=0), "pooling_chunk_size"),
    (dict(rope_mode="alibi"), "rope_mode"),
    (dict(routing_tokens="target"), "routing_tokens"),
    (dict(num_heads=3), "num_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(dtype="float64"), "dtype"),
    (dict(num_layers=0), "num_layers"),
])
def test_bad_config_names_the_field(kw, field):
  with pytest.raises(ValueError, match=field):
    tiny(**kw)


def test_router_layer_error_says_the_valid_range():
  with pytest.raises(ValueError, match=r"valid: 0\.\.3"):
    tiny(router_layers=(9,))


def test_default_router_layers_are_the_upper_half():
  """SPEC §3: default router layers are the upper half, e.g. 18..35 of 36."""
  assert ModelConfig().router_layer_ids == tuple(range(18, 36))
  assert tiny().router_layer_ids == (2, 3)
  assert tiny(router_layers=[3, 1]).router_layer_ids == (1, 3)


def test_router_layers_spec_strings():
  """SPEC §7: ``router_layer_idx`` is a comma string or "all"."""
  assert parse_router_layers("18,19,20", 36) == (18, 19, 20)
  assert parse_router_layers("all", 4) == (0, 1, 2, 3)
  with pytest.raises(ValueError, match="router_layers"):
    parse_router_layers("18;19", 36)
  cfg = ModelConfig.from_dict(dict(num_layers=4, router_layers="1,3"))
  assert cfg.router_layer_ids == (1, 3)
  with pytest.raises(ValueError, match="router layer 7"):
    ModelConfig.from_dict(dict(num_layers=4, router_layers="1,7"))


def test_unknown_keys_are_rejected():
  with pytest.raises(ValueError, match="unknown keys.*topk"):
    ModelConfig.from_dict(dict(topk=3))


def test_config_round_trips_through_dict():
  cfg = tiny(router_layers=(0, 3), rope_mode="global")
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_a_saved_retired_switch_loads_and_says_so_when_it_was_on(caplog):
  """A config saved while ``attention_short_one_pass_bwd`` existed (sessions 32-33) loads:
  the switch is dropped (it chose how, not what, the model computes), with a warning
  where it was on; any other unknown key is still an error."""
  import logging
  base = ModelConfig().to_dict()
  assert ModelConfig.from_dict({**base, "attention_short_one_pass_bwd": False}) == ModelConfig()
  with caplog.at_level(logging.WARNING):
    cfg = ModelConfig.from_dict({**base, "attention_short_one_pass_bwd": True})
  assert cfg == ModelConfig() and "attention_short_one_pass_bwd=True is ignored" in caplog.text
  with pytest.raises(ValueError, match="unknown keys"):
    ModelConfig.from_dict({**base, "attention_short_two_pass_bwd": True})
