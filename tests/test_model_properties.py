"""Structural properties of the MSA model that SPEC §1-§5 imply, checked on a tiny model.

Perturbation tests compare exactly (bitwise) where the SPEC says a quantity cannot
depend on the perturbed input; gradient tests compare to exactly 0. Embedding
perturbations are injected with ``flax.linen.intercept_methods`` on ``nn.Embed``
(one additive delta per stream: documents, prefix, active), so gradients can be
taken per token position.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import losses, positions
from msa_jax.model import prefix_context, routing_mask
from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()
from tests.test_reference_forward import VOCAB, fixed_batch, tiny_config

CFG = tiny_config()                           # 3 layers, router layers (1, 2), P 3, k 2
B, N, T, L, M = 2, 5, 3, 7, 6                 # fixed_batch shapes


@pytest.fixture(scope="module")
def setup():
  batch = fixed_batch(seed=11)
  model, variables = R.init_model(CFG, batch, 11)
  return model, variables, batch


@pytest.fixture(scope="module")
def japply(setup):
  """The jitted forward (compiled once per input shape; many tests reuse it)."""
  return jax.jit(setup[0].apply)


def embed_deltas_interceptor(deltas):
  """Adds ``deltas[stream]`` to the embedding output of that stream (by its shape)."""
  def icpt(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
      for d in deltas.values():
        if d.shape == out.shape:
          return out + d.astype(out.dtype)
    return out
  return icpt


def zero_deltas(h=CFG.hidden_size):
  return {"docs": jnp.zeros((B * N, L, h)), "prefix": jnp.zeros((B, T, h)),
          "active": jnp.zeros((B, M, h))}


def forward(model, variables, batch, deltas):
  with nn.intercept_methods(embed_deltas_interceptor(deltas)):
    return model.apply(variables, batch)


def doc_memory(model, variables, batch, deltas=None):
  _, doc_pos, _ = positions.stream_positions(jnp.asarray(batch.prefix_mask),
                                             jnp.asarray(batch.doc_mask),
                                             jnp.asarray(batch.active_mask), top_k=CFG.top_k,
                                             rope_mode=CFG.rope_mode)
  with nn.intercept_methods(embed_deltas_interceptor(deltas or zero_deltas())):
    return model.apply(variables, jnp.asarray(batch.doc_tokens), jnp.asarray(batch.doc_mask),
                       doc_pos, method="encode_documents")


def with_doc_tokens(batch, b, n, rng):
  docs = np.array(batch.doc_tokens)
  ln = int(np.sum(batch.doc_mask[b, n]))
  docs[b, n, :ln] = (docs[b, n, :ln] + rng.integers(1, VOCAB, size=ln)) % VOCAB
  return batch.replace(doc_tokens=docs)


def selected_sets(out):
  sel = np.asarray(out.selected_brk)
  val = np.asarray(out.selected_valid_brk)
  return [set(sel[b][val[b]].tolist()) for b in range(sel.shape[0])]


# --------------------------------------------------------------------------- SPEC §3: documents


def test_documents_are_independent(setup):
  """SPEC §3: every layer processes each document alone: changing document (0, 2) changes
  its own pooled memory (K̄, V̄, K̄R in every router layer) and nothing else, bitwise."""
  model, variables, batch = setup
  mem = doc_memory(model, variables, batch)
  mem2 = doc_memory(model, variables, with_doc_tokens(batch, 0, 2, np.random.default_rng(0)))
  for layer in CFG.router_layer_ids:
    for name in ("k_bncgd", "v_bncgd", "kr_bncf"):
      a, b_ = np.asarray(getattr(mem[layer], name)), np.asarray(getattr(mem2[layer], name))
      other = np.ones((B, N), bool)
      other[0, 2] = False
      np.testing.assert_array_equal(a[other], b_[other])
      assert np.max(np.abs(a[0, 2] - b_[0, 2])) > 1e-3, (layer, name)


def test_document_memory_gradients_are_per_document_and_causal(setup):
  """SPEC §3: document tokens attend causally within their own document only. The pooled
  chunk c of document (b, n) depends on that document's tokens 0..min((c+1)P, len)-1
  (non-zero gradient) and on no other token: not later ones, not its padding, not other
  documents (gradient exactly 0)."""
  model, variables, batch = setup
  p = CFG.pooling_chunk_size
  b0, n0 = 0, 2                                   # a 7-token document: chunks 0..2, last partial
  layer = max(CFG.router_layer_ids)
  lens = np.asarray(batch.doc_mask).sum(-1)
  for c in range(3):
    def f(dd):
      deltas = dict(zero_deltas(), docs=dd)
      mem = doc_memory(model, variables, batch, deltas)[layer]
      return (jnp.sum(mem.k_bncgd[b0, n0, c]) + jnp.sum(mem.v_bncgd[b0, n0, c])
              + jnp.sum(mem.kr_bncf[b0, n0, c]))
    g = np.asarray(jax.grad(f)(zero_deltas()["docs"])).reshape(B, N, L, -1)
    tok_norm = np.linalg.norm(g, axis=-1)
    end = min((c + 1) * p, lens[b0, n0])
    assert np.all(tok_norm[b0, n0, :end] > 0), (c, tok_norm[b0, n0])
    np.testing.assert_array_equal(tok_norm[b0, n0, end:], 0.0)
    other = np.ones((B, N), bool)
    other[b0, n0] = False
    np.testing.assert_array_equal(tok_norm[other], 0.0)


# --------------------------------------------------------------------------- SPEC §3: routing


def test_unselected_document_is_invisible_selected_one_is_not(setup, japply):
  """SPEC §3.4: active tokens read only the selected documents' pooled chunks. Perturbing a
  document no router layer selected changes no active logit (bitwise) while the selection is
  unchanged; perturbing a selected document changes the logits."""
  model, variables, batch = setup
  out = japply(variables, batch)
  chosen = selected_sets(out)
  real = [set(np.nonzero(np.asarray(batch.doc_mask[b]).any(-1))[0].tolist()) for b in range(B)]
  unselected = sorted(real[0] - chosen[0])
  assert unselected and chosen[0], (chosen, real)
  tried = 0
  for seed in range(20):
    out2 = japply(variables, with_doc_tokens(batch, 0, unselected[0],
                                                  np.random.default_rng(seed)))
    if np.array_equal(np.asarray(out2.selected_brk), np.asarray(out.selected_brk)):
      np.testing.assert_array_equal(np.asarray(out2.logits_bmv), np.asarray(out.logits_bmv))
      tried += 1
  assert tried >= 3   # enough perturbations kept the selection to make the check real
  sel = min(chosen[0])
  out3 = japply(variables, with_doc_tokens(batch, 0, sel, np.random.default_rng(0)))
  diff = np.abs(np.asarray(out3.logits_bmv[0]) - np.asarray(out.logits_bmv[0]))
  assert diff[np.asarray(batch.active_mask[0])].max() > 1e-3
  # The other example never sees example 0's memory.
  np.testing.assert_array_equal(np.asarray(out3.logits_bmv[1]), np.asarray(out.logits_bmv[1]))


def test_prefix_never_sees_documents_or_active(setup):
  """SPEC §3: prefix tokens attend causally among themselves only. The prefix stream inside
  the training forward (every layer's output, K and V, captured from ``DecoderLayer.encode``)
  is unchanged, bitwise, when documents and active tokens change."""
  model, variables, batch = setup

  def prefix_stream(bt):
    seen = []

    def icpt(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "encode" and args[0].shape[:2] == (B, T):
        seen.append([np.asarray(o) for o in out[:3]])
      return out
    with nn.intercept_methods(icpt):
      model.apply(variables, bt)
    return seen

  a = prefix_stream(batch)
  assert len(a) == CFG.num_layers
  rng = np.random.default_rng(3)
  changed = batch.replace(doc_tokens=rng.integers(0, VOCAB, size=(B, N, L)).astype(np.int32),
                          active_tokens=rng.integers(0, VOCAB, size=(B, M)).astype(np.int32))
  b_ = prefix_stream(changed)
  for la, lb in zip(a, b_):
    for x, y in zip(la, lb):
      np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("routing_tokens", ["question", "question_and_target"])
def test_active_tokens_are_causal_through_gradients(setup, routing_tokens):
  """SPEC §3: active token t attends to [prefix ; selected chunks ; active tokens <= t]:
  d logits[t] / d embedding[t'] is exactly 0 for t' > t and for the other example, non-zero
  for t' <= t. Hard routing keeps this true even when target tokens route (the selection
  depends on them, but no gradient flows through it)."""
  model, variables, batch = setup
  cfg = CFG.replace(routing_tokens=routing_tokens)
  model = type(model)(cfg)
  w = jnp.asarray(np.random.default_rng(0).normal(size=(VOCAB,)), jnp.float32)

  def f(da):
    out = forward(model, variables, batch, dict(zero_deltas(), active=da))
    return out.logits_bmv[0] @ w                                   # [M]
  jac = np.asarray(jax.jacrev(f)(zero_deltas()["active"]))        # [M, B, M, hidden]
  norms = np.linalg.norm(jac, axis=-1)                             # [t, b, t']
  n_valid = int(np.sum(batch.active_mask[0]))
  for t in range(n_valid):
    assert np.all(norms[t, 0, :t + 1] > 0), (t, norms[t, 0])
    np.testing.assert_array_equal(norms[t, 0, t + 1:], 0.0)
    np.testing.assert_array_equal(norms[t, 1], 0.0)


# --------------------------------------------------------------------------- SPEC §2: positions


def test_no_documents_means_qwen3_on_prefix_then_active_at_t_plus_k(setup):
  """SPEC §2/§3: with only padding documents, the active tokens are plain Qwen3 over
  [prefix ; active] with positions 0..T-1 then T+k, T+k+1, ... (the offset T+k is there
  even with nothing selected)."""
  model, variables, _ = setup
  batch = fixed_batch(seed=2, doc_lens=[[0] * N, [0] * N], prefix_lens=[3, 3], active_lens=[6, 6],
                      question_lens=[2, 2])
  out = model.apply(variables, batch)
  ids = np.concatenate([batch.prefix_tokens, batch.active_tokens], axis=1)
  pos = np.concatenate([np.arange(T), T + CFG.top_k + np.arange(M)])[None].repeat(B, 0)
  plain = model.apply(variables, ids, positions=jnp.asarray(pos))
  assert R.rel_err(out.logits_bmv, plain[:, T:]) < 1e-5   # float32 reassociation only
  plain_wrong = model.apply(variables, ids)   # positions continuous: NOT what MSA does
  assert R.rel_err(out.logits_bmv, plain_wrong[:, T:]) > 1e-3


def test_active_offset_does_not_depend_on_number_of_document_slots(setup, japply):
  """SPEC §2: the offset T+k is a constant: adding (padding) document slots changes neither
  the selection nor the logits."""
  model, variables, batch = setup
  out = japply(variables, batch)
  pad = lambda x: np.concatenate([x, np.zeros(x.shape[:1] + (3,) + x.shape[2:], x.dtype)], 1)
  bigger = batch.replace(doc_tokens=pad(batch.doc_tokens), doc_mask=pad(batch.doc_mask),
                         positive_docs=pad(batch.positive_docs))
  out2 = japply(variables, bigger)
  np.testing.assert_array_equal(np.asarray(out2.selected_brk), np.asarray(out.selected_brk))
  np.testing.assert_array_equal(np.asarray(out2.doc_scores_brn)[..., :N],
                                np.asarray(out.doc_scores_brn))
  assert R.rel_err(out2.logits_bmv, out.logits_bmv) < 1e-5


# --------------------------------------------------------------------------- implementation


def test_training_forward_is_the_staged_composition(setup):
  """SPEC §5 equivalence: encode_documents -> encode_prefix -> decode_active (the inference
  stages) give exactly the training forward's logits and routing."""
  model, variables, batch = setup
  out = model.apply(variables, batch)
  pp, dp, ap = positions.stream_positions(jnp.asarray(batch.prefix_mask),
                                          jnp.asarray(batch.doc_mask),
                                          jnp.asarray(batch.active_mask), top_k=CFG.top_k,
                                          rope_mode=CFG.rope_mode)
  memory = model.apply(variables, jnp.asarray(batch.doc_tokens), batch.doc_mask, dp,
                       method="encode_documents")
  assert sorted(memory) == list(CFG.router_layer_ids)
  prefix_kv = model.apply(variables, batch.prefix_tokens, batch.prefix_mask, pp,
                          method="encode_prefix")
  logits, decisions = model.apply(variables, batch.active_tokens, ap, batch.active_mask,
                                  routing_mask(batch, CFG),
                                  prefix_context(prefix_kv, batch.prefix_mask), memory,
                                  method="decode_active")
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(out.logits_bmv))
  for j, d in enumerate(decisions):
    np.testing.assert_array_equal(np.asarray(d.doc_scores_bn), np.asarray(out.doc_scores_brn[:, j]))
    np.testing.assert_array_equal(np.asarray(d.doc_idx_bk), np.asarray(out.selected_brk[:, j]))


