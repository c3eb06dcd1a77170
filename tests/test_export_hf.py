"""HF Qwen3 safetensors ↔ msa_jax: logits parity, names, shards, dtypes (SPEC §1, §7)."""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import msa_jax  # noqa: E402
from msa_jax.export import safetensors_io  # noqa: E402
from msa_jax.export.testing import random_qwen3, read_safetensors_dir, torch_logits  # noqa: E402

SHAPES = {
    # name: (tie_word_embeddings, num_heads, num_kv_heads, head_dim); hidden is 64.
    "untied-gqa2-hd24": (False, 4, 2, 24),   # head_dim != hidden / heads
    "tied-mha-hd16": (True, 4, 4, 16),       # GQA ratio 1
    "tied-gqa4-hd8": (True, 4, 1, 8),
}


def _ids(vocab=256, shape=(2, 13), seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _apply(model, params, ids):
  return np.asarray(jax.jit(model.apply)({"params": params}, ids))


@pytest.fixture(scope="module", params=sorted(SHAPES))
def hf_model(request):
  tie, heads, kv_heads, head_dim = SHAPES[request.param]
  return random_qwen3(num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      tie_word_embeddings=tie)


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_from_pretrained_matches_hf_logits(hf_model, sharded, tmp_path):
  hf_model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
  has_index = os.path.exists(tmp_path / safetensors_io.INDEX_FILE)
  assert has_index == sharded
  model, params = msa_jax.from_pretrained(tmp_path)
  cfg = model.config
  hf_cfg = hf_model.config
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == (
      hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.head_dim,
      hf_cfg.tie_word_embeddings)
  assert cfg.rope_theta == 1e6 and cfg.router_layer_ids == (1,)
  ids = _ids()
  logits = _apply(model, params, ids)
  assert logits.dtype == np.float32 and logits.shape == (2, 13, 256)
  np.testing.assert_allclose(logits, torch_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_save_hf_reloads_in_transformers(hf_model, tmp_path):
  hf_model.save_pretrained(tmp_path / "src")
  model, params = msa_jax.from_pretrained(tmp_path / "src")
  msa_jax.save_pretrained(model, params, tmp_path / "out", format="hf")
  reloaded = transformers.Qwen3ForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  ids = _ids(seed=1)
  np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(hf_model, ids),
                             atol=1e-4, rtol=0)
  ours = read_safetensors_dir(tmp_path / "out")
  theirs = read_safetensors_dir(tmp_path / "src")
  assert set(ours) == set(theirs)
  state_keys = set(hf_model.state_dict())
  if hf_model.config.tie_word_embeddings:
    state_keys.discard("lm_head.weight")
  assert set(ours) == state_keys
  for name, tensor in theirs.items():
    np.testing.assert_array_equal(ours[name], tensor, err_msg=name)


def test_written_config_loads_in_qwen3config(tmp_path):
  model = msa_jax.MSAModel(msa_jax.preset("tiny", tie_word_embeddings=False, rope_theta=5e5,
                                          rms_norm_eps=1e-5))
  params = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32),
                        msa_jax.export.abstract_params(model))
  msa_jax.save_pretrained(model, params, tmp_path, format="hf",
                          extra_config={"max_position_embeddings": 1024})
  config = transformers.Qwen3Config.from_pretrained(tmp_path)
  cfg = model.config
  assert (config.vocab_size, config.hidden_size, config.intermediate_size,
          config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
          config.head_dim, config.rms_norm_eps, config.tie_word_embeddings,
          config.max_position_embeddings) == (
              cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
              cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 1e-5, False, 1024)
  assert config.rope_parameters["rope_theta"] == 5e5
  raw = json.loads((tmp_path / "config.json").read_text())
  assert raw["torch_dtype"] == raw["dtype"] == "float32"
  assert raw["model_type"] == "qwen3" and raw["architectures"] == ["Qwen3ForCausalLM"]


