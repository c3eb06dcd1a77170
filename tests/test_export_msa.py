"""MSA-4B format (SPEC §7), router initialisation and native msa_jax checkpoints."""
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import msa_jax  # noqa: E402
from msa_jax.export import save_msa_jax_checkpoint  # noqa: E402
from msa_jax.export.testing import random_qwen3, read_safetensors_dir, torch_logits  # noqa: E402

MSA_CONFIG_KEYS = {
    "router_layer_idx", "top_k_docs", "pooling_kernel_size", "decouple_router",
    "head_reduce_method", "query_reduce_method", "chunk_reduce_method",
    "decouple_pooling_mode", "aux_loss_method", "infonce_loss_temp", "rewrite_position",
    "aux_loss", "lmloss_weigth", "auxloss_weight", "recloss_weight", "ansloss_weight",
    "doc_top_k", "routing_score"}
RELEASE_VALUES = {
    "decouple_router": True, "head_reduce_method": "mean", "query_reduce_method": "max",
    "chunk_reduce_method": "max", "decouple_pooling_mode": "mean",
    "aux_loss_method": "INFONCE_DECOUPLE", "infonce_loss_temp": 0.1, "rewrite_position": True,
    "aux_loss": False, "lmloss_weigth": 1.0, "auxloss_weight": 0.1, "recloss_weight": 0.0,
    "ansloss_weight": 1.0}
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _ids(seed=0, vocab=256):
  return np.random.default_rng(seed).integers(0, vocab, (2, 9)).astype(np.int32)


def _apply(model, params, ids):
  return np.asarray(jax.jit(model.apply)({"params": params}, ids))


def _bits(x):
  return x.view(np.uint16) if x.dtype == ml_dtypes.bfloat16 else x.view(np.uint32)


def write_release_style_dir(directory, hf_model, router_layers, dtype, temperature=True,
                            router_layer_idx=None, seed=0):
  """An MSA-4B-style dir written by hand (independently of msa_jax.export)."""
  rng = np.random.default_rng(seed)
  cfg = hf_model.config
  np_dtype = NP_DTYPES[dtype]
  tensors = {k: v.float().numpy().astype(np_dtype) for k, v in hf_model.state_dict().items()}
  if cfg.tie_word_embeddings:
    del tensors["lm_head.weight"]
  for i in router_layers:
    prefix = f"model.layers.{i}.self_attn"
    tensors[f"{prefix}.router_q_proj.0.weight"] = rng.normal(
        0, 0.05, (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)).astype(np_dtype)
    tensors[f"{prefix}.router_k_proj.0.weight"] = rng.normal(
        0, 0.05, (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size)).astype(np_dtype)
  if temperature:
    tensors["temperature"] = np.asarray(0.1, np_dtype)
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  config = cfg.to_dict()
  config.update(model_type="msa", architectures=["MSAForCausalLM"], torch_dtype=dtype,
                msa_config=dict(RELEASE_VALUES, top_k_docs=3, pooling_kernel_size=8,
                                router_layer_idx=router_layer_idx or
                                ",".join(map(str, router_layers))))
  (directory / "config.json").write_text(json.dumps(config))
  return tensors


@pytest.fixture(scope="module")
def hf_model():
  return random_qwen3(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=24,
                      tie_word_embeddings=True)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
  d = tmp_path_factory.mktemp("qwen3")
  hf_model.save_pretrained(d)
  return d


def test_msa_format_names_shapes_and_config(hf_model, hf_dir, tmp_path):
  model, params = msa_jax.from_pretrained(hf_dir, router_layers=(0, 2), top_k=5,
                                          pooling_chunk_size=7)
  msa_jax.save_pretrained(model, params, tmp_path, format="msa")
  tensors = read_safetensors_dir(tmp_path)
  qwen3_keys = set(hf_model.state_dict()) - {"lm_head.weight"}  # tied
  router_keys = {f"model.layers.{i}.self_attn.router_{p}_proj.0.weight"
                 for i in (0, 2) for p in ("q", "k")}
  assert set(tensors) == qwen3_keys | router_keys | {"temperature"}
  for name in qwen3_keys:
    assert tensors[name].shape == tuple(hf_model.state_dict()[name].shape), name
  assert tensors["model.layers.2.self_attn.router_q_proj.0.weight"].shape == (4 * 24, 64)
  assert tensors["model.layers.2.self_attn.router_k_proj.0.weight"].shape == (2 * 24, 64)
  assert tensors["temperature"].shape == () and tensors["temperature"] == np.float32(0.1)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "msa" and config["architectures"] == ["MSAForCausalLM"]
  assert config["num_hidden_layers"] == 3 and config["head_dim"] == 24
  msa = config["msa_config"]
  assert set(msa) == MSA_CONFIG_KEYS
  assert msa["router_layer_idx"] == "0,2" and msa["top_k_docs"] == msa["doc_top_k"] == 5
  assert msa["routing_score"] == "cosine"
  assert msa["pooling_kernel_size"] == 7
  assert {k: msa[k] for k in RELEASE_VALUES} == RELEASE_VALUES


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("temperature", [True, False], ids=["with-temp", "without-temp"])
def test_msa_round_trip_is_bitwise(hf_model, dtype, temperature, tmp_path):
  src = write_release_style_dir(tmp_path / "src", hf_model, (1, 2), dtype, temperature)
  model, params = msa_jax.from_pretrained(tmp_path / "src")
  cfg = model.config
  assert (cfg.router_layer_ids, cfg.top_k, cfg.pooling_chunk_size, cfg.param_dtype) == (
      (1, 2), 3, 8, dtype)
  np.testing.assert_array_equal(
      np.asarray(params["layers_1"]["router_k_proj"]["kernel"]),
      src["model.layers.1.self_attn.router_k_proj.0.weight"].T)
  msa_jax.save_pretrained(model, params, tmp_path / "out", format="msa", max_shard_size="40KB")
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  out = read_safetensors_dir(tmp_path / "out")
  assert set(out) == set(src) | {"temperature"}
  for name, tensor in src.items():
    assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
    np.testing.assert_array_equal(_bits(out[name]), _bits(tensor), err_msg=name)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["msa_config"]["router_layer_idx"] == "1,2" and config["dtype"] == dtype