def test_jit_equals_no_jit(setup):
  """jit changes no result beyond float32 reassociation (normwise 1e-5; measured 1.6e-6)."""
  model, variables, batch = setup
  a = model.apply(variables, batch)
  b_ = jax.jit(model.apply)(variables, batch)
  assert R.rel_err(b_.logits_bmv, a.logits_bmv) < 1e-5
  np.testing.assert_array_equal(np.asarray(b_.selected_brk), np.asarray(a.selected_brk))
  fin = np.isfinite(np.asarray(a.doc_scores_brn))
  np.testing.assert_array_equal(np.isfinite(np.asarray(b_.doc_scores_brn)), fin)
  np.testing.assert_allclose(np.asarray(b_.doc_scores_brn)[fin], np.asarray(a.doc_scores_brn)[fin],
                             atol=1e-5)


def loss_terms(model, variables, batch, deltas=None):
  """``(L_LM, L_aux, logits)`` of the training forward (SPEC §4)."""
  out = forward(model, variables, batch, deltas or zero_deltas())
  lm, _ = losses.lm_loss(out.logits_bmv, jnp.asarray(batch.targets), jnp.asarray(batch.loss_mask))
  aux, _ = losses.infonce_decoupled(out.doc_scores_brn, jnp.asarray(batch.positive_docs),
                                    losses.doc_valid(batch.doc_mask))
  return lm, aux, out


