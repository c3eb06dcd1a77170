"""The model's ``kernels`` switch: the Pallas attention path equals the XLA path.

On CPU ``kernels="pallas"`` runs the Mosaic GPU kernels in interpret mode, so this
checks the wiring (argument order, context concatenation, GQA) of the model, not
GPU speed; the kernels' own tests pin their numerics.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.batch import MSABatch
from msa_jax.config import preset
from msa_jax.model import MSAModel


def _batch(rng, b=2, t=2, n=3, l=6, m=5):
  doc_mask = np.zeros((b, n, l), bool)
  doc_mask[:, 0, :6] = True
  doc_mask[:, 1, :3] = True
  doc_mask[0, 2, :5] = True
  active_mask = np.ones((b, m), bool)
  active_mask[1, 4:] = False
  question_mask = np.zeros((b, m), bool)
  question_mask[:, :2] = True
  return MSABatch(
      prefix_tokens=rng.integers(0, 128, (b, t)), prefix_mask=np.ones((b, t), bool),
      doc_tokens=rng.integers(0, 128, (b, n, l)), doc_mask=doc_mask,
      active_tokens=rng.integers(0, 128, (b, m)), active_mask=active_mask,
      question_mask=question_mask, targets=rng.integers(0, 128, (b, m)),
      loss_mask=active_mask & ~question_mask, positive_docs=np.eye(n, dtype=bool)[:b])


@pytest.mark.parametrize("pad_free,short", [(False, False), (True, False), (True, True)])
def test_pallas_attention_path_matches_xla(pad_free, short):
  """``attention_pad_free``: the kernels zero rows that see no key themselves (example 1's
  third document slot is empty); interpreted, the operands are still padded.
  ``attention_short_persistent``: the documents' forward through the persistent kernel."""
  cfg = preset("tiny", num_layers=2, router_layers=(1,), top_k=2, pooling_chunk_size=4,
               head_dim=64, attention_pad_free=pad_free,   # the kernel tiles head_dim by 64
               attention_short_persistent=short)
  batch = _batch(np.random.default_rng(0))
  xla_model = MSAModel(cfg.replace(kernels="xla"))
  params = nn.unbox(xla_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
  ref = xla_model.apply({"params": params}, batch)
  out = MSAModel(cfg.replace(kernels="pallas")).apply({"params": params}, batch)
  np.testing.assert_array_equal(out.selected_brk, ref.selected_brk)
  valid = np.asarray(batch.active_mask)
  # The Pallas kernel computes in bf16 with a float32 softmax.
  err = np.abs(np.asarray(out.logits_bmv) - np.asarray(ref.logits_bmv))[valid].max()
  scale = np.abs(np.asarray(ref.logits_bmv))[valid].max()
  assert err <= 2e-2 * scale, (err, scale)


@pytest.mark.slow
def test_pallas_attention_gradients_with_the_persistent_backward_match_xla():
  """``attention_short_persistent_bwd``: the documents' attention backward through the
  persistent dQ and dK/dV kernels (interpreted); the parameters' gradients of the LM
  logits equal the XLA attention's within bf16 (the kernels compute in bf16). Slow (~30
  s) and off in every recipe (no faster than the tiled kernels on an H100): the kernels'
  own gradient tests (``tests/test_kernel_sparse_attention.py``) run by default."""
  cfg = preset("tiny", num_layers=2, router_layers=(1,), top_k=2, pooling_chunk_size=4,
               head_dim=64, attention_pad_free=True, attention_short_persistent=True,
               attention_short_persistent_bwd=True)
  batch = _batch(np.random.default_rng(2))
  xla_model = MSAModel(cfg.replace(kernels="xla"))
  params = nn.unbox(xla_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
  w = jax.random.normal(jax.random.PRNGKey(3), (2, 5, cfg.vocab_size))

  def grads(model):
    def loss(p):
      logits = model.apply({"params": p}, batch).logits_bmv
      return jnp.sum(w * logits * batch.active_mask[..., None])
    return jax.grad(loss)(params)
  got, want = grads(MSAModel(cfg.replace(kernels="pallas"))), grads(xla_model)
  for path, a in jax.tree_util.tree_leaves_with_path(got):
    b = np.asarray(functools.reduce(lambda t, k: t[k.key], path, want))
    a = np.asarray(a)
    assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(b) + 1e-6, jax.tree_util.keystr(path)


def test_auto_falls_back_to_xla_for_head_dims_the_kernel_does_not_tile():
  cfg = preset("tiny", num_layers=2, router_layers=(1,), top_k=2, pooling_chunk_size=4)
  assert cfg.head_dim % 64
  batch = _batch(np.random.default_rng(1))
  model = MSAModel(cfg.replace(kernels="xla"))
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
  ref = model.apply({"params": params}, batch)
  out = MSAModel(cfg.replace(kernels="auto")).apply({"params": params}, batch)
  np.testing.assert_array_equal(np.asarray(out.logits_bmv), np.asarray(ref.logits_bmv))
