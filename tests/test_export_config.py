"""config.json ↔ ModelConfig, on plain dicts (no torch)."""
import pytest

from msa_jax.config import preset
from msa_jax.export import CheckpointError
from msa_jax.export.hf_config import hf_config_dict, model_config_from_hf

# Qwen3-4B-Instruct-2507's config.json as older transformers wrote it.
QWEN3_4B_OLD_STYLE = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 5000000, "rope_scaling": None,
    "tie_word_embeddings": True, "attention_bias": False, "torch_dtype": "bfloat16",
    "max_position_embeddings": 262144}


def test_old_style_qwen3_4b():
  cfg = model_config_from_hf(QWEN3_4B_OLD_STYLE)
  assert cfg == preset("qwen3-4b", rope_theta=5e6)
  assert cfg.router_layer_ids == tuple(range(18, 36))


def test_new_style_rope_parameters_and_defaults():
  hf = dict(QWEN3_4B_OLD_STYLE, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  for key in ("rope_theta", "head_dim", "num_key_value_heads"):
    del hf[key]
  cfg = model_config_from_hf(hf)
  assert (cfg.rope_theta, cfg.head_dim, cfg.num_kv_heads) == (1e6, 2560 // 32, 32)


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "qwen2"}, "unknown model_type 'qwen2'"),
    ({"num_attention_heads": 30}, "num_heads .30. must be a multiple of num_kv_heads"),
])
def test_unsupported_configs(change, message):
  with pytest.raises(CheckpointError, match=message):
    model_config_from_hf(dict(QWEN3_4B_OLD_STYLE, **change))


def test_missing_key_is_named():
  hf = dict(QWEN3_4B_OLD_STYLE)
  del hf["intermediate_size"]
  with pytest.raises(CheckpointError, match="missing key 'intermediate_size'"):
    model_config_from_hf(hf)


@pytest.mark.parametrize("router_layers,idx", [((18, 20, 35), "18,20,35"),
                                               (tuple(range(36)), "all"), (None, None)])
def test_msa_config_round_trip(router_layers, idx):
  cfg = preset("qwen3-4b", router_layers=router_layers, top_k=8, pooling_chunk_size=32,
               rope_mode="global")
  hf = hf_config_dict(cfg, "msa", "bfloat16")
  assert hf["msa_config"]["router_layer_idx"] == (idx or ",".join(map(str, range(18, 36))))
  assert hf["msa_config"]["rewrite_position"] is False
  back = model_config_from_hf(hf, param_dtype="bfloat16")
  assert back == cfg.replace(param_dtype="bfloat16",
                             router_layers=cfg.router_layer_ids)


def test_hf_config_round_trip_and_extra_keys():
  cfg = preset("qwen3-8b")
  hf = hf_config_dict(cfg, "hf", "float32", extra={"max_position_embeddings": 4096})
  assert "msa_config" not in hf and hf["max_position_embeddings"] == 4096
  assert model_config_from_hf(hf) == cfg


def _release_msa_config(**msa):
  """The release's config.json: msa_config without doc_top_k and routing_score."""
  hf = hf_config_dict(preset("qwen3-4b"), "msa", "bfloat16")
  for key in ("doc_top_k", "routing_score"):
    del hf["msa_config"][key]
  hf["msa_config"].update(msa)
  return hf


def test_doc_top_k_is_the_engines_k():
  """The authors' engine reads doc_top_k (documents, question offset 3 + doc_top_k)."""
  hf = hf_config_dict(preset("qwen3-4b", top_k=5), "msa", "bfloat16")
  assert hf["msa_config"]["doc_top_k"] == hf["msa_config"]["top_k_docs"] == 5
  assert model_config_from_hf(_release_msa_config(top_k_docs=7)).top_k == 7
  only_engine = _release_msa_config(doc_top_k=9)
  del only_engine["msa_config"]["top_k_docs"]
  assert model_config_from_hf(only_engine).top_k == 9
  with pytest.raises(CheckpointError, match=r"doc_top_k=4 differs from top_k_docs=16.*set both"):
    model_config_from_hf(_release_msa_config(doc_top_k=4))


def test_routing_score_round_trips_and_a_release_dir_keeps_cosine():
  assert model_config_from_hf(_release_msa_config()).routing_score == "cosine"
  cfg = preset("qwen3-4b", routing_score="scaled_dot")
  hf = hf_config_dict(cfg, "msa", "bfloat16")
  assert hf["msa_config"]["routing_score"] == "scaled_dot"
  assert hf["msa_config"]["aux_loss_method"] == "INFONCE_DECOUPLE"
  assert model_config_from_hf(hf).routing_score == "scaled_dot"
  assert model_config_from_hf(_release_msa_config(), routing_score="scaled_dot").routing_score \
      == "scaled_dot"
  with pytest.raises(CheckpointError, match="routing_score must be"):
    model_config_from_hf(_release_msa_config(routing_score="dot"))
