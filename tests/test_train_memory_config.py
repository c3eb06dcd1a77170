"""The training-scale config keys: bucket caps, the LM-loss chunk, the compilation cache."""
import jax
import ml_collections
import numpy as np
import pytest

from msa_jax.data import buckets as bucket_lib
from msa_jax.data import from_config
from msa_jax.train_step import lm_chunk_size
from msa_jax.trainer import use_compilation_cache

from train_common import shared_train_setups, get_config, small_cfg  # noqa: F401


def test_bucket_caps_come_from_the_config_and_bound_the_buckets():
  cfg = get_config("smoke")
  assert bucket_lib.bucket_levels(cfg.data) == {"memory_levels": 3, "active_levels": 4,
                                                 "doc_multiple": None}
  source = from_config.make_source(cfg.data, cfg.seed, None)
  four = bucket_lib.buckets_for(source, 8, 2, **bucket_lib.bucket_levels(cfg.data))
  cfg.data.active_buckets = 1
  one = bucket_lib.buckets_for(source, 8, 2, **bucket_lib.bucket_levels(cfg.data))
  assert len(one) == 1 < len(four)
  assert one[0].active == max(b.active for b in four)   # still fits every sample
  for variant in ("0.6b", "4b"):
    assert get_config(variant).data.active_buckets == 1


def test_a_zero_bucket_cap_is_refused_naming_the_key():
  cfg = get_config("smoke")
  cfg.data.memory_buckets = 0
  with pytest.raises(ValueError, match=r"data.memory_buckets must be >= 1.*--config.data"):
    bucket_lib.bucket_levels(cfg.data)


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


def test_document_slots_need_not_be_whole_chunks():
  """``data.doc_slot_multiple``: slots of 7 tokens with P = 2 (the last chunk partial) give
  the training forward the same losses and gradients as slots of 8 (whole chunks): pooling
  masks the partial chunk, so the slot length only sets the padding."""
  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np
  from msa_jax.config import ModelConfig
  from msa_jax.model import MSAModel
  from msa_jax.train_step import compute_losses
  from tests import reference_numpy as R
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=16, router_layers=(1,),
                    pooling_chunk_size=2, top_k=2)
  rng = np.random.default_rng(0)
  doc_lens = [[7, 5, 3, 0], [6, 7, 1, 2]]
  b7 = R.make_batch(rng, vocab=64, prefix_lens=[1, 1], doc_lens=doc_lens, active_lens=[6, 5],
                    question_lens=[3, 2], T=1, L=7, M=6)
  pad = lambda x: np.pad(x, [(0, 0), (0, 0), (0, 1)])  # noqa: E731
  b8 = b7.replace(doc_tokens=pad(b7.doc_tokens), doc_mask=pad(b7.doc_mask))
  model = MSAModel(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32)))["params"]
  train = {"loss": {"infonce_temperature": 0.1, "lm_chunk_size": 64},
           "optim": {"warmup_phase_steps": 0, "warmup_lm_weight": 0.1, "warmup_aux_weight": 1.0,
                     "main_lm_weight": 1.0, "main_aux_weight": 0.1}}
  train = ml_collections.ConfigDict(train)
  loss = lambda p, b: compute_losses(model, p, b, jnp.int32(5), train)[0]  # noqa: E731
  (l7, g7), (l8, g8) = (jax.jit(jax.value_and_grad(loss))(params, b) for b in (b7, b8))
  np.testing.assert_allclose(float(l7), float(l8), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g7), jax.tree.leaves(g8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_doc_slot_multiple_sets_the_slot_rounding():
  cfg = get_config("smoke")
  source = from_config.make_source(cfg.data, cfg.seed, None)
  cfg.data.doc_slot_multiple = 0
  whole = bucket_lib.buckets_for(source, 8, 3, **bucket_lib.bucket_levels(cfg.data))
  cfg.data.doc_slot_multiple = 1
  tight = bucket_lib.buckets_for(source, 8, 3, **bucket_lib.bucket_levels(cfg.data))
  # 8-token documents, P = 3: whole chunks pad them to 9 slots, a multiple of 1 to 8
  assert {b.doc_len for b in whole} == {9} and {b.doc_len for b in tight} == {8}
  cfg.data.doc_slot_multiple = -1
  with pytest.raises(ValueError, match="doc_slot_multiple must be >= 0"):
    bucket_lib.bucket_levels(cfg.data)


@pytest.mark.slow   # ~40 s on the CI CPU
def test_a_run_trains_each_batch_curriculum_stage_at_its_size(tmp_path, shared_train_setups):
  """Two stages of ``data.batch_curriculum``: each logged step's tokens and target count
  come from its stage's batch (16 examples, then the configured 8)."""
  from msa_jax.trainer import train_and_evaluate
  cfg = small_cfg()
  cfg.num_steps, cfg.optim.warmup_phase_steps = 4, 1
  cfg.data.batch_curriculum = ((0, 16), (2, 8))
  steps, rows = [], []
  train_and_evaluate(cfg, str(tmp_path), on_step=lambda s, m: (steps.append(s), rows.append(m)))
  assert steps == [1, 2, 3, 4]
  tokens = [r["tokens_per_step"] for r in rows]
  # A step's tokens depend on its bucket (active length 8 or 24) and its batch size.
  assert min(tokens[:2]) > 1.6 * max(tokens[2:]), tokens
  assert all(np.isfinite(r["loss"]) for r in rows)
