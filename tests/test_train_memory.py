"""The training loss never materialises ``[B, M, vocab]`` logits, and is the same loss.

``losses.lm_loss_chunked`` on ``MSAModel.forward_train``'s hidden states must equal
``losses.lm_loss`` on ``forward_memory``'s logits (value and gradients, float32), and the
compiled gradient step must need much less temporary memory (XLA's ``memory_analysis``,
compile only: nothing runs at the mid shape).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msa_jax import losses
from msa_jax.batch import MSABatch
from msa_jax.config import ModelConfig
from msa_jax.model import MSAModel, lm_head_weight_vd
from msa_jax.train_step import compute_losses

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()


def _old_loss(model, params, batch):
  out = model.apply({"params": params}, batch)
  return losses.lm_loss(out.logits_bmv, batch.targets, batch.loss_mask)[0]


def _new_loss(model, params, batch, chunk):
  out = model.apply({"params": params}, batch, method=MSAModel.forward_train)
  return losses.lm_loss_chunked(out.hidden_bmd, lm_head_weight_vd(params, model.config),
                                batch.targets, batch.loss_mask, chunk)[0]


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_lm_loss_equals_the_full_logits_loss(tie):
  cfg = ModelConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_layers=3,
                    num_heads=2, num_kv_heads=1, head_dim=8, pooling_chunk_size=2, top_k=1,
                    tie_word_embeddings=tie)
  # Rows with targets at different offsets and counts (7, 4, 0, 7 of 11 slots): with
  # chunks of 3, chunk 4 (slots 9..10) has no target in any row and is skipped.
  batch = R.make_batch(np.random.default_rng(0), vocab=97, prefix_lens=[1, 0, 2, 1],
                       doc_lens=[[3, 4, 2], [2, 3, 0], [1, 1, 1], [2, 2, 2]],
                       active_lens=[9, 7, 4, 11], question_lens=[2, 3, 4, 4])
  mask = np.asarray(batch.loss_mask)
  assert mask.sum(1).tolist() == [7, 4, 0, 7], mask.sum(1)
  model, variables = R.init_model(cfg, batch, seed=1)
  want, want_g = jax.jit(jax.value_and_grad(lambda p: _old_loss(model, p, batch)))(
      variables["params"])
  for chunk in (3, 64):   # 3: a partial last chunk, some skipped; 64 > M: one chunk
    got, got_g = jax.jit(jax.value_and_grad(lambda p: _new_loss(model, p, batch, chunk)))(
        variables["params"])
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want)), (chunk, got, want)
    flat_want = jax.tree_util.tree_leaves_with_path(want_g)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_g),
                            jax.tree.leaves(want_g)):
      assert R.rel_err(g, w) <= 1e-5, (chunk, jax.tree_util.keystr(path))
    assert len(flat_want) == len(jax.tree.leaves(got_g))


def test_compute_losses_uses_the_chunked_loss_and_no_logits():
  cfg = ModelConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=8, pooling_chunk_size=2, top_k=1)
  batch = R.make_batch(np.random.default_rng(1), vocab=97, prefix_lens=[1, 0],
                       doc_lens=[[3, 4], [2, 3]], active_lens=[9, 7], question_lens=[2, 3])
  model, variables = R.init_model(cfg, batch, seed=2)
  train_cfg = ml_collections.ConfigDict({
      "loss": {"infonce_temperature": 0.1, "lm_chunk_size": 2},
      "optim": {"warmup_phase_steps": 0, "warmup_lm_weight": 0.1, "warmup_aux_weight": 1.0,
                "main_lm_weight": 1.0, "main_aux_weight": 0.1}})
  _, metrics = jax.jit(lambda p: compute_losses(model, p, batch, jnp.int32(5), train_cfg))(
      variables["params"])
  want = float(_old_loss(model, variables["params"], batch))
  np.testing.assert_allclose(float(metrics["lm_loss"]), want, rtol=1e-6)
  jaxpr = str(jax.make_jaxpr(lambda p: compute_losses(model, p, batch, jnp.int32(5),
                                                      train_cfg))(variables["params"]))
  m = np.shape(batch.active_tokens)[1]
  assert f"{m},97]" not in jaxpr   # no [.., M, vocab] array anywhere in the loss


def _abstract_batch(b, t, n, l, m):
  s = jax.ShapeDtypeStruct
  return MSABatch(s((b, t), jnp.int32), s((b, t), bool), s((b, n, l), jnp.int32),
                  s((b, n, l), bool), s((b, m), jnp.int32), s((b, m), bool), s((b, m), bool),
                  s((b, m), jnp.int32), s((b, m), bool), s((b, n), bool))


def test_peak_temporary_memory_drops_at_a_mid_shape():
  """B 8, M 256 active slots, vocab 16000: the full-logits gradient holds several
  ``[8, 256, 16000]`` float32 arrays (125 MiB each); the chunked one one chunk's."""
  cfg = ModelConfig(vocab_size=16000, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, pooling_chunk_size=8, top_k=2)
  batch = _abstract_batch(8, 4, 8, 32, 256)
  model = MSAModel(cfg)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch))["params"]

  def temp_mib(loss):
    compiled = jax.jit(jax.grad(loss)).lower(params, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  old = temp_mib(lambda p, b: _old_loss(model, p, b))
  new = temp_mib(lambda p, b: _new_loss(model, p, b, 32))
  logits_mib = 8 * 256 * 16000 * 4 / 2 ** 20
  assert old > 3 * logits_mib, old            # the old step really holds the logits
  assert new < 0.3 * old, (new, old)


def test_bf16_chunked_loss_is_as_close_to_float32_as_the_full_logits_loss():
  """In bfloat16 the two losses round differently; against the float32 model both
  gradients must be equally close (the chunked one no worse than 1.25x the old)."""
  cfg = ModelConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_layers=3,
                    num_heads=2, num_kv_heads=1, head_dim=8, pooling_chunk_size=2, top_k=1,
                    dtype="bfloat16")
  batch = R.make_batch(np.random.default_rng(0), vocab=97, prefix_lens=[1, 0, 2],
                       doc_lens=[[3, 4, 2], [2, 3, 0], [1, 1, 1]], active_lens=[9, 7, 11],
                       question_lens=[2, 3, 4])
  model, variables = R.init_model(cfg, batch, seed=1)
  model32 = MSAModel(cfg.replace(dtype="float32"))
  grad = lambda f: jax.jit(jax.value_and_grad(f))(variables["params"])
  truth, truth_g = grad(lambda p: _old_loss(model32, p, batch))
  old, old_g = grad(lambda p: _old_loss(model, p, batch))
  new, new_g = grad(lambda p: _new_loss(model, p, batch, 3))
  assert abs(float(new) - float(truth)) <= 1e-2 * abs(float(truth))
  err = lambda g: max(R.rel_err(a, t) for a, t in zip(jax.tree.leaves(g),
                                                      jax.tree.leaves(truth_g)))
  assert err(new_g) <= 1.25 * err(old_g), (err(new_g), err(old_g))
  assert err(new_g) < 0.05


