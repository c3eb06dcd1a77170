"""``ModelConfig.scan_layers``: the training forward with each run of identical layers as
one ``lax.scan`` equals the unrolled layer loop (outputs, routing decisions, gradients of
the training loss), keeps the per-layer parameter tree, and keeps the parameters' sharding.

Compared in float32 on the smoke recipe's model (3 layers: runs [0], [1, 2]) and on a
model whose router layers are not contiguous (router layers (1, 3) of 5: five runs).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.config import ModelConfig
from msa_jax.model import MSAModel, layer_runs
from msa_jax.train_step import compute_losses

from tests import reference_numpy as R
from tests.test_flops import _train_cfg as flops_train_cfg

fast_compile = R.fast_compile_fixture()

# The smoke recipe's model (configs/16k_to_100m.py:smoke) at a small vocabulary.
SMOKE = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=16, pooling_chunk_size=2, top_k=2)
SPLIT = SMOKE.replace(num_layers=5, router_layers=(1, 3))


def _batch(seed=0, b=2, n=6):
  rng = np.random.default_rng(seed)
  return R.make_batch(rng, vocab=96, prefix_lens=list(rng.integers(1, 4, b)),
                      doc_lens=[list(rng.integers(0, 9, n)) for _ in range(b)],
                      active_lens=list(rng.integers(5, 9, b)), question_lens=[3] * b,
                      T=3, L=8, M=8)


def _train_cfg():
  cfg = flops_train_cfg()
  cfg.loss.lm_chunk_size = 4   # several LM-loss chunks
  return cfg


@functools.lru_cache(maxsize=None)
def _step_fn(cfg):
  """Jitted ``(params, batch) -> (loss, grads, forward_memory output)`` (one compile per
  config and input shapes/shardings; tests that share a config share it)."""
  model = MSAModel(cfg)

  def step(params, batch):
    fn = lambda p: compute_losses(model, p, batch, jnp.int32(1), _train_cfg())[0]
    loss, grads = jax.value_and_grad(fn)(params)
    return loss, grads, model.apply({"params": params}, batch)
  return jax.jit(step)


def _case(cfg, seed):
  batch = _batch(seed)
  return batch, R.init_model(cfg, batch, seed=seed)[1]["params"]


def _assert_same(got, want, grad_rtol=1e-4):
  """Scanned vs unrolled: loss, every gradient, logits, routing scores and decisions."""
  (loss_s, grads_s, out_s), (loss_u, grads_u, out_u) = got, want
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  assert jax.tree.structure(grads_s) == jax.tree.structure(grads_u)
  flat_s = dict(jax.tree_util.tree_leaves_with_path(grads_s))
  for path, g_u in jax.tree_util.tree_leaves_with_path(grads_u):
    scale = float(jnp.max(jnp.abs(g_u))) + 1e-12
    np.testing.assert_allclose(flat_s[path], g_u, rtol=grad_rtol, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(out_s.logits_bmv, out_u.logits_bmv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_s.doc_scores_brn, out_u.doc_scores_brn, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out_s.selected_brk, out_u.selected_brk)
  np.testing.assert_array_equal(out_s.selected_valid_brk, out_u.selected_valid_brk)


def test_layer_runs_split_at_router_changes():
  assert [(r.start, r.stop, r.is_router) for r in layer_runs(SMOKE)] == [
      (0, 1, False), (1, 3, True)]
  assert [(r.start, r.stop, r.is_router) for r in layer_runs(SPLIT)] == [
      (0, 1, False), (1, 2, True), (2, 3, False), (3, 4, True), (4, 5, False)]
  assert [len(r) for r in layer_runs(SPLIT, stop=4)] == [1, 1, 1, 1]


@pytest.mark.parametrize("cfg", [SMOKE, SPLIT], ids=["smoke", "router_1_3_of_5"])
def test_scanned_forward_and_grads_equal_unrolled(cfg):
  batch, params = _case(cfg, seed=3)
  want = _step_fn(cfg)(params, batch)
  got = _step_fn(cfg.replace(scan_layers=True))(params, batch)
  _assert_same(got, want)
  assert got[2].doc_scores_brn.shape[1] == len(cfg.router_layer_ids)
  # Every layer's parameters get a gradient (the last router layer's MLP gets none from
  # the documents, but does from the active tokens).
  for i in range(cfg.num_layers):
    assert float(jnp.max(jnp.abs(got[1][f"layers_{i}"]["mlp"]["up_proj"]["kernel"]))) > 0


@pytest.mark.parametrize("cfg,policy", [
    (SMOKE, "full"), (SMOKE.replace(rope_tables=True, qk_norm_rope_vjp="fused"), "mlp_input"),
    pytest.param(SPLIT, "dots", marks=pytest.mark.slow)])
def test_scan_with_remat_policy_equals_unrolled_without_remat(cfg, policy):
  batch, params = _case(cfg, seed=3)
  want = _step_fn(cfg)(params, batch)
  _assert_same(_step_fn(cfg.replace(scan_layers=True, remat_policy=policy))(params, batch),
               want)


@pytest.mark.parametrize("scan", [False, True])
def test_rope_tables_are_computed_once_a_stream(scan):
  """``rope_tables=True``: RoPE's cos/sin are computed once a stream (documents, prefix,
  active tokens), so the step holds as many cosines with 5 layers as with 3; without it
  every layer's q and k paths (and their backward) compute their own."""
  def cosines(cfg):
    batch, params = _case(cfg, seed=3)
    return _step_fn(cfg.replace(scan_layers=scan)).lower(params, batch).as_text().count(
        "stablehlo.cosine")
  tables = [cosines(c.replace(rope_tables=True)) for c in (SMOKE, SPLIT)]
  recomputed = [cosines(c) for c in (SMOKE, SPLIT)]
  assert tables[0] == tables[1] <= 6, tables
  assert recomputed[0] > 2 * tables[0] and (scan or recomputed[1] > recomputed[0]), recomputed


