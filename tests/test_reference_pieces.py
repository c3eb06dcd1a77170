"""The pure-function pieces of MSA against the float64 numpy reference (SPEC §1-§3).

float32 JAX is compared with float64 numpy (``tests/reference_numpy.py``, written
from SPEC alone). Tolerances: normwise relative error ``max|a-r|/max|r| <= 1e-5``
for pooled values and attention outputs; absolute ``1e-5`` for routing scores
(cosines, bounded by 1); exact for integer results (positions, selections, masks).
"""
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from msa_jax import attention, layers, pooling, positions, routing
from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()

RTOL = 1e-5
SCORE_ATOL = 1e-5
FAST = settings(max_examples=15, deadline=None, derandomize=True)
# Jitted once per shape: eager dispatch compiles every op separately and is slower.
_pool = jax.jit(pooling.mean_pool_chunks, static_argnums=2)
_attend = jax.jit(attention.attend)
_attention_probs = jax.jit(attention.attention_probs)
_positions = jax.jit(positions.stream_positions, static_argnames=("rope_mode",))


@jax.jit
def _doc_scores(rq, route, kr_cf, chunk_doc):
  rq_bmf = routing.group_sum_queries(rq, kr_cf.shape[-1] // rq.shape[-1])
  s_c = routing.chunk_scores(rq_bmf, route, kr_cf)
  return rq_bmf, routing.document_scores(s_c, chunk_doc, 5)


# --------------------------------------------------------------------------- SPEC §1


def _central_differences(loss, x, scale, h=1e-6):
  """float64 central differences of ``loss(x, scale)`` (a float) in each entry of ``x``
  and of the ``[D]`` ``scale``: ``(d loss / dx, d loss / d scale)``."""
  x64, s64 = x.astype(np.float64), scale.astype(np.float64)
  want_dx = np.zeros_like(x64)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x64)
    e[i] = h
    want_dx[i] = (loss(x64 + e, s64) - loss(x64 - e, s64)) / (2 * h)
  eye = np.eye(s64.size)
  want_ds = np.array([(loss(x64, s64 + h * eye[j]) - loss(x64, s64 - h * eye[j])) / (2 * h)
                      for j in range(s64.size)])
  return want_dx, want_ds


