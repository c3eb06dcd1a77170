"""Sparse memory attention kernel (pallas_kernels.sparse_attention) against references.

CPU runs the Mosaic GPU kernel in interpret mode on small shapes; tests marked
``gpu`` run it compiled at Qwen3-4B head shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_attention as sa


def _inputs(seed, b, m, h, g, d, s, self_valid=None, ctx_p=0.7, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (b, m, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, m, g, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, m, g, d), jnp.float32).astype(dtype)
  kc = jax.random.normal(ks[3], (b, s, g, d), jnp.float32).astype(dtype)
  vc = jax.random.normal(ks[4], (b, s, g, d), jnp.float32).astype(dtype)
  cmask = jax.random.bernoulli(ks[5], ctx_p, (b, s))
  if self_valid is None:
    smask = jnp.ones((b, m), bool)
  else:
    smask = jnp.asarray(np.asarray(self_valid, bool))
  return q, k, v, smask, kc, vc, cmask


def _numpy_attend(q, k, v, smask, kc, vc, cmask):
  """Float64 numpy: softmax over [valid context ; valid earlier own tokens]."""
  f = lambda x: np.asarray(x, np.float64)
  q, k, v, kc, vc = map(f, (q, k, v, kc, vc))
  b, m, h, d = q.shape
  r = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      kk = np.concatenate([kc[bi, :, hi // r], k[bi, :, hi // r]])
      vv = np.concatenate([vc[bi, :, hi // r], v[bi, :, hi // r]])
      for i in range(m):
        allow = np.concatenate([np.asarray(cmask[bi]), np.asarray(smask[bi]) & (np.arange(m) <= i)])
        if not allow.any():
          continue
        logit = kk[allow] @ q[bi, i, hi] / np.sqrt(d)
        p = np.exp(logit - logit.max())
        out[bi, i, hi] = (p / p.sum()) @ vv[allow]
  return out


def _f32(*xs):
  return [None if x is None else (x.astype(jnp.float32) if x.dtype != bool else x) for x in xs]


def test_reference_matches_float64_numpy():
  args = _inputs(0, 2, 7, 4, 2, 8, 5, self_valid=[[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 1]],
                 dtype=jnp.float32)
  args = (*args[:6], args[6].at[1].set(False))   # example 1 has no context at all
  got = sa.attend_reference(*args)
  np.testing.assert_allclose(np.asarray(got), _numpy_attend(*args), rtol=2e-5, atol=2e-6)
  assert np.all(np.asarray(got[1, 0]) == 0)       # no visible key → zeros


@pytest.mark.parametrize("m,s,valid", [(80, 40, None), (64, 0, None),
                                       (70, 65, [[0] * 3 + [1] * 60 + [0] * 7])])
def test_pallas_matches_reference_interpret(m, s, valid):
  q, k, v, smask, kc, vc, cmask = _inputs(1, 1, m, 4, 2, 64, s, self_valid=valid)
  if s == 0:
    kc = vc = cmask = None
  elif valid is not None:
    cmask = jnp.zeros_like(cmask)                 # leading padding rows see nothing → zeros
  got = sa.attend(q, k, v, smask, kc, vc, cmask, implementation="pallas")
  want = sa.attend_reference(*_f32(q, k, v), smask, *_f32(kc, vc), cmask)
  assert got.dtype == q.dtype and got.shape == q.shape
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=1e-2)
  if valid is not None:
    assert np.all(np.asarray(got[0, :3]) == 0)


def test_pallas_gradient_is_reference_gradient_interpret():
  q, k, v, smask, kc, vc, cmask = _inputs(2, 1, 64, 2, 1, 64, 64, dtype=jnp.float32)
  w = jax.random.normal(jax.random.key(9), q.shape)

  def loss(impl):
    return lambda *a: jnp.sum(w * sa.attend(a[0], a[1], a[2], smask, a[3], a[4], cmask,
                                            implementation=impl))
  got = jax.grad(loss("pallas"), argnums=(0, 1, 2, 3, 4))(q, k, v, kc, vc)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2, 3, 4))(q, k, v, kc, vc)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("b,m,s,bs", [
    (2, 300, 1000, sa.BlockSizes()),
    (1, 1024, 2048, sa.BlockSizes(block_kv=128)),
    (3, 64, 17, sa.BlockSizes(stages=3)),
])
def test_gpu_pallas_compiled(b, m, s, bs):
  rng = np.random.default_rng(m)
  valid = rng.random((b, m)) < 0.9
  valid[:, :2] = False                               # leading padding
  q, k, v, smask, kc, vc, cmask = _inputs(m, b, m, 32, 8, 128, s, self_valid=valid)
  cmask = cmask.at[0].set(False)                     # example 0: no context
  got = sa.attend(q, k, v, smask, kc, vc, cmask, implementation="pallas", block_sizes=bs)
  want = sa.attend_reference(*_f32(q, k, v), smask, *_f32(kc, vc), cmask)
  err = np.abs(np.asarray(got, np.float32) - np.asarray(want))
  assert err.max() < 2e-2, err.max()
  assert np.all(np.asarray(got[0, :2]) == 0)
  g = jax.grad(lambda q_: jnp.sum(sa.attend(q_, k, v, smask, kc, vc, cmask,
                                            implementation="pallas").astype(jnp.float32)))(q)
  assert np.isfinite(np.asarray(g, np.float32)).all()
