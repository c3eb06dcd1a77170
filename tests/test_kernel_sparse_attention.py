"""Sparse memory attention kernel (pallas_kernels.sparse_attention) against references.

CPU runs the Mosaic GPU kernel in interpret mode on small shapes; tests marked
``gpu`` run it compiled at Qwen3-4B head shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_attention as sa
from pallas_kernels import sparse_attention_short as short
from pallas_kernels import sparse_attention_short_bwd as short_bwd


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


def test_warp_specialized_forward_matches_reference_interpret():
  """The three-warpgroup forward (interpreted): a pair of query blocks, context with
  masked slots, own tokens with leading padding."""
  q, k, v, smask, kc, vc, cmask = _inputs(7, 1, 128, 1, 1, 64, 64, self_valid=[[0] * 2 + [1] * 126])
  cmask = jnp.zeros_like(cmask).at[0, 5:].set(True)
  bs = sa.BlockSizes(block_kv=64, warp_specialized=True)
  got = sa.attend(q, k, v, smask, kc, vc, cmask, implementation="pallas", block_sizes=bs)
  want = sa.attend_reference(*_f32(q, k, v), smask, *_f32(kc, vc), cmask)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=1e-2)


def _grads(impl, args, w, bs=None):
  """Gradients of ``sum(w * attend)`` w.r.t. q, k_self, v_self, k_ctx, v_ctx."""
  q, k, v, smask, kc, vc, cmask = args
  kw = {} if bs is None else {"block_sizes": bs}

  def loss(q_, k_, v_, kc_, vc_):
    out = sa.attend(q_, k_, v_, smask, kc_, vc_, cmask, implementation=impl, **kw)
    return jnp.sum(w * out.astype(jnp.float32))
  if kc is None:
    return jax.grad(lambda q_, k_, v_: loss(q_, k_, v_, None, None), argnums=(0, 1, 2))(q, k, v)
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, kc, vc)


def _assert_bf16_close(got, want, names=("dq", "dk", "dv", "dk_ctx", "dv_ctx")):
  """Each gradient within bf16 rounding of the float32 reference's: max error ≤ 2% of
  the largest entry, and the error's norm ≤ 1% of the gradient's (a zero gradient, of
  context that no query sees, must be exactly zero)."""
  for name, a, b in zip(names, got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, name
    scale = np.abs(b).max()
    if scale == 0:
      assert np.all(a == 0), name
      continue
    err = np.abs(a - b)
    assert err.max() <= 2e-2 * scale, (name, err.max(), scale)
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b), name


@pytest.mark.parametrize("case", ["ctx_padding_gqa", "no_ctx_kv128", "q128"])
def test_pallas_gradient_matches_reference_interpret(case):
  """Backward kernels (interpreted): context with masked slots and a ragged length, own
  tokens with leading padding, an example without context, GQA; other tilings."""
  if case == "ctx_padding_gqa":
    valid = [[0] * 3 + [1] * 67, [1] * 70]
    args = _inputs(3, 2, 70, 2, 1, 64, 65, self_valid=valid, dtype=jnp.float32)
    args = (*args[:6], args[6].at[0].set(False))   # example 0: no context, rows 0-2 see nothing
    bs = None
  elif case == "no_ctx_kv128":
    args = (*_inputs(4, 1, 130, 2, 1, 64, 0, dtype=jnp.float32)[:4], None, None, None)
    bs = sa.BlockSizes(bwd_block_kv=128)
  else:
    args = _inputs(5, 1, 128, 2, 2, 64, 64, dtype=jnp.float32)
    bs = sa.BlockSizes(bwd_block_q=128, bwd_block_kv=64)
  w = jax.random.normal(jax.random.key(9), args[0].shape)
  got = _grads("pallas", args, w, bs)
  want = _grads("xla", args, w)
  _assert_bf16_close(got, want)
  if case == "ctx_padding_gqa":                    # rows that see no key pass no gradient
    assert np.all(np.asarray(got[0][0, :3]) == 0)


_KERNEL_PRIMITIVES = ("pallas_call", "mpmd_map")   # plgpu.kernel's, by jax version


def _jaxpr_stats(fn, *args) -> tuple[int, int]:
  """(element count of the largest value, number of Pallas kernel calls) in ``fn``'s
  jaxpr, sub-jaxprs included."""
  def walk(jaxpr):
    sizes = [int(np.prod(v.aval.shape)) for v in jaxpr.invars + jaxpr.outvars
             if hasattr(v.aval, "shape")]
    kernels = 0
    for eqn in jaxpr.eqns:
      is_kernel = eqn.primitive.name in _KERNEL_PRIMITIVES
      kernels += is_kernel
      sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
      if is_kernel:
        continue                                  # the kernel body holds only tiles
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          sub = sub.jaxpr if isinstance(sub, jax.extend.core.ClosedJaxpr) else sub
          if isinstance(sub, jax.extend.core.Jaxpr):
            size, k = walk(sub)
            sizes.append(size)
            kernels += k
    return max(sizes, default=0), kernels
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_pallas_backward_never_materialises_logits():
  """The compiled-kernel gradient runs three kernels (forward, dQ, dK/dV) and no value
  of its program is as large as one head's ``[M, S + M]`` logits (the reference's
  backward has ``[B, H, M, S + M]``)."""
  b, m, h, g, d, s = 1, 256, 2, 1, 64, 512
  q, k, v, smask, kc, vc, cmask = _inputs(6, b, m, h, g, d, s)

  def grad_fn(impl):
    def loss(q_, k_, v_, kc_, vc_):
      out = sa.attend(q_, k_, v_, smask, kc_, vc_, cmask, implementation=impl,
                      interpret=False)
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))
  logits = m * (s + m)
  largest, kernels = _jaxpr_stats(grad_fn("xla"), q, k, v, kc, vc)
  assert largest >= b * h * logits and kernels == 0
  largest, kernels = _jaxpr_stats(grad_fn("pallas"), q, k, v, kc, vc)
  assert largest < logits and kernels == 3


@pytest.mark.gpu
@pytest.mark.parametrize("b,m,s,bs", [
    (2, 300, 1000, sa.BlockSizes(block_kv=64, warp_specialized=False)),
    (1, 1024, 2048, sa.BlockSizes(block_kv=128, bwd_block_kv=128, warp_specialized=False)),
    (3, 64, 17, sa.BlockSizes(block_kv=64, stages=3, bwd_stages=3)),
    (2, 300, 1000, sa.BlockSizes(block_kv=128, warp_specialized=True)),   # the GPU default
    (1, 1024, 2048, sa.BlockSizes(block_kv=64, stages=3, warp_specialized=True)),
])
def test_gpu_pallas_compiled(b, m, s, bs):
  _check_compiled(b, m, s, bs, seed=m)


def _check_compiled(b, m, s, bs, seed):
  """Compiled kernels at Qwen3-4B heads (32 query, 8 kv, D 128) against the float32
  reference: ~10 % padding tokens, two leading; example 0 without context (``s = 0``: no
  context operands); values within 2e-2, leading rows zeros, gradients within bf16."""
  rng = np.random.default_rng(seed)
  valid = rng.random((b, m)) < 0.9
  valid[:, :2] = False                               # leading padding
  q, k, v, smask, kc, vc, cmask = _inputs(m, b, m, 32, 8, 128, s, self_valid=valid)
  if s == 0:
    kc = vc = cmask = None
  else:
    cmask = cmask.at[0].set(False)                   # example 0: no context
  got = sa.attend(q, k, v, smask, kc, vc, cmask, implementation="pallas", block_sizes=bs)
  want = sa.attend_reference(*_f32(q, k, v), smask, *_f32(kc, vc), cmask)
  err = np.abs(np.asarray(got, np.float32) - np.asarray(want))
  assert err.max() < 2e-2, err.max()
  assert np.all(np.asarray(got[0, :2]) == 0)
  w = jax.random.normal(jax.random.key(seed), q.shape)
  grads = _grads("pallas", (q, k, v, smask, kc, vc, cmask), w, bs)
  want = _grads("xla", (*_f32(q, k, v), smask, *_f32(kc, vc), cmask), w)
  _assert_bf16_close(grads, want)


def _numpy_attend_context(q, kc, vc, cmask):
  """Float64 numpy: softmax over the valid context slots only (zeros where none)."""
  q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
  b, m, h, d = q.shape
  r = h // kc.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    allow = np.asarray(cmask[bi])
    if not allow.any():
      continue
    for hi in range(h):
      logit = q[bi, :, hi] @ kc[bi, allow, hi // r].T / np.sqrt(d)        # [m, valid]
      p = np.exp(logit - logit.max(axis=1, keepdims=True))
      out[bi, :, hi] = (p / p.sum(axis=1, keepdims=True)) @ vc[bi, allow, hi // r]
  return out


def test_attend_context_reference_matches_float64_numpy():
  """``attention.attend_context`` (a decoding step's own K/V already in its cache buffer):
  softmax over the valid slots only; an example with no valid slot gets zeros."""
  from msa_jax import attention
  q, _, _, _, kc, vc, cmask = _inputs(3, 2, 3, 4, 2, 8, 9, dtype=jnp.float32)
  cmask = cmask.at[1].set(False)
  got = attention.attend_context(q, kc, vc, cmask)
  np.testing.assert_allclose(np.asarray(got), _numpy_attend_context(q, kc, vc, cmask),
                             rtol=2e-5, atol=2e-6)
  assert np.all(np.asarray(got[1]) == 0)


@pytest.mark.parametrize("m,s", [(1, 128), (3, 200), (70, 64)])
def test_pallas_attend_context_matches_reference_interpret(m, s):
  """The forward kernel without its own-token sweep (``self_keys=False``), interpreted:
  one decoding token against a cache buffer, a few tokens against an unaligned buffer
  (padded to the key tile), and two query blocks; example 1 sees nothing."""
  q, _, _, _, kc, vc, cmask = _inputs(m + s, 2, m, 4, 2, 64, s)
  cmask = cmask.at[1].set(False)
  got = sa.attend_context(q, kc, vc, cmask, implementation="pallas")
  want = sa.attend_context(*_f32(q, kc, vc), cmask, implementation="xla")
  assert got.dtype == q.dtype and got.shape == q.shape
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=1e-2)
  np.testing.assert_allclose(np.asarray(want), _numpy_attend_context(q, kc, vc, cmask),
                             atol=1e-2)
  assert np.all(np.asarray(got[1]) == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("b,m,s", [(1, 1, 256), (8, 1, 384), (2, 5, 1000)])
def test_gpu_pallas_attend_context_compiled(b, m, s):
  """Compiled at the 4B head shape: decoding steps (one token, batch 1 and 8) against cache
  buffers of whole 128-slot tiles, and a few tokens against an unaligned one."""
  q, _, _, _, kc, vc, cmask = _inputs(s, b, m, 32, 8, 128, s)
  cmask = cmask.at[0].set(False)                     # example 0: nothing visible
  got = sa.attend_context(q, kc, vc, cmask, implementation="pallas")
  want = sa.attend_context(*_f32(q, kc, vc), cmask, implementation="xla")
  err = np.abs(np.asarray(got, np.float32) - np.asarray(want))
  assert err.max() < 2e-2, err.max()
  assert np.all(np.asarray(got[0]) == 0)


@pytest.mark.parametrize("ws", [False, True])
def test_pad_free_kernels_zero_unseen_rows_interpret(ws):
  """``BlockSizes(pad_free=True)``, interpreted (operands still padded; the kernels zero the
  rows that see no key and give them a log-sum-exp of -MASKED): values and gradients equal
  the reference's, unseen rows (an example without context, leading padding) are zeros and
  pass no gradient; a ragged 104-row document stream as the 0.6b recipe's slots."""
  valid = [[0] * 3 + [1] * 101, [1] * 90 + [0] * 14]
  args = _inputs(11, 2, 104, 2, 1, 64, 65, self_valid=valid, dtype=jnp.float32)
  args = (*args[:6], args[6].at[0].set(False))     # example 0: rows 0-2 see nothing
  bs = sa.BlockSizes(pad_free=True, block_kv=64, warp_specialized=ws)
  q, k, v, smask, kc, vc, cmask = args
  got = sa.attend(q, k, v, smask, kc, vc, cmask, implementation="pallas", block_sizes=bs)
  want = sa.attend_reference(q, k, v, smask, kc, vc, cmask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-2)
  assert np.all(np.asarray(got[0, :3]) == 0)
  w = jax.random.normal(jax.random.key(12), q.shape)
  grads = _grads("pallas", args, w, bs)
  _assert_bf16_close(grads, _grads("xla", args, w))
  assert np.all(np.asarray(grads[0][0, :3]) == 0)


def test_pad_free_compiled_path_lowers_for_the_gpu():
  """The compiled pad-free path (own tokens at 104 rows, the kernels' TMA copies reaching
  past them) lowers for CUDA: Mosaic GPU's static checks of every copy pass (lowering runs
  on a CPU; whether the copies zero-fill as intended needs the GPU test below). Its
  program pads and slices nothing of the own-token size, unlike the padded path, and
  writes no batch of zeros for the absent context."""
  b, m, h, g, d = 2, 104, 4, 2, 128
  f32 = jax.ShapeDtypeStruct
  q, k = f32((b, m, h, d), jnp.bfloat16), f32((b, m, g, d), jnp.bfloat16)
  mask = f32((b, m), bool)

  def grad_fn(pad_free):
    bs = sa.BlockSizes(pad_free=pad_free)
    def loss(q_, k_, v_, mask_):
      out = sa.attend(q_, k_, v_, mask_, implementation="pallas", block_sizes=bs,
                      interpret=False)
      return jnp.sum(out.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  own_sized = (f"{b}x128x{h}x{d}xbf16", f"{b}x128x{g}x{d}xbf16")   # own tokens at 128 rows
  for pad_free in (False, True):
    text = grad_fn(pad_free).trace(q, k, k, mask).lower(lowering_platforms=("cuda",)).as_text()
    pads = [line for line in text.splitlines()        # padded to 128 rows, or sliced back
            if ("stablehlo.pad" in line and any(f"-> tensor<{x}>" in line for x in own_sized))
            or ("stablehlo.slice" in line and any(f"tensor<{x}>" in line for x in own_sized)
                and f"-> tensor<{b}x{m}x" in line)]
    assert bool(pads) != pad_free, (pad_free, pads[:2])
    if pad_free:   # no context: its never-read stand-in is one example's, not B zero tiles
      assert f"tensor<1x128x{g}x{d}xbf16>" in text
      assert f"tensor<{b}x128x{g}x{d}xbf16>" not in text


@pytest.mark.parametrize("m,s,ws", [(70, 128, False), (300, 1000, True)])
def test_pad_free_compiled_path_lowers_for_rows_not_a_multiple_of_8(m, s, ws):
  """Own-token counts that are not a multiple of 8 (TMA tiles the row axis by 8): the
  pad-free path pads them to one and lowers for CUDA, forward and backward (these shapes
  failed Mosaic GPU's copy check on the H200, 2026-12-05, before the 8-row padding)."""
  b, h, g, d = 1, 4, 2, 64
  sds = jax.ShapeDtypeStruct
  q, k = sds((b, m, h, d), jnp.bfloat16), sds((b, m, g, d), jnp.bfloat16)
  kc = sds((b, s, g, d), jnp.bfloat16)
  bs = sa.BlockSizes(pad_free=True, warp_specialized=ws)

  def loss(q_, k_, v_, mask_, kc_, vc_, cmask_):
    out = sa.attend(q_, k_, v_, mask_, kc_, vc_, cmask_, implementation="pallas",
                    block_sizes=bs, interpret=False)
    return jnp.sum(out.astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 5))).trace(
      q, k, k, sds((b, m), bool), kc, kc, sds((b, s), bool)).lower(
          lowering_platforms=("cuda",)).as_text()
  assert f"tensor<{b}x{-(-m // 8) * 8}x{h}x{d}xbf16>" in text


