"""``msa_jax.flops.step_flops`` against XLA's own count of the compiled training step.

XLA's ``cost_analysis()["flops"]`` counts every matmul and elementwise op of the padded
step (the XLA reference attention computes masked slots too), so it is compared with
the ``executed`` count; the LM loss runs as one chunk (a ``lax.scan`` body is counted
once by XLA whatever its trip count). The count leaves out elementwise work (norms,
softmax, RoPE), so it sits a few percent below XLA's.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msa_jax import flops
from msa_jax.config import ModelConfig
from msa_jax.model import MSAModel
from msa_jax.train_step import compute_losses

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()

# The smoke recipe's model (configs/16k_to_100m.py:smoke) and its batch shape:
# B 8, prefix 1, 32 documents of 8 slots, 8 active slots; vocab 576.
SMOKE = ModelConfig(vocab_size=576, hidden_size=64, intermediate_size=128, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=16, pooling_chunk_size=2, top_k=1)


def _smoke_batch(full: bool):
  rng = np.random.default_rng(0)
  b, n = 8, 32
  doc_lens = [[8] * n if full else list(rng.integers(5, 9, n)) for _ in range(b)]
  active = [8] * b if full else list(rng.integers(5, 9, b))
  return R.make_batch(rng, vocab=576, prefix_lens=[1] * b, doc_lens=doc_lens,
                      active_lens=active, question_lens=[5 if full else 3] * b,
                      T=1, L=8, M=8)


def _train_cfg():
  return ml_collections.ConfigDict({
      "loss": {"infonce_temperature": 0.1, "lm_chunk_size": 64},
      "optim": {"warmup_phase_steps": 0, "warmup_lm_weight": 0.1, "warmup_aux_weight": 1.0,
                "main_lm_weight": 1.0, "main_aux_weight": 0.1}})


@pytest.mark.parametrize("policy", ["none", "full", "dots", "mlp_input"])
def test_executed_count_matches_xla_cost_analysis_on_the_smoke_shape(policy):
  cfg = SMOKE.replace(remat_policy=policy)
  batch = _smoke_batch(full=False)
  model = MSAModel(cfg)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch))["params"]
  step = jax.grad(lambda p, b: compute_losses(model, p, b, jnp.int32(5), _train_cfg())[0])
  xla = jax.jit(step).lower(params, batch).compile().cost_analysis()["flops"]
  ours = flops.step_flops(cfg, batch, lm_chunk_size=64, mode="executed")
  assert 0.9 * xla <= ours["executed_total"] <= xla, (ours, xla)
  if policy == "full":   # the recomputed forward is part of what XLA counts
    assert ours["remat_recompute"] > 0.3 * ours["train"] / 3
  elif policy == "dots":  # attention and routing only: less than full's, more than none's
    full = flops.step_flops(SMOKE.replace(remat_policy="full"), batch, lm_chunk_size=64,
                            mode="executed")
    assert ours["lm_head"] < ours["remat_recompute"] < 0.5 * full["remat_recompute"]
  elif policy == "mlp_input":  # all but o_proj: between dots' and full's
    full = flops.step_flops(SMOKE.replace(remat_policy="full"), batch, lm_chunk_size=64,
                            mode="executed")
    assert 0.8 * full["remat_recompute"] < ours["remat_recompute"] < full["remat_recompute"]
  else:
    assert ours["remat_recompute"] == ours["lm_head"]


def test_useful_count_on_a_batch_without_padding():
  """No padding anywhere: the useful count differs from the executed one only by causal
  attention (``i+1`` keys, not ``L``), the routing tokens (the question only) and the LM
  head (target positions only), each computed here by hand."""
  cfg = SMOKE
  batch = _smoke_batch(full=True)
  useful = flops.step_flops(cfg, batch, lm_chunk_size=64, mode="useful")
  executed = flops.step_flops(cfg, batch, lm_chunk_size=64, mode="executed")
  attn = 4 * cfg.num_heads * cfg.head_dim   # QK^T + PV per (query, key) pair
  b, n, l, m, t = 8, 32, 8, 8, 1
  causal_saving = lambda length: length * length - length * (length + 1) / 2
  last_router = max(cfg.router_layer_ids)
  doc_diff = last_router * b * n * attn * causal_saving(l)
  prefix_diff = (cfg.num_layers - 1) * b * attn * causal_saving(t)
  active_diff = cfg.num_layers * b * attn * causal_saving(m)
  np.testing.assert_allclose(executed["doc_layers"] - useful["doc_layers"], doc_diff)
  np.testing.assert_allclose(executed["prefix_layers"] - useful["prefix_layers"], prefix_diff)
  np.testing.assert_allclose(executed["active_layers"] - useful["active_layers"], active_diff)
  route_tokens = int(np.sum(np.asarray(batch.question_mask)))
  np.testing.assert_allclose(useful["routing"], executed["routing"] * route_tokens / (b * m))
  targets = int(np.sum(np.asarray(batch.loss_mask)))
  np.testing.assert_allclose(useful["lm_head"], 2 * cfg.hidden_size * cfg.vocab_size * targets)
  assert useful["train"] == 3 * useful["forward"]


def test_encode_flops_matches_hand_count():
  """Stage-1 encode FLOPs of two documents, counted by hand for a 3-layer model whose
  router layers are 1 and 2 (layers 0-1 in full, layer 2 for K, V and router keys)."""
  import numpy as np
  from msa_jax import flops
  from msa_jax.config import preset
  cfg = preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
               num_heads=4, num_kv_heads=2, head_dim=8, router_layers=(1, 2))
  lengths = np.array([5, 3])
  d, hd, h, g, i = 32, 8, 4, 2, 48
  q, kv, o, mlp = 2 * d * h * hd, 4 * d * g * hd, 2 * h * hd * d, 6 * d * i
  rk = 2 * d * g * hd
  tokens, pairs = 8, 5 * 6 / 2 + 3 * 4 / 2
  attn = 4 * h * hd * pairs
  expect = 2 * (tokens * (q + kv + o + mlp) + attn) + tokens * kv + 2 * tokens * rk
  assert flops.encode_flops(cfg, lengths) == pytest.approx(expect)
