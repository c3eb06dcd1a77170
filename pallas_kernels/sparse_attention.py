"""Sparse memory attention: queries attend ``[context ; causal self]`` with GQA.

Same semantics and signature as ``msa_jax.attention.attend``: context slots (prefix
K/V, then the gathered pooled chunks of the selected documents) are visible to every
query where ``ctx_mask`` is set; own tokens are visible causally where
``self_mask`` is set; a query with no visible key returns zeros.

The Pallas path is a Mosaic GPU flash-attention forward (online softmax in float32,
bf16 tensor-core matmuls): one program per (example, query head, block of
``block_q`` queries); a TMA pipeline streams the context K/V tiles, then the own
K/V tiles up to the diagonal. Masks enter as additive column biases (0 or -1e30),
so any mask pattern works; a row's output is later zeroed where it saw no key.
The backward pass is the reference's (``jax.custom_vjp`` over the XLA attention),
so training works with the same call.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from msa_jax import attention as ref_attention
from pallas_kernels import _platform

MASKED = -1e30
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the forward kernel.

  block_q: query rows per program (multiple of 64).
  block_kv: key rows per pipeline step (multiple of 64, divides block_q or is a
    multiple of it).
  stages: TMA pipeline depth.
  p_in_registers: feed softmax probabilities to the PV matmul from registers
    (GPU only; interpret mode goes through shared memory).
  """

  block_q: int = 64
  block_kv: int = 64
  stages: int = 2
  p_in_registers: bool = True


def attend_reference(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm,
                     k_ctx_bsgd=None, v_ctx_bsgd=None, ctx_mask_bs=None):
  """Reference: ``msa_jax.attention.attend`` (plain XLA)."""
  return ref_attention.attend(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm,
                              k_ctx_bsgd, v_ctx_bsgd, ctx_mask_bs)