def _value_and_grad(m, variables, batch):
  """``((L_LM + 0.1 L_aux, the model's output), gradients)`` of model ``m``."""
  def f(v):
    lm, aux, out = loss_terms(m, v, batch)
    return lm + 0.1 * aux, out
  return jax.jit(jax.value_and_grad(f, has_aux=True))(variables)


@pytest.fixture(scope="module")
def baseline(setup):
  """The setup model's :func:`_value_and_grad`, computed once for every comparison."""
  model, variables, batch = setup
  return _value_and_grad(model, variables, batch)


def test_remat_equals_no_remat_values_and_grads(setup, baseline):
  """``ModelConfig(remat=True)`` recomputes, it does not change the math: same parameter
  tree, same logits (normwise 1e-5) and same gradients of L_LM + 0.1 L_aux (normwise 1e-5)."""
  model, variables, batch = setup
  remat_model = type(model)(CFG.replace(remat=True))
  shapes = nn.meta.unbox(jax.eval_shape(remat_model.init, jax.random.PRNGKey(0), batch))
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
  _assert_same_values_and_grads(setup, baseline, remat_model, 1e-5)


def _assert_same_values_and_grads(setup, baseline, other, logits_rtol):
  """``other`` (the setup's model with another implementation) gives the same logits
  (normwise ``logits_rtol``), selection and gradients of L_LM + 0.1 L_aux (normwise 1e-5)
  as the setup's model (``baseline``: its :func:`_value_and_grad`)."""
  _, variables, batch = setup
  (_, a), ga = baseline
  (_, b_), gb = _value_and_grad(other, variables, batch)
  assert R.rel_err(b_.logits_bmv, a.logits_bmv) < logits_rtol
  np.testing.assert_array_equal(np.asarray(b_.selected_brk), np.asarray(a.selected_brk))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree_util.tree_leaves(gb)):
    assert R.rel_err(y, x) < 1e-5, jax.tree_util.keystr(path)


