"""Qwen3's q/k path, per-head RMSNorm then RoPE, forward and backward as Mosaic GPU kernels.

The XLA forms (``msa_jax.layers.norm_rope_one_pass`` and the hand-written backward of
``layers.norm_rope_fused_bf16_vjp``) take ~2.4 x their bytes in the 0.6b step (one layer's
q path forward + backward 7.14 ms against a 2.92 ms floor on an H100, 2026-12-06,
``benchmarks/norm_rope.py``): the backward needs each row's ``mean(dn·w·x)`` before its
elementwise pass and the scale's column sums after it, and XLA reads ``x`` and the
cotangent once for each. Here a row stays in registers between its reduction and its
elementwise work, and the scale's column sums accumulate in registers over a program's
tiles, so each pass reads its operands once:

* :func:`forward`: ``y = r·(a·cos − b·sin, b·cos + a·sin)`` with ``(a, b) = x·w`` split
  into the rotate-half halves and ``r = rsqrt(mean(x²) + eps)`` (``norm_rope_one_pass``);
* :func:`backward`: ``dn = (g₀·cos + g₁·sin, g₁·cos − g₀·sin)`` (RoPE's transpose; rounded
  to bf16 with ``round_dn``, as ``fused_bf16``), ``dx = r·dn·w − x·r³·mean(dn·w·x)``,
  ``dw = Σ_rows dn·x·r`` (per program, summed by XLA).

A tile is 64 tokens of one head, its two halves ``[64, D/2]`` loaded as separate TMA boxes
of the ``[N, H, 2, D/2]`` view (the rotate-half pairs then sit at the same place of the
two register tiles); RoPE's cos/sin come as ``[N, D/2]`` float32 tables
(``layers.rope_tables``), one box per pipeline step, which holds ``heads_per_step`` heads
of a token block (a token block's steps run in a row, so the tables' re-reads hit L2).
One head a step is the callers' choice: two under one box ran 15 % slower on an H100
(forward + backward 4.92 against 4.25 ms at the 0.6b step's q, 1.45 x four reads of
x's bytes; a third pipeline stage 4.23 ms; ``benchmarks/norm_rope.py``, 2026-12-06).
One program per SM streams its run of steps through a TMA pipeline. bf16 activations,
``D/2`` a multiple of 64; token counts that are not a multiple of 64 are padded (a copy)
by the callers here.

Each function takes ``interpret``: None compiles on a GPU and interprets elsewhere (the
CPU tests); the XLA forms in ``msa_jax.layers`` are the reference
(``tests/test_kernel_norm_rope.py``).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _platform
from pallas_kernels.block_top_k import num_blocks_for

ROWS = 64          # tokens per tile (a WGMMA-layout register tile's rows)


def supported(x_shape, dtype, out_dtype) -> bool:
  """True when the kernels take ``x`` of ``x_shape`` (``[..., H, D]``): bf16 in and out,
  ``D/2`` a multiple of 64."""
  d = x_shape[-1]
  return (jnp.dtype(dtype) == jnp.bfloat16 and jnp.dtype(out_dtype) == jnp.bfloat16
          and d % 128 == 0 and len(x_shape) >= 2)


class _Items:
  """A program's run of steps: step ``k`` is token block ``k // (H/group)`` and its heads
  ``group·(k % (H/group)) ...`` (``group`` heads a step sharing one cos/sin box; a token
  block's steps in a row, so consecutive boxes hit L2); the last program may repeat the
  final step (``valid`` is then 0)."""

  def __init__(self, block, per_program: int, n_items: int, heads: int, group: int):
    self.block, self.per, self.n = block, per_program, n_items
    self.groups, self.group = heads // group, group

  def raw(self, t):
    return self.block * self.per + t

  def coords(self, t):
    """``(token block, first head)`` of step ``t``."""
    k = jnp.minimum(self.raw(t), self.n - 1)
    return lax.div(k, self.groups), lax.rem(k, self.groups) * self.group

  def valid(self, t):
    return (self.raw(t) < self.n).astype(jnp.float32)

  def half(self, e: int, j: int):
    """Index map of half ``j`` of the step's head ``e``."""
    def index(t):
      i, h0 = self.coords(t)
      return i, h0 + e, j, 0
    return index

  def table(self, t):
    i, _ = self.coords(t)
    return i, 0


class _Regs:
  """Register layouts and loads of the kernels' ``[64, D/2]`` tiles (WGMMA layout) and their
  row / column vectors; plain arrays when interpreted."""

  def __init__(self, compiled: bool):
    self.compiled = compiled
    mgpu = _platform.plgpu() if compiled else None
    self.tile = mgpu.Layout.WGMMA if compiled else None
    self.col = mgpu.Layout.WGMMA.reduce(0) if compiled else None

  def load(self, ref, layout):
    if self.compiled:
      return _platform.plgpu().load(ref, (), layout=layout)
    return ref[...]

  def tile_f32(self, ref):
    return self.load(ref, self.tile).astype(jnp.float32)

  def cols(self, ref, half: int):
    """A ``[D/2]`` SMEM vector broadcast over a tile's rows."""
    return lax.broadcast_in_dim(self.load(ref, self.col), (ROWS, half), [1])

  def zeros_col(self, half: int):
    return _platform.layout_cast(jnp.zeros((half,), jnp.float32), self.col, self.compiled)


def _rows(v, half: int):
  return lax.broadcast_in_dim(v, (ROWS, half), [0])


def _rsqrt_mean_square(x0, x1, d: int, eps: float):
  return lax.rsqrt((jnp.sum(x0 * x0, axis=1) + jnp.sum(x1 * x1, axis=1)) * (1.0 / d) + eps)


def _plan(n: int, h: int, d: int, group: int, blocks: int, interpret: bool):
  """``(D/2, register layouts, steps, programs, steps a program, the output tiles' SMEM
  transforms)`` of a kernel over ``n`` tokens of ``h`` heads, ``group`` heads a step."""
  if h % group:
    raise ValueError(f"heads_per_step={group} must divide the {h} heads")
  half = d // 2
  compiled = not interpret
  n_items = (n // ROWS) * (h // group)
  num_programs, per_program = num_blocks_for(n_items, blocks)
  tr = _platform.swizzle_transforms(half) if compiled else ()
  return half, _Regs(compiled), n_items, num_programs, per_program, tr


def _stream(body, per_program: int, in_specs, stages: int, operands, init_carry=None):
  """Streams a program's ``per_program`` tiles through ``body`` (a TMA pipeline
  ``stages`` deep)."""
  plgpu = _platform.plgpu()
  return plgpu.emit_pipeline(body, grid=(per_program,), in_specs=in_specs,
                             max_concurrent_steps=min(stages, per_program),
                             init_carry=init_carry)(*operands)


def _launch(kernel, out_type, num_programs: int, interpret: bool):
  plgpu = _platform.plgpu()
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(num_programs,), grid_names=("block",),
      compiler_params=None if interpret else _platform.lane_params(),
      interpret=_platform.mosaic_interpret_params(True) if interpret else None)


def _specs(items: _Items, half: int, arrays: int, tr):
  """BlockSpecs: each of ``arrays`` arrays' two halves for each of the step's heads (array,
  head, half order; bf16 tiles with ``_plan``'s transforms ``tr``), then cos, sin, then the
  scale's two halves."""
  plgpu = _platform.plgpu()
  tr32 = _platform.swizzle_transforms(half, 4) if tr else ()
  halves = [plgpu.BlockSpec((ROWS, None, None, half), items.half(e, j), transforms=tr)
            for _ in range(arrays) for e in range(items.group) for j in (0, 1)]
  tables = [plgpu.BlockSpec((ROWS, half), items.table, transforms=tr32)] * 2
  scale = [plgpu.BlockSpec((None, half), lambda t, j=j: (j, 0)) for j in (0, 1)]
  return halves + tables + scale


def smem_bytes(d: int, stages: int, with_cotangent: bool, heads_per_step: int = 1) -> int:
  """Shared memory of a kernel: ``stages`` steps' x (and g) halves of ``heads_per_step``
  heads, cos/sin and scale halves in flight, and the two output tiles."""
  half = d // 2
  per_stage = ((2 if with_cotangent else 1) * heads_per_step * ROWS * d * 2
               + 2 * ROWS * half * 4 + d * 4)
  return stages * per_stage + ROWS * d * 2 + d * 4


def _store_halves(out_smem, out_ref, v0, v1, i, hh):
  """Writes a tile's two bf16 halves through ``out_smem`` (``[2, 64, D/2]``) once the
  previous tile's copies have read it."""
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  out_smem[0] = v0.astype(out_smem.dtype)
  out_smem[1] = v1.astype(out_smem.dtype)
  plgpu.commit_smem()
  for j in (0, 1):
    plgpu.copy_smem_to_gmem(out_smem.at[j], out_ref.at[pl.ds(i * ROWS, ROWS), hh, j])


@functools.lru_cache(maxsize=None)
def forward_call(n: int, h: int, d: int, eps: float, stages: int = 2, blocks: int = 0,
                 interpret: bool = False, heads_per_step: int = 1):
  """``plgpu.kernel``: ``(x4, cos, sin, w2) -> y4``: ``x4``/``y4`` bf16 ``[N, H, 2, D/2]``
  (``N`` a multiple of 64), cos/sin float32 ``[N, D/2]``, ``w2`` the float32 scale as
  ``[2, D/2]``; ``heads_per_step`` heads of a token block a pipeline step (one cos/sin
  box for them)."""
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  hs = heads_per_step
  half, regs, n_items, num_programs, per_program, tr = _plan(n, h, d, hs, blocks, interpret)

  def kernel(*refs):
    *ins, y_ref = refs
    items = _Items(lax.axis_index("block"), per_program, n_items, h, hs)

    def scoped(out_smem):
      def step(idx, *smem):
        (t,) = idx
        xs, (cos_s, sin_s, w0_s, w1_s) = smem[:2 * hs], smem[2 * hs:]
        i, h0 = items.coords(t)
        for e in range(hs):
          # (loads where their values are first needed: fewer [64, D/2] tiles live at once)
          x0, x1 = regs.tile_f32(xs[2 * e]), regs.tile_f32(xs[2 * e + 1])
          r = _rows(_rsqrt_mean_square(x0, x1, d, eps), half)
          a, b = x0 * regs.cols(w0_s, half), x1 * regs.cols(w1_s, half)
          cos, sin = regs.tile_f32(cos_s), regs.tile_f32(sin_s)
          _store_halves(out_smem, y_ref, (a * cos - b * sin) * r, (b * cos + a * sin) * r,
                        i, h0 + e)

      _stream(step, per_program, _specs(items, half, 1, tr), stages, ins)
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(scoped, plgpu.SMEM((2, ROWS, half), jnp.bfloat16, transforms=tr))

  def entry(x4, cos, sin, w2):
    out_type = jax.ShapeDtypeStruct((n, h, 2, half), jnp.bfloat16)
    return _launch(kernel, out_type, num_programs, interpret)(
        *[x4] * (2 * hs), cos, sin, w2, w2)
  return entry


@functools.lru_cache(maxsize=None)
def backward_call(n: int, h: int, d: int, eps: float, round_dn: bool, stages: int = 2,
                  blocks: int = 0, interpret: bool = False, heads_per_step: int = 1):
  """``plgpu.kernel``: ``(x4, g4, cos, sin, w2) -> (dx4, dw_parts [programs, 2, D/2])``;
  operands as in :func:`forward_call`, ``g4`` the bf16 cotangent of ``y4``."""
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  hs = heads_per_step
  half, regs, n_items, num_programs, per_program, tr = _plan(n, h, d, hs, blocks, interpret)

  def kernel(*refs):
    *ins, dx_ref, dw_ref = refs
    blk = lax.axis_index("block")
    items = _Items(blk, per_program, n_items, h, hs)

    def scoped(out_smem, dw_smem):
      def step(idx, *smem_and_carry):
        (t,) = idx
        *smem, (dw0, dw1) = smem_and_carry
        xs, gs = smem[:2 * hs], smem[2 * hs:4 * hs]
        cos_s, sin_s, w0_s, w1_s = smem[4 * hs:]
        i, h0 = items.coords(t)
        keep = items.valid(t)           # a repeated final step adds nothing to dw
        for e in range(hs):
          # RoPE's transpose first (g, cos and sin then die), x after: fewer live tiles
          g0, g1 = regs.tile_f32(gs[2 * e]), regs.tile_f32(gs[2 * e + 1])
          cos, sin = regs.tile_f32(cos_s), regs.tile_f32(sin_s)
          dn0, dn1 = g0 * cos + g1 * sin, g1 * cos - g0 * sin
          if round_dn:
            dn0 = dn0.astype(jnp.bfloat16).astype(jnp.float32)
            dn1 = dn1.astype(jnp.bfloat16).astype(jnp.float32)
          x0, x1 = regs.tile_f32(xs[2 * e]), regs.tile_f32(xs[2 * e + 1])
          r_row = _rsqrt_mean_square(x0, x1, d, eps)
          r = _rows(r_row, half)
          w0, w1 = regs.cols(w0_s, half), regs.cols(w1_s, half)
          dnw0, dnw1 = dn0 * w0, dn1 * w1
          m = (jnp.sum(dnw0 * x0, axis=1) + jnp.sum(dnw1 * x1, axis=1)) * (1.0 / d)
          c = _rows(r_row * r_row * r_row * m, half)
          _store_halves(out_smem, dx_ref, r * dnw0 - x0 * c, r * dnw1 - x1 * c, i, h0 + e)
          dw0 = dw0 + jnp.sum(dn0 * x0 * r, axis=0) * keep
          dw1 = dw1 + jnp.sum(dn1 * x1 * r, axis=0) * keep
        return dw0, dw1

      dw0, dw1 = _stream(step, per_program, _specs(items, half, 2, tr), stages,
                         ins, init_carry=(regs.zeros_col(half), regs.zeros_col(half)))
      dw_smem[0] = dw0
      dw_smem[1] = dw1
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dw_smem, dw_ref.at[blk])
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(scoped, plgpu.SMEM((2, ROWS, half), jnp.bfloat16, transforms=tr),
                  plgpu.SMEM((2, half), jnp.float32))

  def entry(x4, g4, cos, sin, w2):
    out_type = (jax.ShapeDtypeStruct((n, h, 2, half), jnp.bfloat16),
                jax.ShapeDtypeStruct((num_programs, 2, half), jnp.float32))
    return _launch(kernel, out_type, num_programs, interpret)(
        *[x4] * (2 * hs), *[g4] * (2 * hs), cos, sin, w2, w2)
  return entry


