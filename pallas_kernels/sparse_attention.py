"""Sparse memory attention: queries attend ``[context ; causal self]`` with GQA.

Same semantics and signature as ``msa_jax.attention.attend``: context slots (prefix
K/V, then the gathered pooled chunks of the selected documents) are visible to every
query where ``ctx_mask`` is set; own tokens are visible causally where
``self_mask`` is set; a query with no visible key returns zeros.

The Pallas path is a Mosaic GPU flash-attention forward (online softmax in float32,
bf16 tensor-core matmuls): here one program per (example, query head, block of
``block_q`` queries) whose TMA pipeline streams the context K/V tiles, then the own
K/V tiles up to the diagonal; compiled, the default is the warp-specialised variant
(``sparse_attention_fwd_ws``: two query blocks per program sharing one K/V stream).
Masks enter as additive column biases (0 or -1e30), so any mask pattern works; a
row's output is later zeroed where it saw no key.
The forward also writes each row's log-sum-exp; the backward
(``sparse_attention_bwd``: a dQ kernel and a dK/dV kernel, ``jax.custom_vjp``)
recomputes the probabilities from it tile by tile, so training never materialises
the ``[M, S + M]`` logits.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from msa_jax import attention as ref_attention
from pallas_kernels import _attention_tiles as tiles
from pallas_kernels import _platform
from pallas_kernels import sparse_attention_bwd as bwd
from pallas_kernels import sparse_attention_fwd_ws as fwd_ws
from pallas_kernels import sparse_attention_short as short
from pallas_kernels import sparse_attention_short_bwd as short_bwd

MASKED = tiles.MASKED
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the kernels (``None``: the measured best, see ``resolved``).

  block_q: query rows per forward program, or per compute warpgroup (multiple of 64).
  block_kv: key rows per forward pipeline step (multiple of 64, divides block_q or is
    a multiple of it); None: 128 with the warp-specialised forward, else 64.
  stages: forward TMA pipeline depth.
  p_in_registers: feed softmax probabilities to the PV matmul from registers
    (else through shared memory; single-warpgroup forward, GPU only).
  bwd_block_q, bwd_block_kv, bwd_stages: the same for both backward kernels (dQ
    tiles queries by ``bwd_block_q``; dK/dV keys by ``bwd_block_kv``).
  warp_specialized: forward through ``sparse_attention_fwd_ws`` (a memory
    warpgroup and two compute warpgroups, each of ``block_q`` rows) when there is
    more than one query block; None: when compiled (interpreted, the
    single-warpgroup kernel is much faster to run on a CPU).
  pad_free: the kernels zero the rows that see no key themselves (output 0, and a
    log-sum-exp of ``-MASKED`` so the backward gives them no probability), so no select
    surrounds them; and, compiled, own tokens stay at their ``M`` rows: the kernels'
    TMA copies zero-fill the rows past ``M`` on loads and drop them on stores, so q, k,
    v and dO are neither padded to whole tiles nor sliced back (on the H200 the 0.6b
    step spent ~7.7 % of its time padding 104-token documents to 128 rows, and ~1.9 %
    in the select; BENCHMARKS.md), only to a multiple of 8 rows (TMA's row tiling) where
    ``M`` is not one. Interpreted, the operands are still padded (the interpreter clamps
    out-of-range slices). On the H200 (2026-12-05) the compiled tests passed at 104 rows and
    failed at 70 and 300 (the 8-row rule, added after); the 0.6b step went from 4,543 to
    4,265 ms with it.
  short_persistent: where there is no context and the own tokens fit one 128-row tile
    (``sparse_attention_short.applies``: the documents), the forward runs as
    ``sparse_attention_short``'s persistent kernel (one program an SM streaming its
    (example, head, 64-query) items through one TMA pipeline) instead of one program per
    item. On an H100 (2026-12-05) at the 0.6b step's documents: 2.74 ms against 3.68 for the
    warp-specialised forward (``benchmarks/doc_attention.py``, BENCHMARKS.md); off by
    default here, on in the 0.6b and 4b recipes (``ModelConfig.attention_short_persistent``).
  short_persistent_bwd: the same for the backward: where ``short_persistent`` would apply,
    dQ and dK/dV run as ``sparse_attention_short_bwd``'s persistent kernels (one program
    an SM streaming (example, head, query block) and (example, kv head, key block)
    items) instead of one program per item. On an H100 (2026-12-05) no faster than the
    tiled kernels at the 0.6b step's documents: off by default and in the recipes
    (``ModelConfig.attention_short_persistent_bwd``).
  """

  block_q: int = 64
  block_kv: int | None = None
  stages: int = 2
  p_in_registers: bool = True
  bwd_block_q: int = 64
  bwd_block_kv: int = 64
  bwd_stages: int = 2
  warp_specialized: bool | None = None
  pad_free: bool = False
  short_persistent: bool = False
  short_persistent_bwd: bool = False

  def resolved(self, compiled: bool) -> "BlockSizes":
    """Every ``None`` replaced: the fastest settings measured on an H200 (BENCHMARKS.md)."""
    ws = compiled if self.warp_specialized is None else self.warp_specialized
    kv = (128 if ws else 64) if self.block_kv is None else self.block_kv
    return dataclasses.replace(self, warp_specialized=ws, block_kv=kv)