# the fused q/k path's forward rotates x·w and scales by the row's rsqrt after (one pass):
# float32 rounding apart from the composition's, 2.8e-6 in the logits of this model
@pytest.mark.parametrize("switches,logits_rtol", [
    (dict(rms_norm_vjp="lean", embed_grad="autodiff"), 1e-6),
    (dict(rope_tables=True), 1e-6),
    (dict(qk_norm_rope_vjp="fused"), 1e-5),
    (dict(rope_tables=True, qk_norm_rope_vjp="fused"), 1e-5),
    (dict(qk_norm_rope_vjp="fused_bf16"), 1e-5),
    (dict(qk_norm_rope_vjp="pallas"), 1e-5)])
def test_hand_written_backwards_equal_autodiff_through_the_model(setup, baseline, switches,
                                                                logits_rtol):
  """``ModelConfig(rms_norm_vjp="lean", embed_grad="autodiff")`` (the hand-written norm
  backward; JAX's own embedding gradient) and ``qk_norm_rope_vjp="fused"`` (one forward pass
  and one backward for the q/k norms and RoPE; with ``rope_tables=True`` reading RoPE's
  cos/sin computed once a stream) against the defaults (JAX's backward of each; the
  embedding gradient scattered into float32): the same parameters, logits (normwise
  ``logits_rtol``) and gradients of L_LM + 0.1 L_aux (normwise 1e-5, float32)."""
  assert CFG.embed_grad == "f32_scatter" and CFG.rms_norm_vjp == "autodiff"
  assert CFG.qk_norm_rope_vjp == "autodiff"
  other = type(setup[0])(CFG.replace(**switches))
  _assert_same_values_and_grads(setup, baseline, other, logits_rtol)