def test_per_row_nll_and_the_answer_and_id_losses_against_float64():
  """``lm_nll_rows_chunked`` gives each row's NLL sum (float64 numpy from the same hidden
  states), and ``lm_loss_by_round`` splits rows by their first target token, leaving
  direct samples (ids, then the marker, in one target) out of both."""
  from msa_jax.train_step import lm_loss_by_round
  rng = np.random.default_rng(3)
  b, m, d, v = 5, 9, 8, 13
  answer_token = 7
  h = rng.standard_normal((b, m, d)).astype(np.float32)
  head = rng.standard_normal((v, d)).astype(np.float32)
  targets = rng.integers(0, v - 1, (b, m)).astype(np.int32)
  targets[targets == answer_token] = v - 1               # the marker only where set below
  mask = np.zeros((b, m), bool)
  mask[0, 2:5] = mask[1, 4:9] = mask[3, 0:2] = mask[4, 1:8] = True   # row 2: no target
  targets[0, 2] = answer_token                           # row 0: an answer sample
  targets[4, 5] = answer_token                           # row 4: a direct sample
  for chunk in (2, 64):
    nll_b, count_b = losses.lm_nll_rows_chunked(jnp.asarray(h), jnp.asarray(head), targets,
                                                mask, chunk)
    logits = h.astype(np.float64) @ head.astype(np.float64).T
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    want_b = (nll * mask).sum(1)
    np.testing.assert_allclose(np.asarray(nll_b), want_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(count_b), mask.sum(1))
    batch = MSABatch(*([None] * 7), targets=targets, loss_mask=mask, positive_docs=None)
    split = lm_loss_by_round(nll_b, count_b, batch, answer_token)
    np.testing.assert_allclose(float(split["lm_loss_answer"]), want_b[0] / 3, rtol=1e-5)
    np.testing.assert_allclose(float(split["lm_loss_retrieval"]),
                               (want_b[1] + want_b[3]) / 7, rtol=1e-5)
    assert float(split["answer_samples"]) == 1.0
    assert float(split["direct_samples"]) == 1.0
    assert float(split["retrieval_samples"]) == 2.0