def test_scanned_step_on_a_mesh_keeps_parameter_sharding():
  """On 4 CPU devices (fsdp 2 x tensor 2) the scanned step equals the unrolled one on one
  device, and the stacked parameters inside the step carry their layers' sharding."""
  import re
  from msa_jax import sharding
  cfg = SMOKE.replace(scan_layers=True)
  mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
  batch, params = _case(SMOKE, seed=3)
  want = _step_fn(SMOKE)(params, batch)
  boxed = jax.eval_shape(MSAModel(cfg).init, jax.random.PRNGKey(0), batch)["params"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                            sharding.DEFAULT_RULES)
    sharded = jax.device_put(params, shardings)
    got = _step_fn(cfg)(sharded, batch)
    hlo = _step_fn(cfg).lower(sharded, batch).as_text()
  _assert_same(got, want)
  # The router run's (layers 1, 2) stacked [2, 64, 64] kernels: q_proj and router_q_proj
  # (embed on fsdp, heads on tensor) and o_proj (heads, embed); the layer axis whole.
  specs = set(re.findall(r'sharding_constraint %\w+ <@mesh, (\[.*?\])> : tensor<2x64x64xf32>',
                         hlo))
  assert specs == {'[{}, {"fsdp"}, {"tensor"}]', '[{}, {"tensor"}, {"fsdp"}]'}, specs