@pytest.mark.gpu
@pytest.mark.parametrize("b,m,s,ws", [(4, 104, 0, True), (2, 300, 1000, True),
                                      (2, 104, 0, False), (1, 70, 128, False)])
def test_gpu_pallas_pad_free_compiled(b, m, s, ws):
  """``BlockSizes(pad_free=True)`` compiled: own tokens at their rows (104: the 0.6b
  recipe's document slots), TMA reading and writing past them; values and gradients as
  the padded kernels', unseen rows zeros."""
  _check_compiled(b, m, s, sa.BlockSizes(pad_free=True, warp_specialized=ws), seed=m + s)


# 128 rows (two whole query blocks) is slow-marked: 104 covers two blocks, ragged
@pytest.mark.parametrize("m,pad_free", [(104, True), (64, False),
                                        pytest.param(128, True, marks=pytest.mark.slow)])
def test_short_persistent_forward_matches_reference_interpret(m, pad_free):
  """``BlockSizes(short_persistent=True)`` (interpreted): documents with no context and at
  most 128 own tokens go through ``sparse_attention_short``'s persistent forward (fewer
  programs than items, so each streams several, the last repeating one): values and
  gradients (the backward kernels read its log-sum-exp) equal the reference's; a ragged
  document, one with leading padding and an empty slot output zeros where nothing is
  seen, and pass no gradient there."""
  assert short.applies(-(-m // 64) * 64, 0) and not short.applies(128, 64)
  assert not short.applies(192, 0)
  with pytest.raises(ValueError, match="fewer stages"):
    short.forward_call(1, 128, 2, 1, 128, stages=3)
  valid = [[1] * m, [1] * (m - 30) + [0] * 30, [0] * 2 + [1] * (m - 2), [0] * m]
  q, k, v, smask = _inputs(13, 4, m, 4, 2, 64, 0, self_valid=valid)[:4]
  bs = sa.BlockSizes(short_persistent=True, pad_free=pad_free, warp_specialized=False)
  got = sa.attend(q, k, v, smask, implementation="pallas", block_sizes=bs)
  want = sa.attend_reference(*_f32(q, k, v), smask)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=1e-2)
  assert np.all(np.asarray(got[3]) == 0) and np.all(np.asarray(got[2, :2]) == 0)
  w = jax.random.normal(jax.random.key(14), q.shape)
  grads = _grads("pallas", (q, k, v, smask, None, None, None), w, bs)
  _assert_bf16_close(grads, _grads("xla", (*_f32(q, k, v), smask, None, None, None), w),
                     names=("dq", "dk", "dv"))
  assert np.all(np.asarray(grads[0][3]) == 0) and np.all(np.asarray(grads[0][2, :2]) == 0)


def test_short_persistent_forward_any_number_of_programs_interpret():
  """``sparse_attention_short.forward_call`` with 1, 5 (32 items: the last program repeats
  the final item) and 32 programs gives the same outputs and log-sum-exps, bit for bit, and
  the reference's values on every row that sees a key (``zero_unseen`` off: the others are
  the caller's to zero)."""
  from pallas_kernels import _platform
  b, m, h, g, d = 4, 128, 4, 2, 64
  q, k, v, smask = _inputs(15, b, m, h, g, d, 0, self_valid=np.arange(m)[None] < np.array(
      [[128], [100], [3], [0]]))[:4]
  bias = sa._bias(smask)
  params = _platform.mosaic_interpret_params(True)
  outs = [short.forward_call(b, m, h, g, d, blocks=n, interpret_params=params)(q, k, v, bias)
          for n in (1, 5, 32)]
  for out, lse in outs[1:]:
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(outs[0][0], np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(outs[0][1]))
  want = sa.attend_reference(*_f32(q, k, v), smask)
  keep = (np.cumsum(np.asarray(smask), axis=1) > 0)[:, :, None, None]  # rows that see a key
  np.testing.assert_allclose(np.where(keep, np.asarray(outs[0][0], np.float32), 0),
                             np.where(keep, np.asarray(want), 0), atol=1e-2)


@pytest.mark.parametrize("persistent_bwd", [False, True])
def test_short_persistent_path_lowers_for_the_gpu(persistent_bwd):
  """The compiled short forward (own tokens at 104 rows, pad-free: the copies reach past
  them) lowers for CUDA, forward and backward (the tiled backward kernels, or with
  ``short_persistent_bwd`` the persistent ones): Mosaic GPU's static checks of the
  pipelines' copies and shared memory pass (whether the kernels run as designed needs the
  GPU test)."""
  b, m, h, g, d = 3, 104, 4, 2, 128
  sds = jax.ShapeDtypeStruct
  q, k = sds((b, m, h, d), jnp.bfloat16), sds((b, m, g, d), jnp.bfloat16)
  bs = sa.BlockSizes(short_persistent=True, pad_free=True, short_persistent_bwd=persistent_bwd)

  def loss(q_, k_, v_, mask_):
    out = sa.attend(q_, k_, v_, mask_, implementation="pallas", block_sizes=bs,
                    interpret=False)
    return jnp.sum(out.astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, sds((b, m), bool)).lower(
      lowering_platforms=("cuda",)).as_text()
  import re
  operands = [len(x.split(",")) for x in re.findall(r"custom_call @mosaic_gpu\w*\(([^)]*)\)",
                                                    text)]
  # the short forward takes (q, k, v, bias); the tiled dK/dV kernel (q, do, lse, delta, k,
  # v, bias), the tiled dQ kernel also the context's three; both persistent ones seven
  assert sorted(operands) == ([4, 7, 7] if persistent_bwd else [4, 7, 10]), operands


# 128 rows (two whole query blocks) is slow-marked: 104 covers two blocks, ragged
@pytest.mark.parametrize("m,pad_free", [(104, True), (64, False),
                                        pytest.param(128, True, marks=pytest.mark.slow)])
def test_short_persistent_backward_matches_reference_interpret(m, pad_free):
  """``BlockSizes(short_persistent_bwd=True)`` (interpreted): the documents' dQ and dK/dV
  through ``sparse_attention_short_bwd``'s persistent kernels (fewer programs than items,
  the last repeating one; GQA, so dK/dV sums two heads across pipeline steps) equal the
  float32 reference's gradients and the tiled backward kernels'; a ragged document, one
  with leading padding and an empty slot pass no gradient where nothing is seen."""
  valid = [[1] * m, [1] * (m - 30) + [0] * 30, [0] * 2 + [1] * (m - 2), [0] * m]
  q, k, v, smask = _inputs(17, 4, m, 4, 2, 64, 0, self_valid=valid)[:4]
  w = jax.random.normal(jax.random.key(18), q.shape)
  args = (q, k, v, smask, None, None, None)
  fwd = dict(short_persistent=True, pad_free=pad_free, warp_specialized=False)
  got = _grads("pallas", args, w, sa.BlockSizes(**fwd, short_persistent_bwd=True))
  _assert_bf16_close(got, _grads("xla", (*_f32(q, k, v), smask, None, None, None), w),
                     names=("dq", "dk", "dv"))
  tiled = _grads("pallas", args, w, sa.BlockSizes(**fwd))
  _assert_bf16_close(got, tiled, names=("dq", "dk", "dv"))
  assert np.all(np.asarray(got[0][3]) == 0) and np.all(np.asarray(got[0][2, :2]) == 0)
  assert np.all(np.asarray(got[1][3]) == 0) and np.all(np.asarray(got[2][3]) == 0)
  # keys no query may see (the padding after example 1's 30 last rows) get no gradient
  assert np.all(np.asarray(got[1][1, m - 30:]) == 0)


def test_short_persistent_backward_any_number_of_programs_interpret():
  """``sparse_attention_short_bwd``'s kernels with 1, 5 (the last program repeats the
  final item; for dK/dV all of its heads) and one program an item give the same
  gradients bit for bit; too many stages for shared memory is refused by name."""
  from pallas_kernels import _platform
  b, m, h, g, d = 3, 128, 4, 2, 64
  q, k, v, smask = _inputs(19, b, m, h, g, d, 0, self_valid=np.arange(m)[None] < np.array(
      [[128], [90], [0]]))[:4]
  bias = sa._bias(smask)
  params = _platform.mosaic_interpret_params(True)
  _, lse = short.forward_call(b, m, h, g, d, interpret_params=params, zero_unseen=True)(
      q, k, v, bias)
  do = jax.random.normal(jax.random.key(20), q.shape).astype(jnp.bfloat16)
  delta = jax.random.normal(jax.random.key(21), (b, h, m), jnp.float32)
  operands = (q, do, lse, delta, k, v, bias)
  dqs = [short_bwd.dq_call(b, m, h, g, d, blocks=n, interpret_params=params)(*operands)
         for n in (1, 5, b * h * 2)]
  dkvs = [short_bwd.dkv_call(b, m, h, g, d, blocks=n, interpret_params=params)(*operands)
          for n in (1, 5, b * g * 2)]
  for dq in dqs[1:]:
    np.testing.assert_array_equal(np.asarray(dq, np.float32), np.asarray(dqs[0], np.float32))
  for dk, dv in dkvs[1:]:
    np.testing.assert_array_equal(np.asarray(dk, np.float32), np.asarray(dkvs[0][0], np.float32))
    np.testing.assert_array_equal(np.asarray(dv, np.float32), np.asarray(dkvs[0][1], np.float32))
  assert np.any(np.asarray(dqs[0], np.float32) != 0) and np.any(np.asarray(dkvs[0][0]) != 0)
  for call in (short_bwd.dq_call, short_bwd.dkv_call):
    with pytest.raises(ValueError, match="fewer stages"):
      call(1, 128, 2, 1, 128, stages=3)
    with pytest.raises(ValueError, match="at most 128 own rows"):
      call(1, 192, 2, 1, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("persistent_bwd", [False, True])
@pytest.mark.parametrize("b,m", [(4, 104), (3, 64), (5, 128)])
def test_gpu_short_persistent_compiled(b, m, persistent_bwd):
  """``BlockSizes(short_persistent=True, pad_free=True)`` compiled at Qwen3-4B heads: the
  documents' forward as one persistent kernel (and with ``short_persistent_bwd`` their
  dQ and dK/dV as two more); values and gradients as the reference's."""
  bs = sa.BlockSizes(short_persistent=True, pad_free=True, short_persistent_bwd=persistent_bwd)
  _check_compiled(b, m, 0, bs, seed=m + 7)