@pytest.mark.parametrize("vjp", sorted(layers.RMS_NORM_VJPS))
def test_rms_norm_gradients_match_float64_finite_differences(vjp):
  """RMSNorm's gradients (``x`` and the scale) by each ``ModelConfig.rms_norm_vjp``: JAX's
  autodiff and the hand-written lean backward, float32, against central differences of the
  float64 numpy reference of ``sum(g · rms_norm(x))``."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 4, 16)).astype(np.float32)
  scale = rng.normal(1.0, 0.3, size=(16,)).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  norm = layers.RMSNorm(1e-6, vjp=vjp)
  _, pull = jax.vjp(lambda xx, ss: norm.apply({"params": {"scale": ss}}, xx), x, scale)
  dx, dscale = jax.jit(pull)(jnp.asarray(g))
  loss = lambda xx, ss: float(np.sum(g * R.rms_norm(xx, ss, 1e-6)))  # noqa: E731
  want_dx, want_ds = _central_differences(loss, x, scale)
  assert R.rel_err(dx, want_dx) < 1e-5
  assert R.rel_err(dscale, want_ds) < 1e-5


@pytest.mark.parametrize("grad", sorted(layers.EMBED_GRADS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedding_lookup_and_its_gradient_match_float64(grad, dtype):
  """The token embedding by each ``ModelConfig.embed_grad``: rows ``table[ids]`` in the
  compute dtype, and the float32 table's gradient equal to the float64 scatter-add
  (``np.add.at``) of the rows' cotangents, with ids repeated many times (as a small
  vocabulary in a long batch does) and unsorted. float32 compute: 1e-5; bf16: each
  cotangent row is rounded to bf16 first (the compute dtype), then summed, to 1e-5 for the
  float32-summed gradients and to bf16's summation error (2^-6) for autodiff's bf16 sum."""
  rng = np.random.default_rng(5)
  v, d = 37, 24
  table = rng.normal(size=(v, d)).astype(np.float32)
  ids = rng.choice([0, 3, 4, 9, 36], size=(6, 50)).astype(np.int32)
  g = rng.normal(size=ids.shape + (d,)).astype(np.float32)
  emb = layers.Embed(v, d, dtype=jnp.dtype(dtype), grad=grad)
  rows, pull = jax.vjp(lambda t: emb.apply({"params": {"embedding": t}}, jnp.asarray(ids)),
                       jnp.asarray(table))
  assert rows.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(rows, np.float32),
                                np.asarray(jnp.asarray(table[ids], dtype), np.float32))
  (dtable,) = jax.jit(pull)(jnp.asarray(g, dtype))
  assert dtable.dtype == jnp.float32
  g64 = np.asarray(jnp.asarray(g, dtype), np.float64)
  want = np.zeros((v, d))
  np.add.at(want, ids.reshape(-1), g64.reshape(-1, d))
  tol = 2.0 ** -6 if (dtype == "bfloat16" and grad == "autodiff") else 1e-5
  assert R.rel_err(dtable, want) < tol
  assert np.all(np.asarray(dtable)[[1, 2, 5]] == 0)   # ids never looked up: no gradient


def test_rms_norm_lean_backward_in_bfloat16_equals_autodiff():
  """bf16 activations (the recipes' dtype): the lean backward's gradients equal JAX's
  within bf16 rounding of ``dx`` (2^-8), and the float32 scale gradient to 1e-4."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(8, 5, 128)), jnp.bfloat16)
  scale = jnp.asarray(rng.normal(1.0, 0.3, size=(128,)), jnp.float32)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
  grads = {}
  for vjp in ("autodiff", "lean"):
    norm = layers.RMSNorm(1e-6, jnp.bfloat16, vjp=vjp)
    _, pull = jax.vjp(lambda xx, ss: norm.apply({"params": {"scale": ss}}, xx), x, scale)
    grads[vjp] = jax.jit(pull)(g)
  (ax, as_), (lx, ls) = grads["autodiff"], grads["lean"]
  assert lx.dtype == jnp.bfloat16 and ls.dtype == jnp.float32
  assert 0 <= R.rel_err(lx.astype(jnp.float32), ax.astype(jnp.float32)) < 8e-3
  assert R.rel_err(ls, as_) < 1e-4


def _norm_rope_module(vjp: str, dtype=jnp.float32):
  """The q/k norm followed by RoPE (``RMSNorm`` given positions), differentiated by
  ``vjp`` (``layers.NORM_ROPE_VJPS``)."""
  norm = layers.RMSNorm(1e-6, dtype, rope_vjp=vjp)
  return lambda x, scale, pos: norm.apply({"params": {"scale": scale}}, x, pos, 1e6)


@pytest.mark.parametrize("vjp", layers.NORM_ROPE_VJPS)
def test_norm_rope_gradients_match_float64_finite_differences(vjp):
  """The q/k path ``rope(rms_norm(x))`` by each ``ModelConfig.qk_norm_rope_vjp``: float32
  values (the fused forward, ``layers.norm_rope_one_pass``, equal to the composition to
  float32 rounding) and the gradients of
  ``x`` and the scale against central differences of the float64 numpy reference of
  ``sum(g · rope(rms_norm(x)))``."""
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 3, 2, 16)).astype(np.float32)
  scale = rng.normal(1.0, 0.3, size=(16,)).astype(np.float32)
  pos = np.array([[0, 5, 63], [17, 300, 2]], np.int32)   # float32 angles: exact enough here
  g = rng.normal(size=x.shape).astype(np.float32)
  f = _norm_rope_module(vjp)
  y, pull = jax.vjp(lambda xx, ss: f(xx, ss, jnp.asarray(pos)), jnp.asarray(x),
                    jnp.asarray(scale))
  want_y = np.stack([R.rope(R.rms_norm(x[b].astype(np.float64), scale, 1e-6), pos[b], 1e6)
                     for b in range(2)])
  assert R.rel_err(np.asarray(y), want_y) < 1e-6
  np.testing.assert_allclose(np.asarray(y), np.asarray(_norm_rope_module("autodiff")(
      jnp.asarray(x), jnp.asarray(scale), jnp.asarray(pos))), rtol=0, atol=2e-6)
  dx, dscale = jax.jit(pull)(jnp.asarray(g))

  def loss(xx, ss):
    return float(np.sum(g * np.stack([R.rope(R.rms_norm(xx[b], ss, 1e-6), pos[b], 1e6)
                                      for b in range(2)])))
  want_dx, want_ds = _central_differences(loss, x, scale)
  assert R.rel_err(dx, want_dx) < 1e-5
  assert R.rel_err(dscale, want_ds) < 1e-5


