"""The name table and shard planning, without torch."""
import pytest

from msa_jax.config import preset
from msa_jax.export import names, safetensors_io


def test_table_is_one_to_one_and_complete():
  cfg = preset("tiny", tie_word_embeddings=False, router_layers=(1, 3))
  entries = names.tensor_entries(cfg, "msa")
  assert len({e.torch_name for e in entries}) == len({e.param_path for e in entries}) == len(
      entries) == 2 + 11 * 4 + 2 * 2 + 1
  by_name = {e.torch_name: e for e in entries}
  assert by_name["model.layers.3.self_attn.router_k_proj.0.weight"].param_path == (
      "layers_3", "router_k_proj", "kernel")
  assert by_name["model.layers.0.mlp.down_proj.weight"].transpose
  assert not by_name["model.layers.0.self_attn.q_norm.weight"].transpose
  assert by_name["lm_head.weight"].param_path == ("lm_head", "kernel")
  hf = names.tensor_entries(cfg, "hf")
  assert {e.torch_name for e in hf} == {e.torch_name for e in entries if not e.is_router}
  tied = names.tensor_entries(cfg.replace(tie_word_embeddings=True), "hf")
  assert "lm_head.weight" not in {e.torch_name for e in tied}
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    names.tensor_entries(cfg, "gguf")


@pytest.mark.parametrize("size,expected", [
    (123, 123), ("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("10KiB", 10 * 1024),
    ("1.5kb", 1500), ("2G", 2 * 10**9)])
def test_parse_size(size, expected):
  assert safetensors_io.parse_size(size) == expected


def test_plan_shards_is_greedy_and_isolates_big_tensors():
  assert safetensors_io.plan_shards([4, 4, 4, 20, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
  assert safetensors_io.plan_shards([1, 2, 3], 100) == [[0, 1, 2]]