def test_public_stage_methods_equal_unrolled_and_init_keeps_per_layer_params():
  cfg = SPLIT
  batch = _batch(seed=1)
  scanned = MSAModel(cfg.replace(scan_layers=True))
  shapes = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), batch)["params"]
  assert sorted(k for k in shapes if k.startswith("layers_")) == [
      f"layers_{i}" for i in range(cfg.num_layers)]
  _, variables = R.init_model(cfg, batch, seed=4)
  mask = jnp.asarray(batch.doc_mask, bool)
  pos = jnp.cumsum(mask, axis=-1) - 1
  for model_cfg in (cfg, cfg.replace(scan_layers=True)):
    memory = MSAModel(model_cfg).apply(variables, jnp.asarray(batch.doc_tokens), mask, pos,
                                       method=MSAModel.encode_documents)
    prefix = MSAModel(model_cfg).apply(variables, batch.prefix_tokens, batch.prefix_mask,
                                       jnp.broadcast_to(jnp.arange(3), (2, 3)),
                                       method=MSAModel.encode_prefix)
    if not model_cfg.scan_layers:
      memory_u, prefix_u = memory, prefix
  assert sorted(memory) == sorted(memory_u) == [1, 3]
  for i in memory:
    for a, b in zip(jax.tree.leaves(memory[i]), jax.tree.leaves(memory_u[i])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert len(prefix) == len(prefix_u) == cfg.num_layers
  for (k, v), (k_u, v_u) in zip(prefix, prefix_u):
    np.testing.assert_allclose(k, k_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, v_u, rtol=1e-5, atol=1e-6)


def test_remat_policy_and_the_legacy_remat_switch():
  assert ModelConfig().remat_policy == "none" and ModelConfig().remat is False
  assert ModelConfig(remat=True).remat_policy == "full"            # old configs
  assert ModelConfig.from_dict({"remat": False}).remat_policy == "none"
  assert ModelConfig.from_dict({"remat": True, "remat_policy": "dots"}).remat_policy == "dots"
  dots = ModelConfig(remat_policy="dots")
  assert dots.remat is True and dots == ModelConfig(remat=True, remat_policy="dots")
  assert dots.replace(remat=False).remat_policy == "none"
  assert dots.replace(remat=True).remat_policy == "dots"
  assert ModelConfig().replace(remat=True).remat_policy == "full"
  assert ModelConfig(remat=True).replace(remat_policy="none").remat is False
  assert "remat" not in dots.to_dict()        # the policy alone says it
  assert ModelConfig.from_dict(dots.to_dict()) == dots
  with pytest.raises(ValueError, match=r"remat_policy must be one of \['none', 'full', 'dots', 'mlp_input'\]"):
    ModelConfig(remat_policy="everything")
  with pytest.raises(ValueError, match="remat=False contradicts remat_policy='full'"):
    ModelConfig(remat=False, remat_policy="full")
  with pytest.raises(ValueError, match="scan_layers must be True or False"):
    ModelConfig(scan_layers="yes")


def test_bank_fingerprint_ignores_scan_and_remat_switches():
  """A memory bank encoded by a model stays usable when only these switches change (and
  keeps the fingerprint it had before the gradient switches existed)."""
  from msa_jax.inference import bank
  params = {"w": np.arange(4, dtype=np.float32).reshape(2, 2)}
  base = bank.model_fingerprint(SMOKE, params)
  assert bank.model_fingerprint(SMOKE.replace(scan_layers=True, remat_policy="dots"),
                                params) == base
  assert bank.model_fingerprint(SMOKE.replace(rms_norm_vjp="lean", attention_pad_free=True,
                                              embed_grad="sorted"), params) == base
  assert bank.model_fingerprint(SMOKE.replace(
      qk_norm_rope_vjp="fused", attention_short_persistent=True, rope_tables=True),
      params) == base
  assert base == "a1bee46efd02692415741bb1fb2201c2"   # before those switches (6bc5aae^)
  assert bank.model_fingerprint(SMOKE.replace(top_k=3), params) != base


def _pallas_case():
  """Router layers (2, 3) of 4, head_dim 64 (the Mosaic GPU kernel tiles it by 64)."""
  cfg = SMOKE.replace(num_layers=4, router_layers=(2, 3), head_dim=64, kernels="pallas")
  batch = _batch(seed=7)
  _, variables = R.init_model(cfg, batch, seed=7)
  return cfg, batch, variables["params"]


@pytest.mark.slow
def test_scanned_forward_with_the_pallas_kernels_equals_unrolled():
  """The Pallas attention (interpret mode on CPU) inside the scan body and its remat."""
  cfg, batch, params = _pallas_case()
  ref = jax.jit(MSAModel(cfg).apply)({"params": params}, batch)
  out = jax.jit(MSAModel(cfg.replace(scan_layers=True, remat_policy="full")).apply)(
      {"params": params}, batch)
  np.testing.assert_array_equal(out.selected_brk, ref.selected_brk)
  np.testing.assert_allclose(out.logits_bmv, ref.logits_bmv, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_scanned_training_gradients_with_the_pallas_kernels_on_gpu():
  """On the GPU, bf16 compute: the scanned, rematerialised loss gradient equals the
  unrolled one (same kernels, same bf16 roundings; a reduction order may differ)."""
  cfg, batch, params = _pallas_case()
  cfg = cfg.replace(dtype="bfloat16")
  loss_u, grads_u, _ = _step_fn(cfg)(params, batch)
  for policy in ("full", "dots"):
    loss_s, grads_s, _ = _step_fn(cfg.replace(scan_layers=True, remat_policy=policy))(
        params, batch)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_u)):
      scale = float(jnp.max(jnp.abs(b))) + 1e-12
      np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * scale)