def test_norm_rope_without_theta_is_an_error():
  norm = layers.RMSNorm(1e-6)
  with pytest.raises(ValueError, match="rope_theta > 0"):
    norm.init(jax.random.PRNGKey(0), jnp.ones((1, 2, 1, 4)), jnp.zeros((1, 2), jnp.int32))


def test_norm_rope_fused_backward_in_bfloat16_equals_autodiff():
  """bf16 activations (the recipes'): both fused q/k norm + RoPE forwards (one pass,
  rounding once to bf16 where the composition rounds the norm's output first) at least as
  close to the float32 value as JAX's composition (2^-7 normwise), ``dx`` within bf16
  rounding (2^-8 normwise) and the float32 scale gradient to 1e-2 (a sum of ~5K
  bf16-rounded products either way); "fused" keeps the cotangent between RoPE and the norm
  in float32, "fused_bf16" rounds it to bf16 as JAX's backward is written to, so their
  scale gradients differ."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(4, 20, 2, 128)), jnp.bfloat16)
  scale = jnp.asarray(rng.normal(1.0, 0.3, size=(128,)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 200_000, size=(4, 20)), jnp.int32)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
  out, grads = {}, {}
  for vjp in layers.NORM_ROPE_VJPS:
    f = _norm_rope_module(vjp, jnp.bfloat16)
    out[vjp], pull = jax.vjp(lambda xx, ss: f(xx, ss, pos), x, scale)
    grads[vjp] = jax.jit(pull)(g)
  ax, as_ = grads["autodiff"]
  want = _norm_rope_module("autodiff")(x.astype(jnp.float32), scale, pos)
  err_autodiff = R.rel_err(out["autodiff"].astype(jnp.float32), want)
  assert 0 < err_autodiff < 2 ** -7    # two bf16 roundings (the norm's output, then RoPE's)
  for vjp in ("fused", "fused_bf16"):
    assert out[vjp].dtype == jnp.bfloat16
    assert R.rel_err(out[vjp].astype(jnp.float32), want) <= err_autodiff
    fx, fs = grads[vjp]
    assert fx.dtype == jnp.bfloat16 and fs.dtype == jnp.float32
    assert R.rel_err(fx.astype(jnp.float32), ax.astype(jnp.float32)) < 8e-3
    assert R.rel_err(fs, as_) < 1e-2
  # fused keeps RoPE's cotangent in float32, fused_bf16 rounds it to bf16 first
  assert R.rel_err(grads["fused"][1], grads["fused_bf16"][1]) > 1e-5


def test_rms_norm_and_rope_match_reference():
  """SPEC §1: RMSNorm (float32, learned scale) and rotate-half RoPE with theta 1e6."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
  scale = rng.normal(size=(16,)).astype(np.float32)
  y = layers.RMSNorm(1e-6).apply({"params": {"scale": scale}}, x)
  assert R.rel_err(y, R.rms_norm(x.astype(np.float64), scale, 1e-6)) < RTOL
  pos = np.array([[0, 1, 2, 7, 100], [3, 3, 50, 1000, 4096]], np.int32)
  y = layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), 1e6)
  ref = np.stack([R.rope(x[b].astype(np.float64), pos[b], 1e6) for b in range(2)])
  # positions up to 4096 in float32 angles: a few ulps of 4096 rad -> 2e-6 relative.
  assert R.rel_err(y, ref) < RTOL
  # Position 0 is the identity; rotate-half pairs dimension i with i + D/2.
  np.testing.assert_allclose(np.asarray(y)[0, 0], x[0, 0], rtol=0, atol=0)


# --------------------------------------------------------------------------- SPEC §3 step 1


