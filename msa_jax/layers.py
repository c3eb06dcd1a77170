"""Qwen3 building blocks: RMSNorm, RoPE, SwiGLU MLP, projections (SPEC §1)."""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msa_jax import batched_init, kernel_shards
from msa_jax.config import ModelConfig


def dense(features: int, cfg: ModelConfig, axes: tuple[str, str], name: str) -> nn.Dense:
  """A bias-free linear layer with logically partitioned kernel ``[in, out]``."""
  return nn.Dense(
      features, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
      kernel_init=nn.with_logical_partitioning(
          batched_init.normal(cfg.initializer_range), axes),
      name=name)


def rms_norm(x, scale, eps: float, dtype):
  """``x · rsqrt(mean(x²) + eps) · scale`` over the last axis, in float32; output in
  ``dtype``. Differentiated by JAX."""
  x32 = x.astype(jnp.float32)
  var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
  return (x32 * jax.lax.rsqrt(var + eps) * _last_axis(scale, x.ndim)).astype(dtype)


def _last_axis(scale, ndim: int):
  """A ``[D]`` scale as float32 ``[1, ..., 1, D]`` (``ndim`` axes), to multiply rows."""
  return scale.astype(jnp.float32).reshape((1,) * (ndim - 1) + (-1,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm_lean_vjp(x, scale, eps: float, dtype):
  """:func:`rms_norm` with a hand-written backward that keeps only ``x`` and ``scale`` and
  recomputes each row's ``r = rsqrt(mean(x²) + eps)``:

      dx = r·(g·w) − x·r³·mean(g·w·x),   dw = Σ_rows g·x·r

  each from the inputs in their own dtype (two row reductions, one elementwise pass, one
  column reduction), where JAX's own backward of the float32 formula may keep float32
  copies of whole activations between its fusions (on the H200 the q/k norms' backward
  wrote an ``f32[5216, 104, 16, 128]`` array in the 0.6b step, 266 ms of its 4,543:
  BENCHMARKS.md). Measured there (2026-12-05) it changed nothing: that array is the
  cotangent arriving from RoPE's float32 backward, kept in float32 for the two reductions,
  not the norm's own. The same function; gradients equal to float32 rounding
  (``tests/test_reference_pieces.py``). Selected by ``ModelConfig.rms_norm_vjp="lean"``."""
  return rms_norm(x, scale, eps, dtype)


def _rms_norm_lean_fwd(x, scale, eps, dtype):
  return rms_norm(x, scale, eps, dtype), (x, scale)


def _rms_norm_lean_bwd(eps, dtype, res, g):
  x, scale = res
  x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  gw = g32 * _last_axis(scale, x.ndim)
  dx = r * gw - x32 * (r * r * r) * jnp.mean(gw * x32, axis=-1, keepdims=True)
  dscale = jnp.sum((g32 * x32 * r).reshape(-1, x.shape[-1]), axis=0)
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm_lean_vjp.defvjp(_rms_norm_lean_fwd, _rms_norm_lean_bwd)

RMS_NORM_VJPS = {"autodiff": rms_norm, "lean": rms_norm_lean_vjp}


def embed_take(table_vd, ids, dtype):
  """Rows ``table_vd[ids]`` in ``dtype`` (``flax.linen.Embed``'s lookup), differentiated by
  JAX: the table's gradient is a scatter-add of the rows' cotangents into a ``dtype``
  (bf16 in the recipes) copy of the table, cast to the parameter's dtype after."""
  return jnp.take(table_vd.astype(dtype), ids, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _embed_take_scatter32(table_vd, ids, dtype, sort: bool):
  return embed_take(table_vd, ids, dtype)


def _embed_scatter32_fwd(table_vd, ids, dtype, sort):
  # the table is a parameter (alive through the step anyway): no extra memory as residual
  return embed_take(table_vd, ids, dtype), (table_vd, ids)


def _embed_scatter32_bwd(dtype, sort, res, g):
  table_vd, ids = res
  ids_n = ids.reshape(-1).astype(jnp.int32)
  rows_nd = g.reshape(-1, table_vd.shape[-1]).astype(jnp.float32)
  if sort:   # equal ids next to each other: fewer atomic collisions in flight at once
    ids_n, order = jax.lax.sort_key_val(ids_n, jnp.arange(ids_n.shape[0], dtype=jnp.int32))
    rows_nd = jnp.take(rows_nd, order, axis=0)
  grad_vd = jnp.zeros(table_vd.shape, jnp.float32).at[ids_n].add(
      rows_nd, indices_are_sorted=sort, mode="drop")
  return grad_vd.astype(table_vd.dtype), None


_embed_take_scatter32.defvjp(_embed_scatter32_fwd, _embed_scatter32_bwd)


def embed_take_f32_grad(table_vd, ids, dtype):
  """:func:`embed_take` whose table gradient is scattered into float32 (``ModelConfig``'s
  default). The same values; the gradient summed in float32, not in the compute dtype: at
  the 0.6b step's shape on the H200 (542K document tokens of the kv task, 635 distinct)
  JAX's bf16 scatter-add took 521 ms and its worst entry was off by 49 % of the largest,
  this one 1.8 ms and float32-exact (``benchmarks/embed_grad.py``, BENCHMARKS.md)."""
  return _embed_take_scatter32(table_vd, ids, dtype, False)


def embed_take_sorted_grad(table_vd, ids, dtype):
  """:func:`embed_take_f32_grad` with the ids sorted (and the cotangent rows permuted to
  match) before the float32 scatter-add, promised sorted to XLA: 1.1 ms against 1.8 in the
  same H200 measurement (the sort and the permutation included)."""
  return _embed_take_scatter32(table_vd, ids, dtype, True)


EMBED_GRADS = {"autodiff": embed_take, "f32_scatter": embed_take_f32_grad,
               "sorted": embed_take_sorted_grad}


class Embed(nn.Embed):
  """``flax.linen.Embed`` (same parameter, same ``attend``) whose lookup's gradient is
  computed by ``grad`` (``EMBED_GRADS``; the same values)."""

  grad: str = "autodiff"

  def __call__(self, inputs):
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"Embed takes integer token ids, got {inputs.dtype}")
    return EMBED_GRADS[self.grad](self.embedding, inputs, self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm in float32 with a learned scale; output in ``dtype``. ``vjp``: how its
  gradient is computed (``RMS_NORM_VJPS``; the same values). Qwen3's q/k norms also take
  RoPE's positions (see ``__call__``)."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "norm"
  vjp: str = "autodiff"
  rope_vjp: str = "autodiff"
  heads_axis: str = "heads"   # the logical axis of x's heads (k's: "kv_heads")

  @nn.compact
  def __call__(self, x, rope_positions=None, rope_theta: float = 0.0):
    """The norm of ``x``; given ``rope_positions`` (``[B, T]``, ``x`` being ``[B, T, H,
    D]``, or their :class:`RopeTables`), then RoPE (:func:`norm_rope`), differentiated as
    ``rope_vjp`` says (``NORM_ROPE_VJPS``: "autodiff", "fused"
    (:func:`norm_rope_fused_vjp`), "fused_bf16" (:func:`norm_rope_fused_bf16_vjp`) or
    "pallas" (:func:`norm_rope_pallas_vjp`))."""
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    if rope_positions is None:
      return RMS_NORM_VJPS[self.vjp](x, scale, self.eps, self.dtype)
    if not rope_theta > 0:
      raise ValueError(f"RMSNorm given RoPE positions needs rope_theta > 0 (the model's "
                       f"rope_theta), got {rope_theta!r}")
    if self.rope_vjp == "pallas":
      return norm_rope_pallas_vjp(x, scale, rope_positions, self.eps, rope_theta, self.dtype,
                                  heads_axis=self.heads_axis)
    if self.rope_vjp in _NORM_ROPE_CUSTOM:
      return _NORM_ROPE_CUSTOM[self.rope_vjp](x, scale, rope_positions, self.eps, rope_theta,
                                              self.dtype)
    return norm_rope(x, scale, rope_positions, self.eps, rope_theta, self.dtype, self.vjp)


# RoPE angles past 4,096 positions: position × ω in float32 (as transformers computes it)
# is off by up to half an ulp of the product, 0.25 rad at 16.8M and 3 rad at 99.9M positions
# (benchmarks/rope_precision.py), which global-RoPE banks of that size reach. The position is
# split as (a·2¹⁰ + b)·2¹² + c (exact for any int32), and the angle is c·ω plus the high
# digits' a·(2²²ω mod 2π) and b·(2¹²ω mod 2π), each reduced mod 2π in float32 from
# float64 constants: within ~5e-4 rad of the float64 angle at any position, and equal to
# the plain float32 product c·ω (bit for bit) below position 4,096.
_ROPE_LOW_BITS = 12
_ROPE_MID_BITS = 10


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """The rotation frequencies ``ω_i = θ^(-2i/D)``, ``[D/2]`` float32 (float64, rounded)."""
  return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(
      np.float32)


def rope_angles(positions, head_dim: int, theta: float):
  """RoPE angles ``[..., D/2]`` float32 for integer positions, ``position × ω`` reduced
  exactly enough for any int32 position (see the comment above)."""
  inv_freq = rope_inv_freq(head_dim, theta)
  two_pi = 2.0 * np.pi
  w64 = inv_freq.astype(np.float64)
  step_mid = np.float32(np.mod(w64 * 2.0 ** _ROPE_LOW_BITS, two_pi))
  step_high = np.float32(np.mod(w64 * 2.0 ** (_ROPE_LOW_BITS + _ROPE_MID_BITS), two_pi))
  pos = jnp.asarray(positions).astype(jnp.int32)[..., None]
  low = jnp.bitwise_and(pos, (1 << _ROPE_LOW_BITS) - 1).astype(jnp.float32)
  high = jnp.right_shift(pos, _ROPE_LOW_BITS)
  mid = jnp.bitwise_and(high, (1 << _ROPE_MID_BITS) - 1).astype(jnp.float32)
  top = jnp.right_shift(high, _ROPE_MID_BITS).astype(jnp.float32)
  shape = (1,) * (pos.ndim - 1) + (-1,)
  wrapped = (jnp.fmod(mid * step_mid.reshape(shape), np.float32(two_pi))
             + jnp.fmod(top * step_high.reshape(shape), np.float32(two_pi)))
  return low * inv_freq.reshape(shape) + wrapped


class RopeTables(NamedTuple):
  """RoPE's ``cos``/``sin`` of a stream's positions, ``[..., D/2]`` float32 each: computed
  once (:func:`rope_tables`) and read by every layer's q/k paths in place of positions."""
  cos: jax.Array
  sin: jax.Array


def rope_tables(positions, head_dim: int, theta: float) -> RopeTables:
  """:class:`RopeTables` for integer ``positions`` (half as wide as the rotate-half layout's
  ``[..., D]`` tables, whose two halves are equal). Constants of the positions, so no
  gradient passes through them."""
  angles = rope_angles(positions, head_dim, theta)
  return RopeTables(jax.lax.stop_gradient(jnp.cos(angles)),
                    jax.lax.stop_gradient(jnp.sin(angles)))


def _cos_sin(rope, head_dim: int, theta: float):
  """cos/sin ``[..., D]`` (rotate-half layout) of ``rope``: integer positions (computed
  here) or :class:`RopeTables` (read)."""
  t = rope if isinstance(rope, RopeTables) else rope_tables(rope, head_dim, theta)
  return (jnp.concatenate([t.cos, t.cos], axis=-1), jnp.concatenate([t.sin, t.sin], axis=-1))


def _rotate(x_bthd32, rope, theta: float):
  """``x·cos + rot(x)·sin`` (``rot(x) = [-x₂, x₁]``, the rotate-half halves) of a float32
  ``[B, T, H, D]`` array, cos/sin from ``rope`` (:func:`_cos_sin`) broadcast over heads."""
  d = x_bthd32.shape[-1]
  cos, sin = _cos_sin(rope, d, theta)
  rotated = jnp.concatenate([-x_bthd32[..., d // 2:], x_bthd32[..., :d // 2]], axis=-1)
  return x_bthd32 * cos[..., None, :] + rotated * sin[..., None, :]


def apply_rope(x_bthd, positions_bt, theta: float):
  """Rotary embedding with the rotate-half convention, computed in float32;
  ``positions_bt`` is ``[B, T]`` integer positions or their :class:`RopeTables`."""
  return _rotate(x_bthd.astype(jnp.float32), positions_bt, theta).astype(x_bthd.dtype)


def norm_rope(x_bthd, scale_d, positions_bt, eps: float, theta: float, dtype,
              norm_vjp: str = "autodiff"):
  """Qwen3's q/k path: :func:`apply_rope` of the per-head RMSNorm (in ``dtype``), both
  differentiated as written (the norm by ``norm_vjp``, ``RMS_NORM_VJPS``)."""
  return apply_rope(RMS_NORM_VJPS[norm_vjp](x_bthd, scale_d, eps, dtype), positions_bt, theta)


def norm_rope_one_pass(x_bthd, scale_d, positions_bt, eps: float, theta: float, dtype):
  """:func:`norm_rope`'s value written so that one pass over ``x`` can produce it: RoPE
  rotates ``x·w`` (an elementwise function of ``x``, read at two places of each row) and
  the row's ``r = rsqrt(mean(x²) + eps)`` multiplies afterwards, since rotating commutes
  with a per-row scale: ``y = r·(x·w·cos + rot(x·w)·sin)``. :func:`norm_rope` rotates the
  normalised row itself, which XLA's fusions cannot read at two places without writing it
  out (on the H200 in the 0.6b step: an ``f32[5216, 104, 16, 128]`` array a layer, then
  read back to rotate; ~3.3 ms a layer for q where its bytes take ~0.35). In float32 the
  same up to rounding; in bf16 the normalised row is not rounded to bf16 before RoPE
  (neither is it in XLA's GPU programs of :func:`norm_rope`, which skip that rounding)."""
  x32 = x_bthd.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  xw = x32 * _last_axis(scale_d, x_bthd.ndim)
  return (_rotate(xw, positions_bt, theta) * r).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _norm_rope_custom(x_bthd, scale_d, positions_bt, eps: float, theta: float, dtype,
                      round_dn: bool):
  return norm_rope_one_pass(x_bthd, scale_d, positions_bt, eps, theta, dtype)


def _norm_rope_custom_fwd(x_bthd, scale_d, positions_bt, eps, theta, dtype, round_dn):
  return (norm_rope_one_pass(x_bthd, scale_d, positions_bt, eps, theta, dtype),
          (x_bthd, scale_d, positions_bt))


def _norm_rope_custom_bwd(eps, theta, dtype, round_dn, res, g_bthd):
  x_bthd, scale_d, positions_bt = res
  d = x_bthd.shape[-1]
  cos, sin = _cos_sin(positions_bt, d, theta)
  cos, sin = cos[..., None, :], sin[..., None, :]
  g32 = g_bthd.astype(jnp.float32)
  u = g32 * sin
  half = d // 2
  dn = g32 * cos + jnp.concatenate([u[..., half:], -u[..., :half]], axis=-1)
  if round_dn:   # written once in dtype; the barrier keeps XLA from undoing the rounding
    dn = jax.lax.optimization_barrier(dn.astype(dtype)).astype(jnp.float32)
  x32 = x_bthd.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  dnw = dn * _last_axis(scale_d, x_bthd.ndim)
  dx = r * dnw - x32 * (r * r * r) * jnp.mean(dnw * x32, axis=-1, keepdims=True)
  dscale = jnp.sum((dn * x32 * r).reshape(-1, d), axis=0)
  return dx.astype(x_bthd.dtype), dscale.astype(scale_d.dtype), None


_norm_rope_custom.defvjp(_norm_rope_custom_fwd, _norm_rope_custom_bwd)


def norm_rope_fused_vjp(x_bthd, scale_d, positions_bt, eps: float, theta: float, dtype):
  """:func:`norm_rope` in one pass (:func:`norm_rope_one_pass`) with one hand-written
  backward for both: RoPE's transpose and the norm's backward in float32 from the bf16
  cotangent and the bf16 input, written so that no float32 array of the activations' size
  need pass between them (whether XLA's fusions keep it so is the GPU's to show).

  With ``n = x·r·w`` (``r = rsqrt(mean(x²) + eps)``) and ``y = n·cos + rot(n)·sin``
  (``rot(n) = [-n₂, n₁]``, the rotate-half halves):

      dn = g·cos + [u₂, −u₁]  (u = g·sin),   dx = r·(dn·w) − x·r³·mean(dn·w·x),
      dw = Σ_rows dn·x·r

  JAX's own backward of the two (on the H200 in the 0.6b step, 2026-12-05) passes the
  cotangent from RoPE's float32 transpose to the norm's reductions as a float32 array of
  q's size (``f32[5216, 104, 16, 128]``): the q/k norms' backward took 271 ms of the
  4,189 ms step, and their converts more. Here ``dn`` is elementwise in ``g`` and the
  cos/sin tables (recomputed from the integer positions), so XLA may fuse it into each
  pass that reads it. The gradients differ from JAX's only in that ``dn`` is not rounded
  to ``dtype`` between the two: closer to float32's (the scale's exactly so;
  ``tests/test_reference_pieces.py``, ``benchmarks/norm_rope.py``). Selected by
  ``ModelConfig.qk_norm_rope_vjp="fused"``.
  """
  return _norm_rope_custom(x_bthd, scale_d, positions_bt, eps, theta, dtype, False)


def norm_rope_fused_bf16_vjp(x_bthd, scale_d, positions_bt, eps: float, theta: float, dtype):
  """:func:`norm_rope_fused_vjp` with ``dn`` rounded to ``dtype`` and written once behind an
  optimization barrier (so XLA keeps both the rounding and the array): should XLA write
  the float32 ``dn`` out for the backward's three passes to read (as it wrote JAX's own
  backward's on the H200), this writes and reads a bf16 one instead. The gradients are JAX's
  own backward's as written (its cast of RoPE's cotangent to ``dtype`` included), which
  XLA's excess precision otherwise skips. Selected by
  ``ModelConfig.qk_norm_rope_vjp="fused_bf16"`` (the 0.6b recipe's): the 0.6b step at batch
  16 on an H100 2,085.6 ms against "fused"'s 2,131.5, same memory (2026-12-06,
  BENCHMARKS.md); one layer's q path alone 7.14 ms against 9.39 at batch 32's shape."""
  return _norm_rope_custom(x_bthd, scale_d, positions_bt, eps, theta, dtype, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _norm_rope_kernels(x_bthd, scale_d, rope, eps: float, theta: float, dtype, interpret):
  return _norm_rope_kernels_fwd(x_bthd, scale_d, rope, eps, theta, dtype, interpret)[0]


def _norm_rope_kernels_fwd(x_bthd, scale_d, rope, eps, theta, dtype, interpret):
  from pallas_kernels import norm_rope as kernels
  t = rope if isinstance(rope, RopeTables) else rope_tables(rope, x_bthd.shape[-1], theta)
  # one head a pipeline step: two heads under one cos/sin box ran 15 % slower on an H100
  # (4.92 against 4.28 ms, benchmarks/norm_rope.py, 2026-12-06)
  y = kernels.forward(x_bthd, scale_d, t.cos, t.sin, eps, interpret=interpret)
  return y, (x_bthd, scale_d, t)


def _norm_rope_kernels_bwd(eps, theta, dtype, interpret, res, g_bthd):
  from pallas_kernels import norm_rope as kernels
  x_bthd, scale_d, t = res
  dx, dscale = kernels.backward(x_bthd, g_bthd.astype(x_bthd.dtype), scale_d, t.cos, t.sin,
                                eps, True, interpret=interpret)
  return dx, dscale.astype(scale_d.dtype), None


_norm_rope_kernels.defvjp(_norm_rope_kernels_fwd, _norm_rope_kernels_bwd)


def norm_rope_pallas_vjp(x_bthd, scale_d, positions_bt, eps: float, theta: float, dtype,
                         interpret: bool | None = None, heads_axis: str = "heads"):
  """:func:`norm_rope_fused_bf16_vjp`'s values and gradients with its forward and backward
  as the Mosaic GPU kernels of ``pallas_kernels.norm_rope`` (each pass reads its operands
  once; RoPE's cos/sin as tables), where they apply: on a GPU, bf16 in and out, ``D`` a
  multiple of 128; elsewhere :func:`norm_rope_fused_bf16_vjp` itself. ``interpret=True``
  runs the kernels interpreted at any size (the CPU tests). On a GPU, fewer than
  :data:`KERNEL_MIN_TOKENS` tokens (a decoding step, a short question) stay with the XLA
  code, which fuses them into their neighbours where a kernel launch and its padding to 64
  tokens would cost more. Selected by ``ModelConfig.qk_norm_rope_vjp="pallas"``; on a
  multi-device mesh each device runs the kernels on its own rows and heads
  (``kernel_shards.per_shard``; ``heads_axis`` names the heads' logical axis, k's
  "kv_heads"). The 0.6b recipe's: its step at batch 16 on an
  H100 2,030.7 ms against fused_bf16's 2,103.5 (one layer's q path forward + backward 4.4
  against 7.2 ms; 2026-12-06, BENCHMARKS.md)."""
  from pallas_kernels import _platform
  from pallas_kernels import norm_rope as kernels
  # per device on a multi-device mesh: the threshold is about one kernel launch's rows
  tokens = int(np.prod(kernel_shards.local_shape(x_bthd.shape[:-2], ("batch", "length"))))
  on_kernels = ((_platform.on_gpu() and tokens >= KERNEL_MIN_TOKENS) if interpret is None
                else True) and kernels.supported(x_bthd.shape, x_bthd.dtype, dtype)
  if not on_kernels:
    return norm_rope_fused_bf16_vjp(x_bthd, scale_d, positions_bt, eps, theta, dtype)

  def kernels_path(x, scale, rope):
    return _norm_rope_kernels(x, scale, rope, eps, theta, dtype, interpret)
  # each device's rows and heads on a multi-device mesh
  rope_axes = ("batch", "length") + ((None,) if isinstance(positions_bt, RopeTables) else ())
  return kernel_shards.per_shard(kernels_path, (x_bthd, scale_d, positions_bt),
                                 (("batch", "length", heads_axis, "head_dim"), ("head_dim",),
                                  rope_axes))


KERNEL_MIN_TOKENS = 4096   # norm_rope_pallas_vjp's kernels on a GPU from this many tokens


NORM_ROPE_VJPS = ("autodiff", "fused", "fused_bf16", "pallas")
# the XLA custom VJPs; "pallas" (norm_rope_pallas_vjp) also takes the heads' logical axis
_NORM_ROPE_CUSTOM = {"fused": norm_rope_fused_vjp, "fused_bf16": norm_rope_fused_bf16_vjp}


class MLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``.

  (Gate and up as one GEMM against both kernels stacked was 1.3 % slower in the 0.6b step
  on an H100, 2026-12-06: removed, BENCHMARKS.md.)"""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = dense(cfg.intermediate_size, cfg, ("embed", "mlp"), "gate_proj")(x)
    up = dense(cfg.intermediate_size, cfg, ("embed", "mlp"), "up_proj")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return dense(cfg.hidden_size, cfg, ("mlp", "embed"), "down_proj")(h)
