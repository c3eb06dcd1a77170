"""Oracle routing in training (``loss.oracle_routing``): the gold documents are selected in
every router layer, whatever the router scores; the rest of top-k is the router's choice.

``routing.select_with_gold`` against a brute-force numpy reference, then the training
forward: with top_k = 1 an oracle-routed example gives the hidden states of the same example
whose memory holds only its gold document (the one-document memories whose ids were learnt,
WORKSPACE.md "Why the ids stay at chance"), while the router's scores are unchanged.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import routing
from msa_jax.config import ModelConfig
from msa_jax.model import MSAModel

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()


def _select_with_gold_numpy(scores_bn, gold_bn, k):
  """Gold documents first (best-scored of them), then the best others; index order."""
  out_idx, out_valid = [], []
  for s, g in zip(scores_bn, gold_bn):
    finite = [i for i in range(len(s)) if np.isfinite(s[i])]
    gold = sorted([i for i in finite if g[i]], key=lambda i: (-s[i], i))
    rest = sorted([i for i in finite if not g[i]], key=lambda i: (-s[i], i))
    chosen = sorted((gold + rest)[:k])
    out_idx.append(chosen + [0] * (k - len(chosen)))
    out_valid.append([True] * len(chosen) + [False] * (k - len(chosen)))
  return np.array(out_idx), np.array(out_valid)


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_select_with_gold_matches_reference(k):
  rng = np.random.default_rng(k)
  scores = rng.normal(size=(16, 5)).astype(np.float32) * 50
  scores[rng.random(scores.shape) < 0.2] = -np.inf          # padding / empty documents
  gold = rng.random(scores.shape) < 0.3
  gold[0] = False                                            # a row routed as usual
  gold[1] = True                                             # more gold than k
  sel = routing.select_with_gold(jnp.asarray(scores), jnp.asarray(gold), k)
  idx, valid = _select_with_gold_numpy(scores, gold, k)
  np.testing.assert_array_equal(np.asarray(sel.valid_bk), valid)
  np.testing.assert_array_equal(np.where(valid, np.asarray(sel.doc_idx_bk), 0), idx)
  plain = routing.select_top_k(jnp.asarray(scores[:1]), k)
  np.testing.assert_array_equal(np.asarray(sel.doc_idx_bk)[:1], np.asarray(plain.doc_idx_bk))


@pytest.mark.parametrize("scan", [False, True])
def test_oracle_forward_sees_the_gold_document(scan):
  cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=3,
                    num_heads=2, num_kv_heads=1, head_dim=8, router_layers=(1, 2),
                    pooling_chunk_size=2, top_k=1, initializer_range=0.3, scan_layers=scan)
  batch = R.make_batch(np.random.default_rng(2), vocab=40, prefix_lens=[1, 1, 1, 1],
                       doc_lens=[[5, 3, 6, 4]] * 4, active_lens=[5, 6, 4, 5],
                       question_lens=[3, 2, 2, 3])
  model, variables = R.init_model(cfg, batch, seed=3)
  fwd = jax.jit(lambda v, b, oracle: model.apply(v, b, oracle_routing=oracle,
                                                 method=MSAModel.forward_train),
                static_argnums=2)
  routed = fwd(variables, batch, False)
  router_choice = np.asarray(routed.selected_brk)[:, 0, 0]
  gold_idx = (router_choice + 1) % 4                         # never the router's choice
  gold = np.zeros((4, 4), bool)
  gold[np.arange(4), gold_idx] = True
  batch = dataclasses.replace(batch, positive_docs=gold)
  oracle = fwd(variables, batch, True)
  np.testing.assert_array_equal(np.asarray(oracle.selected_brk)[:, :, 0],
                                np.repeat(gold_idx[:, None], 2, axis=1))
  # The first router layer's scores do not depend on what was selected.
  np.testing.assert_allclose(np.asarray(oracle.doc_scores_brn)[:, 0],
                             np.asarray(routed.doc_scores_brn)[:, 0], rtol=1e-6)
  rows = np.arange(4)
  alone = dataclasses.replace(
      batch, doc_tokens=np.asarray(batch.doc_tokens)[rows, gold_idx][:, None],
      doc_mask=np.asarray(batch.doc_mask)[rows, gold_idx][:, None],
      positive_docs=np.ones((4, 1), bool))
  only_gold = fwd(variables, alone, False)
  active = np.asarray(batch.active_mask, bool)
  np.testing.assert_allclose(np.asarray(oracle.hidden_bmd)[active],
                             np.asarray(only_gold.hidden_bmd)[active], rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(oracle.hidden_bmd)[active],
                         np.asarray(routed.hidden_bmd)[active], atol=1e-4)