def _forward_call(b, m, h, g, d, s, bs: BlockSizes, interpret_params):
  """``plgpu.kernel`` over padded inputs (m % block_q == 0, s % block_kv == 0)."""
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  bq, bk = bs.block_q, bs.block_kv
  r = h // g
  scale = LOG2E / math.sqrt(d)
  interpret = interpret_params is not None
  p_regs = bs.p_in_registers and not interpret
  kv_tr = _platform.swizzle_transforms(d)
  kt_tr = _platform.swizzle_transforms(bk)
  p_tr = _platform.swizzle_transforms(bk)
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)

  cast = lambda x, layout: _platform.layout_cast(x, layout, not interpret)  # noqa: E731
  iota = lambda dim: _platform.wgmma_iota((bq, bk), dim, not interpret)  # noqa: E731

  def kernel(q_ref, kc_ref, vc_ref, cbias_ref, ks_ref, vs_ref, sbias_ref, out_ref):
    bi = lax.axis_index("b")
    hi = lax.axis_index("h")
    qi = lax.axis_index("q")
    gi = lax.div(hi, jnp.array(r, hi.dtype))
    q0 = qi * bq

    def scoped(q_smem, p_smem, q_barrier):
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, bq), hi], q_smem, q_barrier)
      plgpu.barrier_wait(q_barrier)

      def step(causal, kv_base, idx, k_smem, v_smem, bias_smem, carry):
        acc, m_i, l_i = carry
        (j,) = idx

        def qk_scope(acc_ref):
          k_op = k_smem if interpret else plgpu.transpose_ref(k_smem, (1, 0))
          plgpu.wgmma(acc_ref, q_smem, k_op)
          return acc_ref[...]
        qk = pl.run_scoped(qk_scope, plgpu.ACC((bq, bk), jnp.float32))
        bias = cast(bias_smem[...], col_layout)
        logits = qk * scale + lax.broadcast_in_dim(bias, (bq, bk), [1])
        if causal:
          rows, cols = iota(0), iota(1)
          logits = jnp.where(rows + q0 >= cols + (kv_base + j * bk), logits, MASKED)
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
        if interpret:  # the interpreter has no run_state: a fresh accumulator, then add
          def pv_scope(acc_ref):
            plgpu.wgmma(acc_ref, a_op, v_smem)
            return acc_ref[...]
          acc = acc + pl.run_scoped(pv_scope, plgpu.ACC((bq, d), jnp.float32))
        else:  # accumulate into the rescaled running output in place
          acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a_op, v_smem))(
              plgpu.ACC.init(acc))
        return acc, m_new, l_i

      acc = cast(jnp.zeros((bq, d), jnp.float32), wgmma_layout)
      m_i = cast(jnp.full((bq,), MASKED, jnp.float32), row_layout)
      l_i = cast(jnp.zeros((bq,), jnp.float32), row_layout)
      carry = (acc, m_i, l_i)
      k_block = (d, bk) if interpret else (bk, d)
      k_index = (lambda j: (0, j)) if interpret else (lambda j: (j, 0))
      specs = [
          plgpu.BlockSpec(k_block, k_index, transforms=kt_tr if interpret else kv_tr),
          plgpu.BlockSpec((bk, d), lambda j: (j, 0), transforms=kv_tr),
          plgpu.BlockSpec((bk,), lambda j: (j,)),
      ]
      k_at = (lambda ref: ref.at[bi, gi]) if interpret else (lambda ref: ref.at[bi, :, gi])
      if s:
        carry = plgpu.emit_pipeline(
            functools.partial(step, False, 0), grid=(s // bk,), in_specs=specs,
            max_concurrent_steps=min(bs.stages, s // bk), init_carry=carry,
        )(k_at(kc_ref), vc_ref.at[bi, :, gi], cbias_ref.at[bi])
      # Own tokens: tiles wholly below the diagonal need no causal mask; only the
      # bq // bk (at least one) tiles on the diagonal do.
      num_full = lax.div(q0, jnp.array(bk, q0.dtype))
      num_diag = max(1, bq // bk)
      self_refs = lambda first, size: (
          k_at(ks_ref).at[(slice(None), pl.ds(first, size)) if interpret else pl.ds(first, size)],
          vs_ref.at[bi, pl.ds(first, size), gi], sbias_ref.at[bi, pl.ds(first, size)])
      carry = plgpu.emit_pipeline(
          functools.partial(step, False, 0), grid=(num_full,), in_specs=specs,
          max_concurrent_steps=bs.stages, init_carry=carry,
      )(*self_refs(0, m))
      carry = plgpu.emit_pipeline(
          functools.partial(step, True, num_full * bk), grid=(num_diag,), in_specs=specs,
          max_concurrent_steps=min(bs.stages, num_diag), init_carry=carry,
      )(*self_refs(num_full * bk, num_diag * bk))
      acc, _, l_i = carry
      out = acc / lax.broadcast_in_dim(l_i, (bq, d), [0])
      q_smem[...] = out.astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, out_ref.at[bi, pl.ds(q0, bq), hi])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped,
                  plgpu.SMEM((bq, d), jnp.bfloat16, transforms=kv_tr),
                  plgpu.SMEM((bq, bk), jnp.bfloat16, transforms=p_tr),
                  plgpu.Barrier(num_barriers=1))

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((b, m, h, d), jnp.bfloat16),
      grid=(b, h, m // bq),
      grid_names=("b", "h", "q"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret_params,
  )


def _pad_axis(x, axis: int, size: int, value=0):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _attend_pallas(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm, k_ctx_bsgd, v_ctx_bsgd,
                   ctx_mask_bs, bs: BlockSizes, interpret):
  b, m, h, d = q_bmhd.shape
  g = k_self_bmgd.shape[2]
  if h % g:
    raise ValueError(f"{h} query heads are not a multiple of {g} kv heads")
  if d % 64 or bs.block_q % 64 or bs.block_kv % 64:
    raise ValueError(f"head dim {d} and blocks {bs} must be multiples of 64")
  if max(bs.block_q, bs.block_kv) % min(bs.block_q, bs.block_kv):
    raise ValueError(f"block_q and block_kv must divide one another: {bs}")
  params = _platform.mosaic_interpret_params(interpret)
  tile = max(bs.block_q, bs.block_kv)
  m_pad = -(-m // tile) * tile
  bf = jnp.bfloat16
  q = _pad_axis(q_bmhd.astype(bf), 1, m_pad)
  ks = _pad_axis(k_self_bmgd.astype(bf), 1, m_pad)
  vs = _pad_axis(v_self_bmgd.astype(bf), 1, m_pad)
  smask = _pad_axis(self_mask_bm, 1, m_pad, False)
  sbias = jnp.where(smask, 0.0, MASKED).astype(jnp.float32)
  if k_ctx_bsgd is not None and k_ctx_bsgd.shape[1]:
    s = k_ctx_bsgd.shape[1]
    s_pad = -(-s // bs.block_kv) * bs.block_kv
    kc = _pad_axis(k_ctx_bsgd.astype(bf), 1, s_pad)
    vc = _pad_axis(v_ctx_bsgd.astype(bf), 1, s_pad)
    cmask = _pad_axis(ctx_mask_bs, 1, s_pad, False)
    any_ctx = jnp.any(ctx_mask_bs, axis=1)
  else:
    s_pad = 0
    kc = jnp.zeros((b, bs.block_kv, g, d), bf)
    vc = kc
    cmask = jnp.zeros((b, bs.block_kv), bool)
    any_ctx = jnp.zeros((b,), bool)
  cbias = jnp.where(cmask, 0.0, MASKED).astype(jnp.float32)
  if params is not None:  # interpret mode: K as [B, G, D, S] (no transposed smem views)
    kc, ks = kc.transpose(0, 2, 3, 1), ks.transpose(0, 2, 3, 1)
  out = _forward_call(b, m_pad, h, g, d, s_pad, bs, params)(q, kc, vc, cbias, ks, vs, sbias)
  out = out[:, :m]
  seen_self = jnp.cumsum(self_mask_bm.astype(jnp.int32), axis=1) > 0
  visible_bm = any_ctx[:, None] | seen_self
  return jnp.where(visible_bm[:, :, None, None], out, 0).astype(q_bmhd.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attend_pallas_vjp(q, ks, vs, smask, kc, vc, cmask, bs, interpret):
  return _attend_pallas(q, ks, vs, smask, kc, vc, cmask, bs, interpret)


def _fwd(q, ks, vs, smask, kc, vc, cmask, bs, interpret):
  out = _attend_pallas(q, ks, vs, smask, kc, vc, cmask, bs, interpret)
  return out, (q, ks, vs, smask, kc, vc, cmask)


def _bwd(bs, interpret, res, dout):
  del bs, interpret
  q, ks, vs, smask, kc, vc, cmask = res
  _, vjp = jax.vjp(lambda q_, ks_, vs_, kc_, vc_: ref_attention.attend(
      q_, ks_, vs_, smask, kc_, vc_, cmask), q, ks, vs, kc, vc)
  dq, dks, dvs, dkc, dvc = vjp(dout)
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
    softmax; its gradient is the XLA reference's.
  """
  if _platform.resolve(implementation) == "xla":
    return ref_attention.attend(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm,
                                k_ctx_bsgd, v_ctx_bsgd, ctx_mask_bs)
  if k_ctx_bsgd is None:
    b, _, g, d = k_self_bmgd.shape
    k_ctx_bsgd = jnp.zeros((b, 0, g, d), k_self_bmgd.dtype)
    v_ctx_bsgd = k_ctx_bsgd
    ctx_mask_bs = jnp.zeros((b, 0), bool)
  return _attend_pallas_vjp(q_bmhd, k_self_bmgd, v_self_bmgd, self_mask_bm, k_ctx_bsgd,
                            v_ctx_bsgd, ctx_mask_bs, block_sizes or BlockSizes(), interpret)