def attend_reference(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm,
                     k_ctx_bsgd=None, v_ctx_bsgd=None, ctx_mask_bs=None):
  """Reference: ``msa_jax.attention.attend`` (plain XLA)."""
  return ref_attention.attend(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm,
                              k_ctx_bsgd, v_ctx_bsgd, ctx_mask_bs)


def _forward_call(b, m, h, g, d, s, bs: BlockSizes, interpret_params, self_keys: bool = True,
                  rows: int | None = None, zero_unseen: bool = False):
  """``plgpu.kernel`` over padded inputs (m % block_q == 0, s % block_kv == 0).

  Returns ``(out [B, M, H, D] bf16, lse [B, H, M] f32)``; ``lse`` is the log-sum-exp of
  each row's logits in base 2 (``logits·log2(e)/sqrt(D)`` plus mask biases), which the
  backward kernels use to recompute probabilities. ``self_keys=False``: the context only
  (no own-token operands: ``(q, kc, vc, cbias) -> (out, lse)``). ``rows``: the own-token
  arrays' (and ``out``'s) rows when fewer than the ``m`` the grid covers (TMA fills the rest
  with zeros and drops their stores); ``zero_unseen``: :func:`tiles.finish_rows`.
  """
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  bq, bk = bs.block_q, bs.block_kv
  r = h // g
  scale = LOG2E / math.sqrt(d)
  compiled = interpret_params is None
  p_regs = bs.p_in_registers or not compiled
  tile = tiles.Tile(bq, bk, compiled)

  def attention_fwd(q_ref, kc_ref, vc_ref, cbias_ref, *refs):
    ks_ref, vs_ref, sbias_ref, out_ref, lse_ref = (refs if self_keys else
                                                   (None, None, None, *refs))
    bi = lax.axis_index("b")
    hi = lax.axis_index("h")
    qi = lax.axis_index("q")
    gi = lax.div(hi, jnp.array(r, hi.dtype))
    q0 = qi * bq

    def scoped(q_smem, p_smem, lse_smem, q_barrier):
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, bq), hi], q_smem, q_barrier)
      plgpu.barrier_wait(q_barrier)

      def step(causal, k0, k_smem, v_smem, bias_smem, carry):
        acc, m_i, l_i = carry
        qk = _platform.mma(q_smem, k_smem, (bq, bk), transpose_b=True, compiled=compiled)
        logits = tile.logits(qk, scale, bias_smem, causal, q0, k0)
        m_new = jnp.maximum(m_i, logits.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, (bq, bk), [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(jnp.bfloat16)
        if p_regs:
          a_op = p16
        else:
          p_smem[...] = p16
          plgpu.commit_smem()
          a_op = p_smem
        acc = acc * lax.broadcast_in_dim(alpha, (bq, d), [0])
        acc = _platform.mma_accumulate(acc, a_op, v_smem, compiled=compiled)
        return acc, m_new, l_i

      carry = (tile.zeros(d),
               tile.cast(jnp.full((bq,), MASKED, jnp.float32), tile.row_layout),
               tile.cast(jnp.zeros((bq,), jnp.float32), tile.row_layout))
      acc, m_i, l_i = tiles.sweep_keys(
          step, carry, tile=tile, d=d, s=s, m=m, stages=bs.stages, q0=q0,
          ctx_refs=(kc_ref.at[bi, :, gi], vc_ref.at[bi, :, gi], cbias_ref.at[bi]),
          self_refs=None if not self_keys else lambda first, size: (
              ks_ref.at[bi, pl.ds(first, size), gi], vs_ref.at[bi, pl.ds(first, size), gi],
              sbias_ref.at[bi, pl.ds(first, size)]))
      out, lse = tiles.finish_rows(acc, m_i, l_i, d, zero_unseen)
      q_smem[...] = out.astype(jnp.bfloat16)
      lse_smem[...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, out_ref.at[bi, pl.ds(q0, bq), hi])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(q0, bq)])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped,
                  plgpu.SMEM((bq, d), jnp.bfloat16, transforms=_platform.swizzle_transforms(d)),
                  plgpu.SMEM((bq, bk), jnp.bfloat16, transforms=_platform.swizzle_transforms(bk)),
                  plgpu.SMEM((bq,), jnp.float32),
                  plgpu.Barrier(num_barriers=1))

  return plgpu.kernel(
      attention_fwd,   # the name profiles show (attention_fwd_mosaic_gpu_kernel)
      out_type=(jax.ShapeDtypeStruct((b, m if rows is None else rows, h, d), jnp.bfloat16),
                jax.ShapeDtypeStruct((b, h, m), jnp.float32)),
      grid=(b, h, m // bq),
      grid_names=("b", "h", "q"),
      compiler_params=_platform.lane_params(approx_math=True) if compiled else None,
      interpret=interpret_params,
  )


def _pad_axis(x, axis: int, size: int, value=0):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _round_up(n: int, tile: int) -> int:
  return -(-n // tile) * tile


@dataclasses.dataclass(frozen=True)
class _Padded:
  """Kernel operands: bf16, own tokens padded to ``m`` rows (the kernels' grid; pad-free,
  the arrays keep their own ``rows``), context to ``s`` slots (``s == 0``: a never-read
  stand-in of batch 1), masks as additive f32 biases (0 visible, ``MASKED`` not; always
  ``m`` wide)."""
  q: jax.Array
  ks: jax.Array
  vs: jax.Array
  sbias: jax.Array
  kc: jax.Array
  vc: jax.Array
  cbias: jax.Array
  m: int
  s: int

  @property
  def rows(self) -> int:
    """The own-token arrays' rows: ``m``, or fewer where pad-free."""
    return self.q.shape[1]


def _check(q_bmhd, k_self_bmgd, bs: BlockSizes):
  h, d, g = q_bmhd.shape[2], q_bmhd.shape[3], k_self_bmgd.shape[2]
  if h % g:
    raise ValueError(f"{h} query heads are not a multiple of {g} kv heads")
  blocks = (bs.block_q, bs.block_kv, bs.bwd_block_q, bs.bwd_block_kv)
  if d % 64 or any(x % 64 for x in blocks):
    raise ValueError(f"head dim {d} and blocks {bs} must be multiples of 64 "
                     "(use implementation='xla' for other head dims)")
  for a, b in ((bs.block_q, bs.block_kv), (bs.bwd_block_q, bs.bwd_block_kv)):
    if max(a, b) % min(a, b):
      raise ValueError(f"query and key blocks must divide one another: {bs}")


def _use_ws(bs: BlockSizes, m: int) -> bool:
  """The warp-specialised forward, when asked for and there is more than one query
  block (it takes them in pairs: one block would be padded to two)."""
  return bs.warp_specialized and m > bs.block_q


def _bias(mask):
  """A mask as the kernels' additive f32 bias: 0 where visible, ``MASKED`` where not."""
  return jnp.where(mask, 0.0, MASKED).astype(jnp.float32)


# A TMA copy's gmem row axis must be a multiple of its 8-row tiling ("dimension 2 must have
# size smaller or a multiple of its tiling 8, but got 70": test_gpu_pallas_pad_free_compiled
# on the H200, 2026-12-05, M 70 and 300; M 104 passed).
_TMA_ROW_TILE = 8


def _pad_free(bs: BlockSizes, compiled: bool) -> bool:
  """Own tokens left at their rows (``BlockSizes.pad_free``, compiled kernels only)."""
  return bs.pad_free and compiled


def _pad(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm, k_ctx_bsgd, v_ctx_bsgd,
         ctx_mask_bs, bs: BlockSizes, compiled: bool) -> _Padded:
  """Pads every operand to whole tiles of both the forward and the backward kernels
  (pad-free and compiled: the masks only)."""
  b, m, _, d = q_bmhd.shape
  g = k_self_bmgd.shape[2]
  bf = jnp.bfloat16
  q_tile = bs.block_q * (2 if _use_ws(bs, m) else 1)
  m_pad = _round_up(m, math.lcm(q_tile, bs.block_kv, bs.bwd_block_q, bs.bwd_block_kv))
  smask = _pad_axis(self_mask_bm, 1, m_pad, False)
  s = k_ctx_bsgd.shape[1]
  if s:
    s_pad = _round_up(s, math.lcm(bs.block_kv, bs.bwd_block_kv))
    kc = _pad_axis(k_ctx_bsgd.astype(bf), 1, s_pad)
    vc = _pad_axis(v_ctx_bsgd.astype(bf), 1, s_pad)
    cmask = _pad_axis(ctx_mask_bs, 1, s_pad, False)
  else:  # the kernels take a context operand; a zero-length one is never read, so one
    # example's worth stands for all (a [B, ...] one was written whole each call: 24 ms of
    # the 0.6b step on the H200, its 5,216 documents' zeros)
    s_pad = 0
    kc = vc = jnp.zeros((1, max(bs.block_kv, bs.bwd_block_kv), g, d), bf)
    cmask = jnp.zeros((1, kc.shape[1]), bool)
  # pad-free: rows to a multiple of 8 only (TMA tiles the row axis by 8; the 0.6b and 4b
  # recipes' 104-token documents need none), the copies reach past them to whole tiles
  rows = _round_up(m, _TMA_ROW_TILE) if _pad_free(bs, compiled) else m_pad
  return _Padded(q=_pad_axis(q_bmhd.astype(bf), 1, rows),
                 ks=_pad_axis(k_self_bmgd.astype(bf), 1, rows),
                 vs=_pad_axis(v_self_bmgd.astype(bf), 1, rows),
                 sbias=_bias(smask), kc=kc, vc=vc, cbias=_bias(cmask), m=m_pad, s=s_pad)


def _visible(self_mask_bm, ctx_mask_bs):
  """``[B, M]``: the query sees at least one key (else its output is zero)."""
  seen_self = jnp.cumsum(self_mask_bm.astype(jnp.int32), axis=1) > 0
  return jnp.any(ctx_mask_bs, axis=1)[:, None] | seen_self


def _forward(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm, k_ctx_bsgd, v_ctx_bsgd,
             ctx_mask_bs, bs: BlockSizes, interpret):
  """``(out [B, M, H, D], lse [B, H, M_pad])`` through the forward kernel."""
  _check(q_bmhd, k_self_bmgd, bs)
  b, m, h, d = q_bmhd.shape
  g = k_self_bmgd.shape[2]
  params = _platform.mosaic_interpret_params(interpret)
  x = _pad(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm, k_ctx_bsgd, v_ctx_bsgd,
           ctx_mask_bs, bs, params is None)
  if bs.short_persistent and short.applies(x.m, x.s):
    short_call = short.forward_call(b, x.m, h, g, d, bs.stages, interpret_params=params,
                                    rows=x.rows, zero_unseen=bs.pad_free)
    call = lambda q, kc, vc, cbias, ks, vs, sbias: short_call(q, ks, vs, sbias)  # noqa: E731
  elif _use_ws(bs, m):
    call = fwd_ws.forward_call(b, x.m, h, g, d, x.s, bs.block_q, bs.block_kv, bs.stages, params,
                               rows=x.rows, zero_unseen=bs.pad_free)
  else:
    call = _forward_call(b, x.m, h, g, d, x.s, bs, params, rows=x.rows,
                         zero_unseen=bs.pad_free)
  out, lse = call(x.q, x.kc, x.vc, x.cbias, x.ks, x.vs, x.sbias)
  if bs.pad_free:          # unseen rows are zeros already; no slice when rows == m
    return out[:, :m].astype(q_bmhd.dtype), lse
  visible_bm = _visible(self_mask_bm, ctx_mask_bs)
  out = jnp.where(visible_bm[:, :, None, None], out[:, :m], 0).astype(q_bmhd.dtype)
  return out, lse


def _backward(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm, k_ctx_bsgd, v_ctx_bsgd,
              ctx_mask_bs, out_bmhd, lse_bhm, dout_bmhd, bs: BlockSizes, interpret):
  """Gradients ``(dq, dk_self, dv_self, dk_ctx, dv_ctx)`` through the backward kernels."""
  b, m, h, d = q_bmhd.shape
  g = k_self_bmgd.shape[2]
  s = k_ctx_bsgd.shape[1]
  params = _platform.mosaic_interpret_params(interpret)
  x = _pad(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm, k_ctx_bsgd, v_ctx_bsgd,
           ctx_mask_bs, bs, params is None)
  # Rows that see no key output a constant zero: no gradient flows through them (pad-free:
  # their log-sum-exp of -MASKED gives them no probability in the backward kernels).
  dout = dout_bmhd
  if not bs.pad_free:
    dout = jnp.where(_visible(self_mask_bm, ctx_mask_bs)[:, :, None, None], dout_bmhd, 0)
  delta_bhm = jnp.einsum("bmhd,bmhd->bhm", out_bmhd.astype(jnp.float32),
                         dout.astype(jnp.float32))
  delta_bhm = _pad_axis(delta_bhm, 2, x.m)
  do = _pad_axis(dout.astype(jnp.bfloat16), 1, x.rows)
  bq, bk, stages = bs.bwd_block_q, bs.bwd_block_kv, bs.bwd_stages
  if bs.short_persistent_bwd and short.applies(x.m, x.s):   # no context: x.s == 0
    operands = (x.q, do, lse_bhm, delta_bhm, x.ks, x.vs, x.sbias)
    dq = short_bwd.dq_call(b, x.m, h, g, d, stages, interpret_params=params,
                           rows=x.rows)(*operands)
    dk, dv = short_bwd.dkv_call(b, x.m, h, g, d, stages, interpret_params=params,
                                rows=x.rows)(*operands)
  else:
    dq = bwd.dq_call(b, x.m, h, g, d, x.s, bq, bk, stages, params, rows=x.rows)(
        x.q, do, lse_bhm, delta_bhm, x.kc, x.vc, x.cbias, x.ks, x.vs, x.sbias)
    k_all, v_all, bias_all = ((x.ks, x.vs, x.sbias) if not x.s else (
        jnp.concatenate([x.kc[:, :x.s], x.ks], axis=1),
        jnp.concatenate([x.vc[:, :x.s], x.vs], axis=1),
        jnp.concatenate([x.cbias[:, :x.s], x.sbias], axis=1)))
    dk, dv = bwd.dkv_call(b, x.m, h, g, d, x.s, bq, bk, stages, params, rows=x.rows)(
        x.q, do, lse_bhm, delta_bhm, k_all, v_all, bias_all)
  return (dq[:, :m].astype(q_bmhd.dtype),
          dk[:, x.s:x.s + m].astype(k_self_bmgd.dtype),
          dv[:, x.s:x.s + m].astype(v_self_bmgd.dtype),
          dk[:, :s].astype(k_ctx_bsgd.dtype),
          dv[:, :s].astype(v_ctx_bsgd.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attend_pallas_vjp(q, ks, vs, smask, kc, vc, cmask, bs, interpret):
  return _forward(q, ks, vs, smask, kc, vc, cmask, bs, interpret)[0]


def _fwd(q, ks, vs, smask, kc, vc, cmask, bs, interpret):
  out, lse = _forward(q, ks, vs, smask, kc, vc, cmask, bs, interpret)
  return out, (q, ks, vs, smask, kc, vc, cmask, out, lse)


def _bwd(bs, interpret, res, dout):
  q, ks, vs, smask, kc, vc, cmask, out, lse = res
  dq, dks, dvs, dkc, dvc = _backward(q, ks, vs, smask, kc, vc, cmask, out, lse, dout,
                                     bs, interpret)
  return dq, dks, dvs, None, dkc, dvc, None


_attend_pallas_vjp.defvjp(_fwd, _bwd)


@functools.partial(jax.jit, static_argnames=("implementation", "block_sizes", "interpret"))
def attend(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm,
           k_ctx_bsgd=None, v_ctx_bsgd=None, ctx_mask_bs=None, *,
           implementation: str = "auto", block_sizes: BlockSizes | None = None,
           interpret: bool | None = None):
  """Sparse memory attention; drop-in for ``msa_jax.attention.attend``.

  Args:
    q_bmhd: queries ``[B, M, H, D]`` (RoPE'd).
    k_self_bmgd, v_self_bmgd: own keys/values ``[B, M, Hkv, D]``.
    self_mask_bm: valid own tokens (query i sees own j iff j <= i and valid).
    k_ctx_bsgd, v_ctx_bsgd: optional context ``[B, S, Hkv, D]`` (prefix, then the
      gathered selected chunks), visible to every query where ``ctx_mask_bs``.
    implementation: ``auto | pallas | xla``.
    block_sizes: kernel tiling; interpret: force/forbid interpret mode.
  Returns:
    ``[B, M, H, D]`` in q's dtype. The pallas path computes in bf16 with float32
    softmax, forward and backward (gradients are rounded to bf16, then cast to the
    inputs' dtypes).
  """
  if _platform.resolve(implementation) == "xla":
    return ref_attention.attend(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm,
                                k_ctx_bsgd, v_ctx_bsgd, ctx_mask_bs)
  if k_ctx_bsgd is None:
    b, _, g, d = k_self_bmgd.shape
    k_ctx_bsgd = jnp.zeros((b, 0, g, d), k_self_bmgd.dtype)
    v_ctx_bsgd = k_ctx_bsgd
    ctx_mask_bs = jnp.zeros((b, 0), bool)
  compiled = _platform.mosaic_interpret_params(interpret) is None
  bs = (block_sizes or BlockSizes()).resolved(compiled)
  return _attend_pallas_vjp(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm, k_ctx_bsgd,
                            v_ctx_bsgd, ctx_mask_bs, bs, interpret)


@functools.partial(jax.jit, static_argnames=("implementation", "block_sizes", "interpret"))
def attend_context(q_bmhd, k_ctx_bsgd, v_ctx_bsgd, ctx_mask_bs, *,
                   implementation: str = "auto", block_sizes: BlockSizes | None = None,
                   interpret: bool | None = None):
  """Attention to the context only; drop-in for ``msa_jax.attention.attend_context``.

  A decoding step whose own K/V is already written into its KV cache buffer attends to
  that buffer alone: the forward kernel without the own-token sweep, so the token's K and V
  are never padded into a tile of their own and only ``q`` is padded (to ``block_q`` rows,
  not to the ``lcm`` of every kernel's tiles). Forward only: decoding takes no gradient.
  """
  if _platform.resolve(implementation) == "xla":
    return ref_attention.attend_context(q_bmhd, k_ctx_bsgd, v_ctx_bsgd, ctx_mask_bs)
  b, m, h, d = q_bmhd.shape
  g, s = k_ctx_bsgd.shape[2], k_ctx_bsgd.shape[1]
  if s == 0:
    return jnp.zeros_like(q_bmhd)
  params = _platform.mosaic_interpret_params(interpret)
  bs = (block_sizes or BlockSizes()).resolved(params is None)
  _check(q_bmhd, k_ctx_bsgd, bs)
  bf = jnp.bfloat16
  m_pad, s_pad = _round_up(m, bs.block_q), _round_up(s, bs.block_kv)
  call = _forward_call(b, m_pad, h, g, d, s_pad, bs, params, self_keys=False)
  out, _ = call(_pad_axis(q_bmhd.astype(bf), 1, m_pad),
                _pad_axis(k_ctx_bsgd.astype(bf), 1, s_pad),
                _pad_axis(v_ctx_bsgd.astype(bf), 1, s_pad),
                _bias(_pad_axis(ctx_mask_bs, 1, s_pad, False)))
  visible_b = jnp.any(ctx_mask_bs, axis=1)
  return jnp.where(visible_b[:, None, None, None], out[:, :m], 0).astype(q_bmhd.dtype)
