"""``loss.doc_lm_weight``: a next-token loss inside the memory documents.

Each document slot runs alone through the plain causal LM and predicts its own next
tokens; padding slots and positions predict nothing. The reference is the plain model's
logits (``model.apply(vars, tokens)``, tested against transformers' Qwen3 elsewhere) per
document, with the cross-entropy in float64 numpy.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msa_jax.config import ModelConfig
from msa_jax.train_step import compute_losses

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()
DOC_LENS = [[3, 4, 2], [2, 1, 0]]


def _cfg(doc_lm_weight):
  return ml_collections.ConfigDict({
      "loss": {"infonce_temperature": 0.1, "doc_lm_weight": doc_lm_weight, "lm_chunk_size": 2},
      "optim": {"warmup_phase_steps": 10, "warmup_lm_weight": 0.1, "warmup_aux_weight": 1.0,
                "main_lm_weight": 1.0, "main_aux_weight": 0.1}})


@pytest.fixture(scope="module")
def setup():
  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=4,
                    num_heads=2, num_kv_heads=1, head_dim=8, router_layers=(2, 3),
                    pooling_chunk_size=2, top_k=1, initializer_range=0.3)
  batch = R.make_batch(np.random.default_rng(0), vocab=32, prefix_lens=[1, 0],
                       doc_lens=DOC_LENS, active_lens=[4, 3], question_lens=[2, 2])
  model, variables = R.init_model(cfg, batch, seed=1)
  return model, variables, batch


def _reference(model, variables, batch):
  nll, count = 0.0, 0
  for b, lens in enumerate(DOC_LENS):
    for n, length in enumerate(lens):
      if length < 2:
        continue
      tokens = np.asarray(batch.doc_tokens)[b, n, :length]
      logits = np.asarray(model.apply(variables, jnp.asarray(tokens[None])), np.float64)[0]
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                             keepdims=True)) - logits.max(-1, keepdims=True)
      nll -= sum(logp[i, tokens[i + 1]] for i in range(length - 1))
      count += length - 1
  return nll / count, count


def test_doc_lm_loss_is_the_documents_next_token_loss(setup):
  model, variables, batch = setup
  step = jnp.int32(0)
  base = jax.jit(lambda p: compute_losses(model, p, batch, step, _cfg(0.0))[1])(
      variables["params"])
  got = jax.jit(lambda p: compute_losses(model, p, batch, step, _cfg(0.5))[1])(
      variables["params"])
  want, count = _reference(model, variables, batch)
  assert "doc_lm_loss" not in base and int(got["doc_target_tokens"]) == count == 7
  np.testing.assert_allclose(float(got["doc_lm_loss"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(got["loss"]), float(base["loss"]) + 0.5 * want, rtol=1e-5)


def test_doc_lm_loss_trains_the_backbone(setup):
  model, variables, batch = setup
  grad = jax.jit(jax.grad(lambda p: compute_losses(model, p, batch, jnp.int32(0),
                                                   _cfg(1.0))[1]["doc_lm_loss"]))(
      variables["params"])
  assert np.any(np.asarray(grad["layers_0"]["mlp"]["up_proj"]["kernel"]))
  assert np.any(np.asarray(grad["embed_tokens"]["embedding"]))


def test_a_negative_weight_names_the_field():
  from msa_jax.train_step import doc_lm_weight
  with pytest.raises(ValueError, match="loss.doc_lm_weight must be >= 0"):
    doc_lm_weight(_cfg(-1.0))