def _flat(x_thd):
  """``[..., H, D]`` → ``[N, H, 2, D/2]`` with ``N`` padded up to a multiple of 64 (zeros)."""
  *lead, h, d = x_thd.shape
  n = math.prod(lead)
  x = x_thd.reshape(n, h, 2, d // 2)
  pad = -n % ROWS
  return (jnp.pad(x, ((0, pad), (0, 0), (0, 0), (0, 0))) if pad else x), n


def _flat_tables(t_bh, n_padded: int):
  half = t_bh.shape[-1]
  t = t_bh.reshape(-1, half).astype(jnp.float32)
  pad = n_padded - t.shape[0]
  return jnp.pad(t, ((0, pad), (0, 0))) if pad else t


def _operands(x_bthd, other_dtype, scale_d, cos_bth, sin_bth):
  """Checks ``x`` (and the cotangent's or output's ``other_dtype``) and lays out a kernel's
  operands: ``(x4, tokens, heads, D, cos, sin, w2)``."""
  if not supported(x_bthd.shape, x_bthd.dtype, other_dtype):
    raise ValueError(f"norm_rope kernels take bf16 [..., H, D] with D % 128 == 0, got x "
                     f"{x_bthd.dtype} {x_bthd.shape} and {jnp.dtype(other_dtype)}: use "
                     f"layers.norm_rope_one_pass and its XLA backward")
  x4, n = _flat(x_bthd)
  h, d = x_bthd.shape[-2:]
  cos, sin = (_flat_tables(t, x4.shape[0]) for t in (cos_bth, sin_bth))
  return x4, n, h, d, cos, sin, scale_d.astype(jnp.float32).reshape(2, d // 2)


def forward(x_bthd, scale_d, cos_bth, sin_bth, eps: float, *, stages: int = 2,
            blocks: int = 0, heads_per_step: int = 1, interpret: bool | None = None):
  """``norm_rope_one_pass(x, scale)`` (bf16 ``[..., H, D]``) from RoPE's cos/sin tables
  ``[..., D/2]`` (``layers.rope_tables``), through :func:`forward_call`."""
  x4, n, h, d, cos, sin, w2 = _operands(x_bthd, jnp.bfloat16, scale_d, cos_bth, sin_bth)
  call = forward_call(x4.shape[0], h, d, float(eps), stages, blocks,
                      _platform.interpreting(interpret), heads_per_step)
  return call(x4, cos, sin, w2)[:n].reshape(x_bthd.shape)


def backward(x_bthd, g_bthd, scale_d, cos_bth, sin_bth, eps: float, round_dn: bool, *,
             stages: int = 2, blocks: int = 0, heads_per_step: int = 1,
             interpret: bool | None = None):
  """``(dx [..., H, D] bf16, dscale [D] float32)`` of :func:`forward` for the cotangent
  ``g`` (``layers.norm_rope_fused_vjp``'s backward; ``round_dn``: ``fused_bf16``'s),
  through :func:`backward_call`."""
  x4, n, h, d, cos, sin, w2 = _operands(x_bthd, g_bthd.dtype, scale_d, cos_bth, sin_bth)
  g4, _ = _flat(g_bthd)
  call = backward_call(x4.shape[0], h, d, float(eps), bool(round_dn), stages, blocks,
                       _platform.interpreting(interpret), heads_per_step)
  dx4, dw_parts = call(x4, g4, cos, sin, w2)
  return dx4[:n].reshape(x_bthd.shape), dw_parts.sum(axis=0).reshape(d)
