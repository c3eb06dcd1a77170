"""Checkpoint conversion fails with messages that name the file, tensor or key."""
import json
import os

import numpy as np
import pytest
import safetensors.numpy

pytest.importorskip("torch")
pytest.importorskip("transformers")

import msa_jax  # noqa: E402
from msa_jax.export import CheckpointError  # noqa: E402
from msa_jax.export.testing import random_qwen3, read_safetensors_dir  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A saved tiny Qwen3: (config dict, tensors)."""
  d = tmp_path_factory.mktemp("src")
  random_qwen3(num_layers=2, tie_word_embeddings=False).save_pretrained(d)
  return json.loads((d / "config.json").read_text()), read_safetensors_dir(d)


def _write(directory, config, tensors):
  directory.mkdir(parents=True, exist_ok=True)
  if config is not None:
    (directory / "config.json").write_text(json.dumps(config))
  if tensors is not None:
    safetensors.numpy.save_file(tensors, directory / "model.safetensors",
                                metadata={"format": "pt"})
  return directory


def test_empty_dir(tmp_path):
  with pytest.raises(CheckpointError, match="not a checkpoint: no config.json"):
    msa_jax.from_pretrained(tmp_path)


def test_not_a_dir(tmp_path):
  with pytest.raises(CheckpointError, match="not a directory"):
    msa_jax.from_pretrained(tmp_path / "nope")


def test_config_without_weights(source, tmp_path):
  _write(tmp_path, source[0], None)
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(CheckpointError, match=r"no weights.*pytorch_model\.bin.*only safetensors"):
    msa_jax.from_pretrained(tmp_path)


def test_missing_tensor_is_named(source, tmp_path):
  tensors = dict(source[1])
  del tensors["model.layers.1.mlp.up_proj.weight"]
  _write(tmp_path, source[0], tensors)
  with pytest.raises(CheckpointError,
                     match=r"missing tensor\(s\) \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
    msa_jax.from_pretrained(tmp_path)


def test_missing_untied_lm_head_is_named(source, tmp_path):
  tensors = {k: v for k, v in source[1].items() if k != "lm_head.weight"}
  _write(tmp_path, source[0], tensors)
  with pytest.raises(CheckpointError, match="'lm_head.weight'"):
    msa_jax.from_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(source, tmp_path):
  config = dict(source[0], intermediate_size=source[0]["intermediate_size"] * 2)
  _write(tmp_path, config, source[1])
  with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has "
                                            r"shape \(96, 64\), expected \(192, 64\)"):
    msa_jax.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(source, tmp_path):
  tensors = dict(source[1])
  tensors["model.layers.0.self_attn.router_q_proj.0.weight"] = np.zeros((96, 64), np.float32)
  _write(tmp_path, source[0], tensors)
  with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['model\.layers\.0\."
                                            r"self_attn\.router_q_proj\.0\.weight'\]"):
    msa_jax.from_pretrained(tmp_path)


def test_unknown_model_type(source, tmp_path):
  _write(tmp_path, dict(source[0], model_type="llama"), source[1])
  with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
    msa_jax.from_pretrained(tmp_path)


def test_msa_without_msa_config(source, tmp_path):
  _write(tmp_path, dict(source[0], model_type="msa"), source[1])
  with pytest.raises(CheckpointError, match="needs an 'msa_config'"):
    msa_jax.from_pretrained(tmp_path)


def test_msa_router_weights_missing_are_named(source, tmp_path):
  config = dict(source[0], model_type="msa", msa_config={"router_layer_idx": "1"})
  _write(tmp_path, config, source[1])
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.router_q_proj\.0"):
    msa_jax.from_pretrained(tmp_path)


def test_unsupported_msa_reduce_method(source, tmp_path):
  config = dict(source[0], model_type="msa", msa_config={"head_reduce_method": "max"})
  _write(tmp_path, config, source[1])
  with pytest.raises(CheckpointError, match="head_reduce_method='max' is not supported"):
    msa_jax.from_pretrained(tmp_path)


def test_corrupt_index_names_missing_shard(source, tmp_path):
  model_dir = _write(tmp_path / "m", source[0], None)
  random_qwen3(num_layers=2, tie_word_embeddings=False).save_pretrained(
      model_dir, max_shard_size="20KB")
  shards = sorted(p.name for p in model_dir.glob("model-*.safetensors"))
  os.remove(model_dir / shards[1])
  with pytest.raises(CheckpointError, match=f"shard '{shards[1]}' is listed in weight_map but "
                                            "missing"):
    msa_jax.from_pretrained(model_dir)


def test_index_pointing_at_wrong_shard(source, tmp_path):
  model_dir = _write(tmp_path / "m", source[0], None)
  random_qwen3(num_layers=2, tie_word_embeddings=False).save_pretrained(
      model_dir, max_shard_size="20KB")
  index_path = model_dir / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  shards = sorted(set(index["weight_map"].values()))
  name = next(n for n, f in index["weight_map"].items() if f != shards[0])
  index["weight_map"][name] = shards[0]
  index_path.write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=f"tensor '{name}' is mapped to shard"):
    msa_jax.from_pretrained(model_dir)


def test_bad_options(source, tmp_path):
  _write(tmp_path, source[0], source[1])
  with pytest.raises(ValueError, match="router_init must be one of"):
    msa_jax.from_pretrained(tmp_path, router_init="zeros")
  with pytest.raises(TypeError, match="dtype="):
    msa_jax.from_pretrained(tmp_path, param_dtype="bfloat16")
  model, params = msa_jax.from_pretrained(tmp_path)
  with pytest.raises(ValueError, match="unknown format 'gguf'"):
    msa_jax.save_pretrained(model, params, tmp_path / "o", format="gguf")
  with pytest.raises(ValueError, match="bad max_shard_size"):
    msa_jax.save_pretrained(model, params, tmp_path / "o", max_shard_size="lots")


def test_save_with_params_of_another_shape(source, tmp_path):
  _write(tmp_path, source[0], source[1])
  model, params = msa_jax.from_pretrained(tmp_path)
  other = msa_jax.MSAModel(model.config.replace(intermediate_size=32))
  with pytest.raises(CheckpointError, match=r"param layers_0/mlp/gate_proj/kernel has shape "
                                            r"\(64, 96\), expected \(64, 32\)"):
    msa_jax.save_pretrained(other, params, tmp_path / "o")