BF16_RTOL = 6e-2         # logits, normwise relative; measured 3.3e-2 on this model
BF16_SCORE_ATOL = 3e-2   # routing scores (cosines), absolute


def test_bfloat16_forward_stays_close_to_float32(setup):
  """``dtype="bfloat16"`` (float32 params, bf16 activations/matmuls, float32 norms, RoPE,
  softmax and routing): logits within normwise relative error 6e-2 of float32 (measured
  3.3e-2 on this 3-layer model with N(0, 0.3) weights and random norm scales: bf16 keeps 8
  mantissa bits, 2^-8 = 4e-3 per rounding, compounded over layers), same selection,
  routing scores within 3e-2 absolute. An error of exactly 0 would mean bf16 was ignored."""
  model, variables, batch = setup
  a = model.apply(variables, batch)
  b_ = type(model)(CFG.replace(dtype="bfloat16")).apply(variables, batch)
  assert b_.logits_bmv.dtype == jnp.float32
  err = R.rel_err(b_.logits_bmv, a.logits_bmv)
  print(f"bf16 vs float32 logits: normwise relative error {err:.2e}")
  assert 0 < err < BF16_RTOL, err
  np.testing.assert_array_equal(np.asarray(b_.selected_brk), np.asarray(a.selected_brk))
  fin = np.isfinite(np.asarray(a.doc_scores_brn))
  assert np.max(np.abs(np.asarray(b_.doc_scores_brn)[fin]
                       - np.asarray(a.doc_scores_brn)[fin])) < BF16_SCORE_ATOL


# --------------------------------------------------------------------------- SPEC §4 gradients


def router_grads(grads):
  out = {}
  for i in CFG.router_layer_ids:
    lp = grads["params"][f"layers_{i}"]
    out[i] = (np.asarray(lp["router_q_proj"]["kernel"]), np.asarray(lp["router_k_proj"]["kernel"]))
  return out


