"""What the active tokens see of memory is the selected documents' chunks and nothing else.

With top_k = 1, an example over N documents must give the same active hidden states as
the same example whose memory holds only the document the router selected (document-wise
RoPE: positions do not depend on the slot or on N). On the reading task this is the
difference between the one-document runs, whose ids are learnt, and the top-1 runs over
2-8 documents, whose ids are not (WORKSPACE.md): it is not in the forward.
"""
import dataclasses

import jax
import numpy as np

from msa_jax.config import ModelConfig
from msa_jax.model import MSAModel

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()


def test_top1_over_many_documents_equals_the_selected_document_alone():
  cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=8, router_layers=(1,),
                    pooling_chunk_size=2, top_k=1, initializer_range=0.3)
  batch = R.make_batch(np.random.default_rng(2), vocab=40, prefix_lens=[1, 1, 1],
                       doc_lens=[[5, 3, 6, 4], [4, 4, 2, 5], [3, 6, 5, 5]],
                       active_lens=[5, 6, 4], question_lens=[3, 2, 2])
  model, variables = R.init_model(cfg, batch, seed=3)
  out = jax.jit(lambda v, b: model.apply(v, b, method=MSAModel.forward_train))(variables, batch)
  chosen = np.asarray(out.selected_brk)[:, 0, 0]       # [B] (one router layer, k = 1)
  rows = np.arange(len(chosen))
  alone = dataclasses.replace(
      batch, doc_tokens=np.asarray(batch.doc_tokens)[rows, chosen][:, None],
      doc_mask=np.asarray(batch.doc_mask)[rows, chosen][:, None],
      positive_docs=np.ones((len(rows), 1), bool))
  out1 = jax.jit(lambda v, b: model.apply(v, b, method=MSAModel.forward_train))(variables, alone)
  active = np.asarray(batch.active_mask, bool)
  np.testing.assert_allclose(np.asarray(out1.hidden_bmd)[active],
                             np.asarray(out.hidden_bmd)[active], rtol=1e-5, atol=1e-5)
  assert len(set(chosen.tolist())) > 1 or batch.doc_tokens.shape[1] == 1
