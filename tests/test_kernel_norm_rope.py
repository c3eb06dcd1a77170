"""The q/k norm + RoPE kernels (``pallas_kernels/norm_rope.py``) against their XLA
references (``layers.norm_rope_one_pass`` and the hand-written backward of
``layers.norm_rope_fused_vjp`` / ``norm_rope_fused_bf16_vjp``).

On the CPU the Mosaic GPU kernels run in interpret mode at small shapes and are lowered
for CUDA at the 0.6b step's shapes; tests marked ``gpu`` compile and run them
(``MSA_TEST_GPU=1``).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import layers
from pallas_kernels import norm_rope as nr

EPS, THETA = 1e-6, 1e6


def _case(b, t, h, d=128, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, t, h, d)) * 3, jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.bfloat16)
  scale = jnp.asarray(rng.normal(1.0, 0.3, size=(d,)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 300_000, size=(b, t)), jnp.int32)
  return x, g, scale, pos


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _pulled(fn, x, scale, rope, g):
  """``(y, dx, dscale)`` of ``fn(x, scale, rope, ...)`` (a ``layers`` norm + RoPE form)
  through ``jax.vjp`` for the cotangent ``g``."""
  y, pull = jax.vjp(lambda xx, ss: fn(xx, ss, rope, EPS, THETA, jnp.bfloat16), x, scale)
  return (y, *pull(g))


def _want(x, g, scale, pos, round_dn):
  y = layers.norm_rope_one_pass(x, scale, pos, EPS, THETA, jnp.bfloat16)
  dx, dscale, _ = layers._norm_rope_custom_bwd(EPS, THETA, jnp.bfloat16, round_dn,
                                              (x, scale, pos), g)
  return y, dx, dscale


# (b, t, h): one tile a head; a ragged token count (padded); more tiles than programs, so
# the last program repeats the final tile (which must not count twice in dscale)
# two heads a step (one cos/sin box for both)
@pytest.mark.parametrize("b,t,h,blocks,hps", [(1, 64, 2, 0, 1), (2, 45, 3, 0, 1),
                                              (3, 64, 2, 4, 1), (2, 64, 4, 3, 2)])
@pytest.mark.parametrize("round_dn", [False, True])
def test_kernels_interpreted_equal_the_xla_forms(b, t, h, blocks, hps, round_dn):
  x, g, scale, pos = _case(b, t, h)
  tables = layers.rope_tables(pos, 128, THETA)
  y = nr.forward(x, scale, tables.cos, tables.sin, EPS, blocks=blocks, heads_per_step=hps,
                 interpret=True)
  dx, dscale = nr.backward(x, g, scale, tables.cos, tables.sin, EPS, round_dn,
                           blocks=blocks, heads_per_step=hps, interpret=True)
  want_y, want_dx, want_dscale = _want(x, g, scale, pos, round_dn)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  # the same float32 math in another order: outputs within one bf16 rounding
  assert _rel(y, want_y) < 4e-3
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want_y, np.float32),
                             rtol=1e-2, atol=1e-2)
  assert _rel(dx, want_dx) < 4e-3
  # rounding dn to bf16 after the same products summed in another order can land on the
  # other side of a rounding boundary now and then: a few bf16 ulps in a sum of thousands
  assert _rel(dscale, want_dscale) < (1e-4 if round_dn else 1e-5)
  assert dscale.dtype == jnp.float32 and dscale.shape == (128,)


def test_repeated_final_tile_is_counted_once():
  """7 tiles over 4 programs of 2: the last program runs tile 6 twice; a dscale that
  counted it twice would be off by that tile's share."""
  x, g, scale, pos = _case(1, 7 * 64, 1, seed=3)
  tables = layers.rope_tables(pos, 128, THETA)
  _, dscale = nr.backward(x, g, scale, tables.cos, tables.sin, EPS, True, blocks=4,
                          interpret=True)
  _, _, want = _want(x, g, scale, pos, True)
  assert nr.num_blocks_for(7, 4) == (4, 2)
  assert _rel(dscale, want) < 1e-5


def test_unsupported_inputs_are_refused_with_the_fallback_named():
  x, g, scale, pos = _case(1, 64, 1)
  tables = layers.rope_tables(pos, 128, THETA)
  with pytest.raises(ValueError, match="norm_rope_one_pass"):
    nr.forward(x.astype(jnp.float32), scale, tables.cos, tables.sin, EPS, interpret=True)
  with pytest.raises(ValueError, match="must divide the 1 heads"):
    nr.forward(x, scale, tables.cos, tables.sin, EPS, heads_per_step=2, interpret=True)
  assert not nr.supported((4, 64, 2, 96), jnp.bfloat16, jnp.bfloat16)
  assert nr.supported((4, 64, 2, 128), jnp.bfloat16, jnp.bfloat16)