@pytest.fixture(scope="module")
def loss_grads(setup):
  """Gradients of L_LM and of L_aux separately, w.r.t. params and the document embeddings
  (one jitted reverse pass over the two losses)."""
  model, variables, batch = setup

  def f(v, dd):
    lm, aux, _ = loss_terms(model, v, batch, dict(zero_deltas(), docs=dd))
    return jnp.stack([lm, aux])
  (gp, gd) = jax.jit(jax.jacrev(f, argnums=(0, 1)))(variables, zero_deltas()["docs"])
  lm = jax.tree_util.tree_map(lambda x: x[0], (gp, gd))
  aux = jax.tree_util.tree_map(lambda x: x[1], (gp, gd))
  return lm, aux


def test_lm_loss_gradient_skips_the_router_and_reaches_selected_documents(setup, loss_grads):
  """SPEC §3.3/§4: selection is hard, so L_LM gives router_q_proj / router_k_proj exactly zero
  gradient; L_LM reaches the document encoder through the selected pooled K̄, V̄ only: the
  embeddings of documents selected in some router layer get gradient, the others exactly 0."""
  model, variables, batch = setup
  g, gd = loss_grads[0]
  for i, (gq, gk) in router_grads(g).items():
    np.testing.assert_array_equal(gq, 0.0)
    np.testing.assert_array_equal(gk, 0.0)
  doc_norm = np.linalg.norm(np.asarray(gd).reshape(B, N, -1), axis=-1)
  chosen = selected_sets(model.apply(variables, batch))
  assert any(len(c) < int(np.asarray(batch.doc_mask[b]).any(-1).sum())
             for b, c in enumerate(chosen))   # some real document is unselected
  for b in range(B):
    for n in range(N):
      if n in chosen[b]:
        assert doc_norm[b, n] > 0, (b, n)
      else:
        assert doc_norm[b, n] == 0, (b, n)
  # and the layers below the router layers learn from memory too (document encoder)
  q0 = np.asarray(g["params"]["layers_0"]["q_proj"]["kernel"])
  assert np.abs(q0).max() > 0


def test_aux_loss_gradient_reaches_router_projections(setup, loss_grads):
  """SPEC §4: the router projections learn from L_aux (non-zero gradient in every router
  layer, for both router_q_proj and router_k_proj)."""
  _, _, batch = setup
  assert np.asarray(batch.positive_docs).any()
  g, _ = loss_grads[1]
  for i, (gq, gk) in router_grads(g).items():
    assert np.abs(gq).max() > 0 and np.abs(gk).max() > 0, i


def test_gemm_rows_pads_only_small_token_counts():
  from msa_jax.decoder_layer import _gemm_rows
  h = jnp.arange(2 * 1 * 3, dtype=jnp.float32).reshape(2, 1, 3)
  hp = _gemm_rows(h)
  assert hp.shape == (2, 4, 3) and np.array_equal(hp[:, :1], h) and not np.any(hp[:, 1:])
  for shape in [(8, 1, 3), (1, 9, 3), (4, 0, 3)]:
    x = jnp.ones(shape)
    assert _gemm_rows(x) is x


def test_one_token_projections_equal_the_unpadded_rows():
  """A decoding step's Q/K/V projections run on rows padded to 8 (``_gemm_rows``): the
  real row's q, k, v equal the same token's in a 9-token call (no padding there)."""
  from msa_jax.decoder_layer import DecoderLayer
  layer = DecoderLayer(CFG)
  x9 = jax.random.normal(jax.random.PRNGKey(3), (1, 9, CFG.hidden_size), jnp.float32)
  pos9 = jnp.arange(9)[None] + 5
  params = layer.init(jax.random.PRNGKey(4), x9, pos9, method=DecoderLayer._project)
  full = layer.apply(params, x9, pos9, method=DecoderLayer._project)
  one = layer.apply(params, x9[:, 4:5], pos9[:, 4:5], method=DecoderLayer._project)
  for name, a, b in zip("hqkv", one, full):
    assert a.shape[1] == 1, name
    np.testing.assert_allclose(np.asarray(a[:, 0]), np.asarray(b[:, 4]), rtol=1e-5, atol=1e-6,
                               err_msg=name)
