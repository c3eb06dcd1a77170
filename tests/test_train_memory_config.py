"""The training-scale config keys: bucket caps, the LM-loss chunk, the compilation cache."""
import jax
import ml_collections
import pytest

from msa_jax.data import from_config
from msa_jax.train_step import lm_chunk_size
from msa_jax.trainer import use_compilation_cache

from train_common import get_config


def test_bucket_caps_come_from_the_config_and_bound_the_buckets():
  cfg = get_config("smoke")
  assert from_config.bucket_levels(cfg.data) == {"memory_levels": 3, "active_levels": 4}
  source = from_config.make_source(cfg.data, cfg.seed, None)
  four = from_config.buckets_for(source, 8, 2, **from_config.bucket_levels(cfg.data))
  cfg.data.active_buckets = 1
  one = from_config.buckets_for(source, 8, 2, **from_config.bucket_levels(cfg.data))
  assert len(one) == 1 < len(four)
  assert one[0].active == max(b.active for b in four)   # still fits every sample
  for variant in ("0.6b", "4b"):
    assert get_config(variant).data.active_buckets == 1


def test_a_zero_bucket_cap_is_refused_naming_the_key():
  cfg = get_config("smoke")
  cfg.data.memory_buckets = 0
  with pytest.raises(ValueError, match=r"data.memory_buckets must be >= 1.*--config.data"):
    from_config.bucket_levels(cfg.data)


def test_lm_chunk_size_default_and_override():
  assert lm_chunk_size(get_config("smoke")) == 64
  assert lm_chunk_size(ml_collections.ConfigDict({"loss": {"lm_chunk_size": 8}})) == 8
  assert lm_chunk_size(ml_collections.ConfigDict({})) == 64   # a config that predates it


def test_compilation_cache_dir_is_set_only_when_given(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    use_compilation_cache("")
    assert jax.config.jax_compilation_cache_dir == before
    use_compilation_cache(str(tmp_path / "xla_cache"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla_cache")
    assert (tmp_path / "xla_cache").is_dir()
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
