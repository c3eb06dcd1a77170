"""Backward kernels of the sparse memory attention (Mosaic GPU, flash-style).

The forward (``sparse_attention._forward_call``) saves each query row's base-2
log-sum-exp ``lse``; here probabilities are recomputed tile by tile from it, so no
``[M, S + M]`` matrix ever reaches HBM. Two kernels, both over padded inputs:

* ``dq_call``: one program per (example, query head, block of ``block_q`` queries);
  a TMA pipeline streams the context K/V tiles, then the own K/V tiles up to the
  diagonal (as the forward does), accumulating ``dQ = Σ dS·K`` in registers.
* ``dkv_call``: one program per (example, kv head, block of ``block_kv`` keys of
  ``[context ; own]``); the K/V tile stays in SMEM while a pipeline streams Q, dO,
  lse and Δ for every query head of the group and every query block that sees the
  keys (all of them for context keys; the diagonal onwards for own keys),
  accumulating ``dK = Σ dSᵀ·Q`` and ``dV = Σ Pᵀ·dO``.

With ``S = logits`` (natural units), ``P = softmax(S)``, ``Δ = rowsum(O ∘ dO)``:
``dP = dO·Vᵀ``, ``dS = P ∘ (dP − Δ)``, ``dQ = dS·K/√D``, ``dK = dSᵀ·Q/√D``,
``dV = Pᵀ·dO``. Masks enter as additive biases (0 or ``MASKED``), as in the forward.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _attention_tiles as tiles
from pallas_kernels import _platform

MASKED = tiles.MASKED
LOG2E = math.log2(math.e)


def dq_call(b, m, h, g, d, s, block_q, block_kv, stages, interpret_params, rows=None):
  """dQ kernel: ``(q, do, lse, delta, kc, vc, cbias, ks, vs, sbias) -> dq [B, M, H, D]``.

  Shapes: q, do ``[B, M, H, D]`` bf16; lse, delta ``[B, H, M]`` f32; kc, vc
  ``[B, S, G, D]``, ks, vs ``[B, M, G, D]`` bf16; cbias ``[B, S]``, sbias ``[B, M]`` f32.
  ``m % block_q == 0``, ``s % block_kv == 0`` and ``m % block_kv == 0``. ``rows``: the
  own-token arrays' (q, do, ks, vs, dq) rows when fewer than ``m`` (TMA zero-fills the
  rest on loads and drops them on stores); lse, delta and sbias stay ``m`` wide.
  """
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  bq, bk = block_q, block_kv
  r = h // g
  scale = LOG2E / math.sqrt(d)
  compiled = interpret_params is None
  tr = _platform.swizzle_transforms(d)
  tile = tiles.Tile(bq, bk, compiled)

  def attention_dq(q_ref, do_ref, lse_ref, delta_ref, kc_ref, vc_ref, cbias_ref,
             ks_ref, vs_ref, sbias_ref, dq_ref):
    bi = lax.axis_index("b")
    hi = lax.axis_index("h")
    q0 = lax.axis_index("q") * bq
    gi = lax.div(hi, jnp.array(r, hi.dtype))

    def scoped(q_smem, do_smem, lse_smem, delta_smem, barriers):
      rows = pl.ds(q0, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem, barriers.at[0])
      plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_smem, barriers.at[1])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem, barriers.at[2])
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem, barriers.at[3])
      for i in range(4):
        plgpu.barrier_wait(barriers.at[i])
      lse = _platform.load_vector(lse_smem, tile.row_layout, compiled)
      delta = _platform.load_vector(delta_smem, tile.row_layout, compiled)
      lse_b = lax.broadcast_in_dim(lse, (bq, bk), [0])
      delta_b = lax.broadcast_in_dim(delta, (bq, bk), [0])

      def step(causal, k0, k_smem, v_smem, bias_smem, dq_acc):
        qk = _platform.mma(q_smem, k_smem, (bq, bk), transpose_b=True, compiled=compiled)
        p = jnp.exp2(tile.logits(qk, scale, bias_smem, causal, q0, k0) - lse_b)
        dp = _platform.mma(do_smem, v_smem, (bq, bk), transpose_b=True, compiled=compiled)
        ds = (p * (dp - delta_b)).astype(jnp.bfloat16)
        return _platform.mma_accumulate(dq_acc, ds, k_smem, compiled=compiled)

      dq_acc = tiles.sweep_keys(
          step, tile.zeros(d), tile=tile, d=d, s=s, m=m, stages=stages, q0=q0,
          ctx_refs=(kc_ref.at[bi, :, gi], vc_ref.at[bi, :, gi], cbias_ref.at[bi]),
          self_refs=lambda first, size: (
              ks_ref.at[bi, pl.ds(first, size), gi], vs_ref.at[bi, pl.ds(first, size), gi],
              sbias_ref.at[bi, pl.ds(first, size)]))
      q_smem[...] = (dq_acc * (1 / math.sqrt(d))).astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, rows, hi])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped,
                  plgpu.SMEM((bq, d), jnp.bfloat16, transforms=tr),
                  plgpu.SMEM((bq, d), jnp.bfloat16, transforms=tr),
                  plgpu.SMEM((bq,), jnp.float32),
                  plgpu.SMEM((bq,), jnp.float32),
                  plgpu.Barrier(num_barriers=4))

  return plgpu.kernel(
      attention_dq,
      out_type=jax.ShapeDtypeStruct((b, m if rows is None else rows, h, d), jnp.bfloat16),
      grid=(b, h, m // bq),
      grid_names=("b", "h", "q"),
      compiler_params=_platform.lane_params(approx_math=True) if compiled else None,
      interpret=interpret_params,
  )


def dkv_call(b, m, h, g, d, s, block_q, block_kv, stages, interpret_params, rows=None):
  """dK/dV kernel: ``(q, do, lse, delta, k, v, bias) -> (dk, dv)``, each ``[B, S+M, G, D]``.

  ``k, v`` are ``[context ; own]`` keys/values ``[B, S + M, G, D]`` bf16 and ``bias``
  their ``[B, S + M]`` f32 mask bias; q, do, lse, delta as in :func:`dq_call`. Key
  tiles ``< S / block_kv`` are context (seen by every query), the rest own tokens
  (seen causally). ``m % block_q == 0``, ``s % block_kv == 0``, ``m % block_kv == 0``.
  ``rows`` as in :func:`dq_call` (k, v, dk, dv then have ``S + rows`` rows; bias ``S + M``).
  """
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  bq, bk = block_q, block_kv
  r = h // g
  nq = m // bq
  scale = LOG2E / math.sqrt(d)
  compiled = interpret_params is None
  tr = _platform.swizzle_transforms(d)
  tile = tiles.Tile(bk, bq, compiled)   # transposed: keys on rows, queries on columns

  def attention_dkv(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, bias_ref, dk_ref, dv_ref):
    bi = lax.axis_index("b")
    gi = lax.axis_index("g")
    kt = lax.axis_index("k")
    k0 = kt * bk
    is_ctx = k0 < s
    self_k0 = k0 - s                    # position among own tokens (self tiles)
    # Own-key tile: the query blocks on its diagonal need the causal mask, later ones
    # do not; a context tile is seen unmasked by every query block.
    first_diag = lax.div(jnp.maximum(self_k0, 0), jnp.array(bq, k0.dtype))
    num_diag = max(1, bk // bq)
    n_diag = jnp.where(is_ctx, 0, num_diag)
    t_plain = jnp.where(is_ctx, 0, first_diag + num_diag)
    n_plain = nq - t_plain

    def scoped(k_smem, v_smem, bias_smem, barriers):
      keys = pl.ds(k0, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, gi], k_smem, barriers.at[0])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, gi], v_smem, barriers.at[1])
      plgpu.copy_gmem_to_smem(bias_ref.at[bi, keys], bias_smem, barriers.at[2])
      for i in range(3):
        plgpu.barrier_wait(barriers.at[i])
      bias = _platform.load_vector(bias_smem, tile.row_layout, compiled)
      bias_b = lax.broadcast_in_dim(bias, (bk, bq), [0])

      def step(causal, t_first, idx, q_smem, do_smem, lse_smem, delta_smem, carry):
        dk_acc, dv_acc = carry
        _, t = idx
        st = _platform.mma(k_smem, q_smem, (bk, bq), transpose_b=True, compiled=compiled)
        lse = tile.cast(lse_smem[...], tile.col_layout)
        logits = st * scale + bias_b - lax.broadcast_in_dim(lse, (bk, bq), [1])
        if causal:
          q_first = (t_first + t) * bq
          logits = jnp.where(tile.iota(1) + q_first >= tile.iota(0) + self_k0, logits, MASKED)
        pt = jnp.exp2(logits)
        dv_acc = _platform.mma_accumulate(dv_acc, pt.astype(jnp.bfloat16), do_smem,
                                          compiled=compiled)
        dpt = _platform.mma(v_smem, do_smem, (bk, bq), transpose_b=True, compiled=compiled)
        delta = tile.cast(delta_smem[...], tile.col_layout)
        dst = pt * (dpt - lax.broadcast_in_dim(delta, (bk, bq), [1]))
        dk_acc = _platform.mma_accumulate(dk_acc, dst.astype(jnp.bfloat16), q_smem,
                                          compiled=compiled)
        return dk_acc, dv_acc

      def q_specs(t_first):
        head = lambda j: gi * r + j  # noqa: E731
        return [
            plgpu.BlockSpec((bq, None, d), lambda j, t: (t_first + t, head(j), 0),
                            transforms=tr),
            plgpu.BlockSpec((bq, None, d), lambda j, t: (t_first + t, head(j), 0),
                            transforms=tr),
            plgpu.BlockSpec((None, bq), lambda j, t: (head(j), t_first + t)),
            plgpu.BlockSpec((None, bq), lambda j, t: (head(j), t_first + t)),
        ]

      q_refs = (q_ref.at[bi], do_ref.at[bi], lse_ref.at[bi], delta_ref.at[bi])
      zeros = tile.zeros(d)
      carry = (zeros, zeros)
      carry = plgpu.emit_pipeline(
          functools.partial(step, True, first_diag), grid=(r, n_diag),
          in_specs=q_specs(first_diag), max_concurrent_steps=stages, init_carry=carry,
      )(*q_refs)
      carry = plgpu.emit_pipeline(
          functools.partial(step, False, t_plain), grid=(r, n_plain),
          in_specs=q_specs(t_plain), max_concurrent_steps=stages, init_carry=carry,
      )(*q_refs)
      dk_acc, dv_acc = carry
      k_smem[...] = (dk_acc * (1 / math.sqrt(d))).astype(jnp.bfloat16)
      v_smem[...] = dv_acc.astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, keys, gi])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, keys, gi])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped,
                  plgpu.SMEM((bk, d), jnp.bfloat16, transforms=tr),
                  plgpu.SMEM((bk, d), jnp.bfloat16, transforms=tr),
                  plgpu.SMEM((bk,), jnp.float32),
                  plgpu.Barrier(num_barriers=3))

  kv_type = jax.ShapeDtypeStruct((b, s + (m if rows is None else rows), g, d), jnp.bfloat16)
  return plgpu.kernel(
      attention_dkv,
      out_type=(kv_type, kv_type),
      grid=(b, g, (s + m) // bk),
      grid_names=("b", "g", "k"),
      compiler_params=_platform.lane_params(approx_math=True) if compiled else None,
      interpret=interpret_params,
  )