def test_sharded_write_has_valid_index_transformers_loads(tmp_path):
  hf_model = random_qwen3(num_layers=3, tie_word_embeddings=False)
  hf_model.save_pretrained(tmp_path / "src")
  model, params = msa_jax.from_pretrained(tmp_path / "src")
  msa_jax.save_pretrained(model, params, tmp_path / "out", format="hf", max_shard_size="30KB")
  shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
  assert len(shards) >= 3
  assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert not (tmp_path / "out" / "model.safetensors").exists()
  index = json.loads((tmp_path / "out" / safetensors_io.INDEX_FILE).read_text())
  tensors = read_safetensors_dir(tmp_path / "out")
  for shard in shards:  # within the limit, unless one tensor alone exceeds it
    members = [n for n, f in index["weight_map"].items() if f == shard]
    assert len(members) == 1 or sum(tensors[n].nbytes for n in members) <= 30_000, shard
  assert set(index["weight_map"].values()) == set(shards)
  assert set(index["weight_map"]) == set(hf_model.state_dict())
  total = sum(t.nbytes for t in tensors.values())
  assert index["metadata"]["total_size"] == total
  reloaded = transformers.Qwen3ForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  ids = _ids(seed=2)
  np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(hf_model, ids),
                             atol=1e-4, rtol=0)
  # A second, unsharded save into the same dir leaves no stale shards behind.
  msa_jax.save_pretrained(model, params, tmp_path / "out", format="hf")
  assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]


def test_bf16_checkpoint_keeps_dtype_and_round_trips_bitwise(tmp_path):
  hf_model = random_qwen3(num_layers=2, tie_word_embeddings=True, dtype="bfloat16")
  hf_model.save_pretrained(tmp_path / "src")
  model, params = msa_jax.from_pretrained(tmp_path / "src")
  assert model.config.param_dtype == "bfloat16" and model.config.dtype == "bfloat16"
  dtypes = {x.dtype for x in jax.tree.leaves(params)}
  assert dtypes == {np.dtype(ml_dtypes.bfloat16)}
  msa_jax.save_pretrained(model, params, tmp_path / "out", format="hf")
  src = read_safetensors_dir(tmp_path / "src")
  out = read_safetensors_dir(tmp_path / "out")
  assert set(src) == set(out)
  for name, tensor in src.items():
    assert out[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out[name].view(np.uint16), tensor.view(np.uint16),
                                  err_msg=name)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dtype_option_casts_on_read_and_write(tmp_path):
  hf_model = random_qwen3(num_layers=2)
  hf_model.save_pretrained(tmp_path / "src")
  model, params = msa_jax.from_pretrained(tmp_path / "src", dtype="bfloat16",
                                          compute_dtype="float32")
  assert model.config.param_dtype == "bfloat16" and model.config.dtype == "float32"
  assert params["layers_0"]["q_proj"]["kernel"].dtype == ml_dtypes.bfloat16
  ids = _ids(seed=3)
  np.testing.assert_allclose(_apply(model, params, ids), torch_logits(hf_model, ids),
                             atol=5e-2, rtol=0)
  msa_jax.save_pretrained(model, params, tmp_path / "out", format="hf", dtype="float32")
  out = read_safetensors_dir(tmp_path / "out")
  src = read_safetensors_dir(tmp_path / "src")
  name = "model.layers.0.self_attn.q_proj.weight"
  assert out[name].dtype == np.float32
  np.testing.assert_array_equal(out[name], src[name].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_redundant_tied_lm_head_is_accepted(tmp_path):
  hf_model = random_qwen3(num_layers=2, tie_word_embeddings=True)
  hf_model.save_pretrained(tmp_path)
  tensors = read_safetensors_dir(tmp_path)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  os.remove(tmp_path / "model.safetensors")
  import safetensors.numpy
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  model, params = msa_jax.from_pretrained(tmp_path)
  assert "lm_head" not in params
  ids = _ids(seed=4)
  np.testing.assert_allclose(_apply(model, params, ids), torch_logits(hf_model, ids),
                             atol=1e-4, rtol=0)
