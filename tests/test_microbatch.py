"""Gradient accumulation (``config.microbatches``): k slices give the full batch's
gradient and metrics, the slices take rows from the whole batch, and configs it cannot
serve are refused with the fix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import microbatch
from msa_jax.data import from_config, interleave
from msa_jax.data.collate import collate, fit_bucket
from msa_jax.train_step import aux_loss_layers, compute_losses
from train_common import get_config, small_reading_model

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()


def _setup(doc_lm_weight=0.0):
  cfg = get_config("tiny")
  cfg.loss.aux_batch_negatives, cfg.loss.doc_lm_weight = False, doc_lm_weight
  task = from_config.make_task(cfg.data, 3, memory_tokens=80)
  sp = task.tokenizer.specials
  # (retrieval, answer) pairs of 3 examples reordered r0 a0 r1 r2 a1 a2: slices of 2 and
  # of 3 rows mix the two kinds differently, so their target-token counts differ.
  pairs = [interleave.expand(task(i), sp, False) for i in range(3)]
  samples = [pairs[0][0], pairs[0][1], pairs[1][0], pairs[2][0], pairs[1][1], pairs[2][1]]
  batch = collate(samples, fit_bucket(samples, len(samples)))
  model, params = small_reading_model(task.tokenizer.vocab_size, batch)
  return cfg, model, params, batch, sp.end_of_retrieval


# k 2 without the document loss is slow-marked: k 3 covers slicing with and without it
@pytest.mark.parametrize("k,doc_lm", [pytest.param(2, 0.0, marks=pytest.mark.slow), (3, 0.0),
                                      (3, 0.5)])
def test_accumulated_gradient_and_metrics_equal_the_full_batch(k, doc_lm):
  """Also with the document LM loss (the tiny recipe's drill): its slices' document target
  counts differ too, and each is weighted by its share."""
  cfg, model, params, batch, answer = _setup(doc_lm)
  if doc_lm:   # the first row's last document shorter, so the slices' doc targets differ
    doc_mask = np.array(batch.doc_mask)
    doc_mask[0, -1, doc_mask[0, -1].sum() // 2:] = False
    batch = batch.replace(doc_mask=doc_mask)
  step = jnp.int32(10_000)          # past the warm-up: both loss terms weighted
  loss_fn = lambda p, b: compute_losses(model, p, b, step, cfg, answer)
  (_, full), grads_full = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
  grads, metrics = jax.jit(lambda p, b: microbatch.accumulate(
      loss_fn, p, b, k, len(aux_loss_layers(model.config)), doc_lm))(params, batch)
  assert float(full["lm_weight"]) > 0 and float(full["aux_weight"]) > 0
  flat_full, flat = jax.tree.leaves(grads_full), jax.tree.leaves(grads)
  assert len(flat) == len(flat_full)
  for a, b in zip(flat, flat_full):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
  for name in ("loss", "lm_loss", "aux_loss", "target_tokens", "routing_pairs",
               "lm_loss_answer", "lm_loss_retrieval", "answer_samples", "retrieval_samples"):
    np.testing.assert_allclose(float(metrics[name]), float(full[name]), rtol=1e-5,
                               err_msg=name)
  # The slices' token counts differ, so an unweighted mean of slice losses would not do.
  per_slice = np.asarray(microbatch.split(batch, k).loss_mask).sum(axis=(1, 2))
  assert len(set(per_slice.tolist())) > 1
  if doc_lm:
    for name in ("doc_lm_loss", "doc_target_tokens"):
      np.testing.assert_allclose(float(metrics[name]), float(full[name]), rtol=1e-5,
                                 err_msg=name)
    assert float(microbatch.doc_lm_targets(batch)) == float(full["doc_target_tokens"]) > 0
    docs = np.asarray(microbatch.split(batch, k).doc_mask).sum(axis=(1, 2, 3))
    assert len(set(docs.tolist())) > 1


def test_routing_pairs_counted_from_the_data_match_the_loss():
  cfg, model, params, batch, answer = _setup()
  _, m = jax.jit(lambda p, b: compute_losses(model, p, b, jnp.int32(0), cfg, answer))(params,
                                                                                     batch)
  assert float(microbatch.routing_pairs(batch, 1)) == float(m["routing_pairs"]) > 0


def test_split_takes_rows_from_every_block():
  batch = {"x": np.arange(12).reshape(6, 2)}
  parts = microbatch.split(batch, 3)["x"]
  assert parts.shape == (3, 2, 2)
  np.testing.assert_array_equal(parts[0], [[0, 1], [6, 7]])     # rows 0 and 3
  np.testing.assert_array_equal(parts[2], [[4, 5], [10, 11]])   # rows 2 and 5


def test_bad_microbatches_are_refused_with_the_fix():
  for bad in (0, 2.0, True):      # (ConfigDict refuses 2.0 itself; a dict does not)
    with pytest.raises(ValueError, match="microbatches must be an integer"):
      microbatch.microbatches_of({"microbatches": bad})
  cfg = get_config("tiny")
  cfg.microbatches = 4
  with pytest.raises(ValueError, match="multiple of 8"):
    microbatch.check_microbatches(cfg, [128, 12], batch_shards=2)
  microbatch.check_microbatches(cfg, [128, 16], batch_shards=2)   # the doc LM is accepted
  cfg.loss.aux_chunk_weight = 0.1
  with pytest.raises(ValueError, match="loss.aux_chunk_weight"):
    microbatch.check_microbatches(cfg, [128], batch_shards=1)


def test_sharded_step_with_microbatches_equals_one_batch():
  """The trainer's jitted step on 8 devices (data 4 × fsdp 2): 2 slices of 8 rows give the
  loss and gradient norm of one batch of 16."""
  from msa_jax import sharding
  from msa_jax.trainer import TrainSetup
  from train_common import small_cfg
  cfg = small_cfg()
  cfg.mesh_shape, cfg.batch_size = (4, 2, 1), 16
  cfg.loss.aux_batch_negatives = False
  batch = next(iter(from_config.make_train_iterator(
      cfg.data, seed=0, batch_size=16, chunk_size=cfg.model.pooling_chunk_size, verbose=False)))
  out = {}
  for k in (1, 2):
    cfg.microbatches = k
    setup = TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape))
    _, metrics = setup.step(setup.init_state(0), setup.put_batch(batch))
    out[k] = jax.device_get(metrics)
  for name in ("loss", "lm_loss", "aux_loss", "grad_norm", "target_tokens"):
    np.testing.assert_allclose(out[2][name], out[1][name], rtol=1e-4, err_msg=name)