def test_msa_checkpoint_without_memory_is_qwen3(hf_model, tmp_path):
  write_release_style_dir(tmp_path, hf_model, (0, 1, 2), "float32", router_layer_idx="all")
  model, params = msa_jax.from_pretrained(tmp_path)
  assert model.config.router_layer_ids == (0, 1, 2)
  ids = _ids(1)
  np.testing.assert_allclose(_apply(model, params, ids), torch_logits(hf_model, ids),
                             atol=1e-4, rtol=0)
  msa_jax.save_pretrained(model, params, tmp_path / "out", format="msa")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["msa_config"]["router_layer_idx"] == "all"


def test_router_init_copy_qk_is_default(hf_dir):
  model, params = msa_jax.from_pretrained(hf_dir)
  assert model.config.router_layer_ids == (1, 2)  # upper half of 3 layers
  for i in (1, 2):
    layer = params[f"layers_{i}"]
    np.testing.assert_array_equal(layer["router_q_proj"]["kernel"], layer["q_proj"]["kernel"])
    np.testing.assert_array_equal(layer["router_k_proj"]["kernel"], layer["k_proj"]["kernel"])
  assert "router_q_proj" not in params["layers_0"]


def test_router_init_normal_is_seeded(hf_dir):
  _, p0 = msa_jax.from_pretrained(hf_dir, router_init="normal", seed=0)
  _, p0b = msa_jax.from_pretrained(hf_dir, router_init="normal", seed=0)
  _, p1 = msa_jax.from_pretrained(hf_dir, router_init="normal", seed=1)
  w = np.asarray(p0["layers_2"]["router_q_proj"]["kernel"])
  np.testing.assert_array_equal(w, p0b["layers_2"]["router_q_proj"]["kernel"])
  assert not np.allclose(w, p1["layers_2"]["router_q_proj"]["kernel"])
  assert not np.allclose(w, p0["layers_1"]["router_q_proj"]["kernel"])
  assert w.shape == (64, 96) and abs(w.std() - 0.02) < 0.003 and abs(w.mean()) < 0.003


def test_msa_jax_checkpoint_round_trip(hf_dir, tmp_path):
  model, params = msa_jax.from_pretrained(hf_dir, dtype="bfloat16", top_k=4)
  save_msa_jax_checkpoint(model, params, tmp_path / "ckpt")
  loaded_model, loaded = msa_jax.from_pretrained(tmp_path / "ckpt", kernels="xla")
  assert loaded_model.config == model.config
  flat = jax.tree_util.tree_leaves_with_path(params)
  flat_loaded = dict(jax.tree_util.tree_leaves_with_path(loaded))
  assert len(flat) == len(flat_loaded)
  for path, x in flat:
    assert flat_loaded[path].dtype == x.dtype
    np.testing.assert_array_equal(_bits(np.asarray(flat_loaded[path])), _bits(np.asarray(x)))
  with pytest.raises(ValueError, match="change the parameter shapes"):
    msa_jax.from_pretrained(tmp_path / "ckpt", router_layers=(0,))


def test_trainer_workdir_loads_newest_or_given_step(hf_dir, tmp_path):
  model, params = msa_jax.from_pretrained(hf_dir)
  (tmp_path / "checkpoints").mkdir()
  for step in (100, 200):
    scaled = jax.tree.map(lambda x, s=step: x * s, params)
    save_msa_jax_checkpoint(model, scaled, tmp_path / "checkpoints" / str(step))
    (tmp_path / "checkpoints" / str(step) / "msa_config.json").unlink()
  (tmp_path / "msa_config.json").write_text(json.dumps(model.config.to_dict()))
  embed = np.asarray(params["embed_tokens"]["embedding"])
  _, newest = msa_jax.from_pretrained(tmp_path)
  np.testing.assert_allclose(newest["embed_tokens"]["embedding"], embed * 200, rtol=1e-6)
  _, older = msa_jax.from_pretrained(tmp_path, step=100)
  np.testing.assert_allclose(older["embed_tokens"]["embedding"], embed * 100, rtol=1e-6)