@pytest.mark.parametrize("h,hps", [(16, 1), (8, 1), (16, 2)])
def test_kernels_lower_for_the_gpu_at_the_step_shape(h, hps):
  """The 0.6b step's q (16 heads) and k (8) at batch 32's 542,464 tokens: Mosaic GPU's
  static checks of the copies and register layouts pass (lowering runs on a CPU)."""
  sds = jax.ShapeDtypeStruct
  n, d = 5216 * 104, 128
  x = sds((n, h, 2, d // 2), jnp.bfloat16)
  tab = sds((n, d // 2), jnp.float32)
  w = sds((2, d // 2), jnp.float32)
  fwd = nr.forward_call(n, h, d, EPS, 2, 132, False, hps)
  bwd = nr.backward_call(n, h, d, EPS, True, 2, 132, False, hps)
  for fn, args in ((fwd, (x, tab, tab, w)), (bwd, (x, x, tab, tab, w))):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
  assert nr.smem_bytes(d, 2, True, hps) < 227 * 1024


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("MSA_TEST_GPU"), reason="set MSA_TEST_GPU=1 on a GPU")
@pytest.mark.parametrize("b,t,h", [(4, 104, 16), (3, 45, 8)])
def test_gpu_kernels_compiled_equal_the_xla_forms(b, t, h):
  x, g, scale, pos = _case(b, t, h, seed=5)
  tables = layers.rope_tables(pos, 128, THETA)
  y = jax.jit(lambda *a: nr.forward(*a, EPS))(x, scale, tables.cos, tables.sin)
  dx, dscale = jax.jit(lambda *a: nr.backward(*a, EPS, True))(x, g, scale, tables.cos,
                                                               tables.sin)
  want_y, want_dx, want_dscale = _want(x, g, scale, pos, True)
  assert _rel(y, want_y) < 4e-3
  assert _rel(dx, want_dx) < 4e-3
  assert _rel(dscale, want_dscale) < 1e-4


@pytest.mark.parametrize("as_tables", [False, True])
def test_layers_pallas_vjp_through_jax_equals_fused_bf16(as_tables):
  """``layers.norm_rope_pallas_vjp`` (``qk_norm_rope_vjp="pallas"``) with the kernels
  interpreted, through ``jax.vjp``: the values and gradients of ``fused_bf16``, from
  positions or from :class:`layers.RopeTables`; off a GPU without ``interpret`` it is
  ``fused_bf16`` itself."""
  x, g, scale, pos = _case(2, 64, 2, seed=9)
  rope = layers.rope_tables(pos, 128, THETA) if as_tables else pos
  got = _pulled(lambda *a: layers.norm_rope_pallas_vjp(*a, interpret=True), x, scale, rope, g)
  want = _pulled(layers.norm_rope_fused_bf16_vjp, x, scale, rope, g)
  for a, b in zip(got, want):
    assert a.dtype == b.dtype and a.shape == b.shape
  assert _rel(got[0], want[0]) < 4e-3 and _rel(got[1], want[1]) < 4e-3
  assert _rel(got[2], want[2]) < 1e-5
  fallback = _pulled(layers.norm_rope_pallas_vjp, x, scale, rope, g)   # the CPU: fused_bf16
  for a, b in zip(fallback, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("MSA_TEST_GPU"), reason="set MSA_TEST_GPU=1 on a GPU")
def test_gpu_layers_pallas_vjp_compiled_equals_fused_bf16():
  """Through ``jax.vjp`` on a GPU at a size the kernels take (``KERNEL_MIN_TOKENS``)."""
  x, g, scale, pos = _case(4, 1040, 2, seed=11)
  assert 4 * 1040 >= layers.KERNEL_MIN_TOKENS
  got = jax.jit(lambda: _pulled(layers.norm_rope_pallas_vjp, x, scale, pos, g))()
  want = jax.jit(lambda: _pulled(layers.norm_rope_fused_bf16_vjp, x, scale, pos, g))()
  assert _rel(got[0], want[0]) < 4e-3 and _rel(got[1], want[1]) < 4e-3
  assert _rel(got[2], want[2]) < 1e-4