@FAST
@given(data=st.data(), length=st.sampled_from([7, 9]), chunk=st.integers(1, 4))
def test_mean_pool_chunks_matches_reference(data, length, chunk):
  """SPEC §3.1: chunks of P tokens from a document's first token, the last one partial;
  mean over the tokens actually present; a chunk with no token is masked (and zero)."""
  n_docs = 4   # fixed shapes keep compilations few; lengths vary through the mask
  lens = data.draw(st.lists(st.integers(0, length), min_size=n_docs, max_size=n_docs))
  rng = np.random.default_rng(length * 100 + chunk)
  x = rng.normal(size=(n_docs, length, 2, 3)).astype(np.float32)
  mask = np.arange(length)[None, :] < np.asarray(lens)[:, None]
  x_garbage = np.where(mask[..., None, None], x, 1e6).astype(np.float32)  # padding must not leak
  pooled, cmask = _pool(jnp.asarray(x_garbage), jnp.asarray(mask), chunk)
  c = -(-length // chunk)
  assert pooled.shape == (n_docs, c, 2, 3) and pooled.dtype == jnp.float32
  for n, ln in enumerate(lens):
    n_present = -(-ln // chunk)
    np.testing.assert_array_equal(np.asarray(cmask[n]), np.arange(c) < n_present)
    np.testing.assert_array_equal(np.asarray(pooled[n, n_present:]), 0.0)
    if ln:
      ref = R.pool_chunks(x[n, :ln].astype(np.float64), chunk)
      assert R.rel_err(pooled[n, :n_present], ref) < RTOL


def test_mean_pool_partial_last_chunk_by_hand():
  """SPEC §3.1 worked example: 5 tokens, P=2 -> means of (t0,t1), (t2,t3), (t4)."""
  x = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1) * 2.0   # 0,2,4,6,8,10
  mask = jnp.array([[True] * 5 + [False]])
  pooled, cmask = pooling.mean_pool_chunks(x, mask, 2)
  np.testing.assert_array_equal(np.asarray(pooled[0, :, 0]), [1.0, 5.0, 8.0])
  np.testing.assert_array_equal(np.asarray(cmask[0]), [True, True, True])


# --------------------------------------------------------------------------- SPEC §3 step 2


@FAST
@given(data=st.data(), heads=st.sampled_from([(4, 1), (4, 2), (4, 4), (6, 2)]))
def test_routing_scores_match_reference(data, heads):
  """SPEC §3.2: cosine of normalised RQ with normalised pooled K̄R (no 1/sqrt(D)), mean over
  the H query heads (query head h reads kv head h // (H/Hkv)), max over the routing tokens
  (padding excluded), max over a document's chunks. group_sum_queries + chunk_scores +
  document_scores (the group-sum identity) must equal the literal definition."""
  h, g = heads
  d, m, n_docs, max_chunks = 4, 4, 5, 3
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  route = np.asarray(data.draw(st.lists(st.booleans(), min_size=m, max_size=m)))
  chunks = data.draw(st.lists(st.integers(0, max_chunks), min_size=n_docs, max_size=n_docs))
  rq = rng.normal(size=(1, m, h, d)).astype(np.float32) * rng.uniform(0.1, 10)
  kr_raw = [rng.normal(size=(c, g, d)).astype(np.float32) for c in chunks]
  # The bank: every document's chunks, flattened, padding chunks (-1) interleaved.
  kr_rows, chunk_doc = [], []
  for n, c in enumerate(chunks):
    for j in range(c):
      kr_rows.append(np.asarray(routing.l2_normalize(jnp.asarray(kr_raw[n][j]))).reshape(-1))
      chunk_doc.append(n)
    kr_rows.append(rng.normal(size=(g * d,)).astype(np.float32) * 100)   # garbage pad chunk
    chunk_doc.append(-1)
  while len(kr_rows) < n_docs * (max_chunks + 1):    # a fixed bank size
    kr_rows.append(rng.normal(size=(g * d,)).astype(np.float32) * 100)
    chunk_doc.append(-1)
  kr_cf = jnp.asarray(np.stack(kr_rows))
  rq_bmf, doc_s = _doc_scores(jnp.asarray(rq), jnp.asarray(route[None]), kr_cf,
                              jnp.asarray(np.array(chunk_doc)))
  assert rq_bmf.shape == (1, m, g * d)
  doc_s = np.asarray(doc_s)[0]
  for n in range(n_docs):
    if chunks[n] == 0 or not route.any():
      assert doc_s[n] == -np.inf
    else:
      ref = R.routing_score(rq[0].astype(np.float64), kr_raw[n].astype(np.float64), route)
      assert abs(doc_s[n] - ref) < SCORE_ATOL, (n, doc_s[n], ref)


def test_routing_score_is_scale_free_and_unscaled_by_sqrt_d():
  """SPEC §3.2: identical RQ and K̄R directions give score exactly 1 (cosine, no 1/sqrt(D))."""
  v = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)   # Hkv=2, D=8
  rq = np.stack([v[0] * 3, v[0] * 0.5, v[1] * 7, v[1]])[None, None]     # H=4 [1,1,4,8]
  kr = routing.l2_normalize(jnp.asarray(v * 11.0)).reshape(1, 16)
  s = routing.chunk_scores(routing.group_sum_queries(jnp.asarray(rq), 2), jnp.ones((1, 1), bool),
                           kr)
  np.testing.assert_allclose(np.asarray(s), [[1.0]], atol=1e-6)


# --------------------------------------------------------------------------- SPEC §3 step 3


@FAST
@given(scores=st.lists(st.sampled_from([-np.inf, 0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=7),
       k=st.integers(1, 9))
def test_select_top_k_matches_reference(scores, k):
  """SPEC §3.3: the min(k, N) best documents, ties to the lower index, -inf (padding/empty)
  never selected, returned in document order; fewer than k -> padded with invalid slots."""
  s = jnp.asarray(np.array([scores], np.float32))
  sel = routing.select_top_k(s, k)
  assert sel.doc_idx_bk.shape == (1, k) and sel.valid_bk.shape == (1, k)
  ref = R.select_top_k(scores, k)
  valid = np.asarray(sel.valid_bk[0])
  np.testing.assert_array_equal(valid, np.arange(k) < len(ref))
  np.testing.assert_array_equal(np.asarray(sel.doc_idx_bk[0])[valid], ref)
  np.testing.assert_array_equal(np.asarray(sel.doc_idx_bk[0])[~valid], 0)


def test_select_top_k_ties_go_to_lower_index():
  """SPEC §3.3 by hand: scores [.5, .9, .5, .5, .9], k=3 -> docs 1, 4 and then 0 (lowest tie)."""
  sel = routing.select_top_k(jnp.array([[0.5, 0.9, 0.5, 0.5, 0.9]]), 3)
  np.testing.assert_array_equal(np.asarray(sel.doc_idx_bk), [[0, 1, 4]])
  assert bool(jnp.all(sel.valid_bk))


def test_select_top_k_has_no_gradient():
  """SPEC §3.3: hard selection; no gradient flows through the choice."""
  def f(s):
    sel = routing.select_top_k(s, 2)
    return jnp.sum(sel.doc_idx_bk.astype(jnp.float32) * sel.valid_bk) + 0.0 * jnp.sum(s)
  g = jax.grad(f)(jnp.array([[0.1, 0.7, 0.3]]))
  np.testing.assert_array_equal(np.asarray(g), 0.0)


# --------------------------------------------------------------------------- SPEC §3 step 4


@FAST
@given(data=st.data(), heads=st.sampled_from([(4, 1), (4, 2), (4, 4), (6, 3)]),
       s_ctx=st.sampled_from([0, 5]))
def test_attend_matches_reference(data, heads, s_ctx):
  """SPEC §1/§3.4: GQA softmax attention, scale 1/sqrt(D), each query sees every valid
  context slot and its own earlier (and itself) valid tokens; no visible key -> zeros."""
  h, g = heads
  d, m = 8, 6
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  b = 2
  self_lens = data.draw(st.lists(st.integers(0, m), min_size=b, max_size=b))
  ctx_mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=b * s_ctx,
                                           max_size=b * s_ctx)), bool).reshape(b, s_ctx)
  q = rng.normal(size=(b, m, h, d)).astype(np.float32) * 2
  ks = rng.normal(size=(b, m, g, d)).astype(np.float32) * 2
  vs = rng.normal(size=(b, m, g, d)).astype(np.float32)
  kc = rng.normal(size=(b, s_ctx, g, d)).astype(np.float32) * 2
  vc = rng.normal(size=(b, s_ctx, g, d)).astype(np.float32)
  self_mask = np.arange(m)[None, :] < np.asarray(self_lens)[:, None]
  if s_ctx:
    out = _attend(q, ks, vs, self_mask, kc, vc, ctx_mask)
  else:
    out = _attend(q, ks, vs, self_mask)
  out = np.asarray(out)
  probs_bgrmk = np.asarray(_attention_probs(q, ks, self_mask, kc, ctx_mask) if s_ctx
                           else _attention_probs(q, ks, self_mask))
  for bb in range(b):
    allowed = np.concatenate([np.broadcast_to(ctx_mask[bb], (m, s_ctx)),
                              R.causal(m) & self_mask[bb][None, :]], axis=1)
    # The probabilities (what lookup_attention records) against a float64 softmax.
    ref_p = R.attention_probs(q[bb].astype(np.float64),
                              np.concatenate([kc[bb], ks[bb]]).astype(np.float64), allowed)
    for head in range(h):
      got_p = probs_bgrmk[bb, head // (h // g), head % (h // g)]
      np.testing.assert_allclose(got_p, ref_p[head], atol=1e-5)
    ref = R.attention(q[bb].astype(np.float64), np.concatenate([kc[bb], ks[bb]]).astype(np.float64),
                      np.concatenate([vc[bb], vs[bb]]).astype(np.float64), allowed)
    assert np.max(np.abs(out[bb] - ref)) <= RTOL * max(np.max(np.abs(vs)), 1.0)
    no_key = ~allowed.any(axis=1)
    np.testing.assert_array_equal(out[bb][no_key], 0.0)


# --------------------------------------------------------------------------- SPEC §2 positions


@FAST
@given(data=st.data(), k=st.integers(1, 16), mode=st.sampled_from(["document", "global"]),
       t=st.sampled_from([0, 4]), with_gaps=st.booleans())
def test_stream_positions_match_reference(data, k, mode, t, with_gaps):
  """SPEC §2: document mode: prefix 0..T-1, every document 0..len-1, active from T+k;
  global mode (ablation): prefix, documents in slot order and active numbered continuously,
  with ``doc_position_gaps`` skipped before each document and before the active tokens
  (document mode ignores them)."""
  b, n, l, m = 2, 4, 5, 5
  t_lens = data.draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
  d_lens = [data.draw(st.lists(st.integers(0, l), min_size=n, max_size=n)) for _ in range(b)]
  m_lens = data.draw(st.lists(st.integers(0, m), min_size=b, max_size=b))
  gaps = ([data.draw(st.lists(st.integers(0, 10_000), min_size=n + 1, max_size=n + 1))
           for _ in range(b)] if with_gaps else None)
  pm = np.arange(t)[None, :] < np.asarray(t_lens)[:, None]
  dm = np.arange(l)[None, None, :] < np.asarray(d_lens)[:, :, None]
  am = np.arange(m)[None, :] < np.asarray(m_lens)[:, None]
  pp, dp, ap = _positions(jnp.asarray(pm), jnp.asarray(dm), jnp.asarray(am), top_k=k,
                          rope_mode=mode,
                          doc_gaps_bn1=None if gaps is None else jnp.asarray(gaps, jnp.int32))
  for bb in range(b):
    rp, rd, ra = R.positions(t_lens[bb], d_lens[bb], m_lens[bb], k, mode,
                             None if gaps is None else gaps[bb])
    np.testing.assert_array_equal(np.asarray(pp[bb])[pm[bb]], rp)
    for nn_ in range(n):
      np.testing.assert_array_equal(np.asarray(dp[bb, nn_])[dm[bb, nn_]], rd[nn_])
    np.testing.assert_array_equal(np.asarray(ap[bb])[am[bb]], ra)


def test_active_offset_is_t_plus_k_whatever_the_documents():
  """SPEC §2: the active offset T+k is a constant: not the number or length of documents."""
  starts = []
  for n, l in [(1, 1), (3, 7), (40, 2)]:
    _, _, ap = positions.stream_positions(jnp.ones((1, 5), bool), jnp.ones((1, n, l), bool),
                                          jnp.ones((1, 3), bool), top_k=16, rope_mode="document")
    starts.append(np.asarray(ap[0]).tolist())
  assert starts == [[21, 22, 23]] * 3


def test_stream_positions_rejects_bad_mode():
  with pytest.raises(ValueError, match="rope_mode"):
    positions.stream_positions(jnp.ones((1, 1), bool), jnp.ones((1, 1, 1), bool),
                               jnp.ones((1, 1), bool), top_k=1, rope_mode="alibi")
