"""Warp-specialised forward of the sparse memory attention (Mosaic GPU, FA3-style).

One program per (example, query head, pair of ``block_q``-row query blocks) runs three
warpgroups: a memory warpgroup streams the K/V tiles and their mask biases through a
ring of ``stages`` SMEM slots with TMA (the context tiles, then the own tiles up to the
pair's diagonal); two compute warpgroups each own one query block and share every
tile. A schedule barrier alternates the two compute warpgroups so that one's softmax
overlaps the other's matmuls. Same inputs and outputs as
``sparse_attention._forward_call`` (``out``, base-2 ``lse``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _attention_tiles as tiles
from pallas_kernels import _platform

MASKED = tiles.MASKED
LOG2E = math.log2(math.e)
COMPUTE_WGS = 2


def forward_call(b, m, h, g, d, s, block_q, block_kv, stages, interpret_params=None,
                 rows=None, zero_unseen=False):
  """``plgpu.kernel``: ``(q, kc, vc, cbias, ks, vs, sbias) -> (out, lse)``. ``rows`` and
  ``zero_unseen`` as in ``sparse_attention._forward_call``.

  ``m % (2·block_q) == 0``, ``m % block_kv == 0``, ``s % block_kv == 0``, ``block_kv``
  a multiple of ``block_q`` or dividing it.
  """
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  bq, bk = block_q, block_kv
  r = h // g
  scale = LOG2E / math.sqrt(d)
  n_ctx = s // bk
  tr = _platform.swizzle_transforms(d)
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  cdiv = lambda a, c: lax.div(a + (c - 1), jnp.array(c, jnp.int32))  # noqa: E731
  compiled = interpret_params is None
  cast = lambda x, layout: _platform.layout_cast(x, layout, compiled)  # noqa: E731

  def kernel(q_ref, kc_ref, vc_ref, cbias_ref, ks_ref, vs_ref, sbias_ref, out_ref, lse_ref,
             scratch):
    (qo_smem2, lse_smem2, k_smem, v_smem, bias_smem), barriers = scratch
    k_full, v_full, q_full, k_free, v_free, turn = barriers
    bi = lax.axis_index("b")
    hi = lax.axis_index("h")
    wg = lax.axis_index("wg")
    gi = lax.div(hi, jnp.array(r, hi.dtype))
    pair0 = lax.axis_index("q") * (COMPUTE_WGS * bq)
    num_steps = n_ctx + cdiv(pair0 + COMPUTE_WGS * bq, bk)   # tiles the pair needs

    def take_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      if compiled:
        plgpu.set_max_registers(232, action="increase")
      qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
      q0 = pair0 + wg * bq
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, bq), hi], qo_smem, q_full.at[wg])
      plgpu.barrier_wait(q_full.at[wg])

      def step(i, carry, causal):
        acc, m_i, l_i = carry
        slot = lax.rem(i, jnp.array(stages, i.dtype))
        plgpu.barrier_wait(k_full.at[slot])

        if compiled:  # hand the turn over while the matmul runs
          def qk_scope(acc_ref):
            plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            take_turn()
            return acc_ref[...]
          qk = pl.run_scoped(qk_scope, plgpu.ACC((bq, bk), jnp.float32))
        else:
          qk = _platform.mma(qo_smem, k_smem.at[slot], (bq, bk), transpose_b=True,
                             compiled=False)
          take_turn()
        bias = _platform.load_vector(bias_smem.at[slot], col_layout, compiled)
        plgpu.barrier_arrive(k_free.at[slot])
        logits = qk * scale + lax.broadcast_in_dim(bias, (bq, bk), [1])
        if causal:
          rows = _platform.wgmma_iota((bq, bk), 0, compiled)
          cols = _platform.wgmma_iota((bq, bk), 1, compiled)
          logits = jnp.where(rows + q0 >= cols + (i - n_ctx) * bk, logits, MASKED)
        m_new = jnp.maximum(m_i, logits.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, (bq, bk), [0]))
        acc = acc * lax.broadcast_in_dim(alpha, (bq, d), [0])
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(jnp.bfloat16)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        plgpu.barrier_arrive(turn)            # softmax done: the other group may compute
        plgpu.barrier_wait(v_full.at[slot])
        plgpu.barrier_wait(turn)              # the tensor cores are ours again
        acc = _platform.mma_accumulate(acc, p16, v_smem.at[slot], compiled=compiled)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i

      def skip(i, _):
        # Tiles past this group's diagonal (the pair's other block needs them): release
        # the slot and keep the turn-taking in step with the other group.
        slot = lax.rem(i, jnp.array(stages, i.dtype))
        plgpu.barrier_wait(k_full.at[slot])   # observe every phase (barrier bookkeeping)
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_wait(v_full.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        take_turn()
        take_turn()

      carry = (cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA),
               cast(jnp.full((bq,), MASKED, jnp.float32), row_layout),
               cast(jnp.zeros((bq,), jnp.float32), row_layout))
      full_end = n_ctx + lax.div(q0, jnp.array(bk, q0.dtype))   # tiles wholly visible
      diag_end = n_ctx + cdiv(q0 + bq, bk)
      pl.when(wg == 1)(take_turn)
      carry = lax.fori_loop(0, full_end, lambda i, c: step(i, c, False), carry)
      carry = lax.fori_loop(full_end, diag_end, lambda i, c: step(i, c, True), carry)
      lax.fori_loop(diag_end, num_steps, skip, None)
      pl.when(wg == 0)(take_turn)
      acc, m_i, l_i = carry
      out, lse = tiles.finish_rows(acc, m_i, l_i, d, zero_unseen)
      qo_smem[...] = out.astype(jnp.bfloat16)
      lse_smem[...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, pl.ds(q0, bq), hi])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(q0, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
      if compiled:
        plgpu.set_max_registers(40, action="decrease")

      def fetch(i, slot, k_or_v):
        full = k_full if k_or_v == "k" else v_full

        @pl.when(i < n_ctx)
        def _():
          rows = pl.ds(i * bk, bk)
          if k_or_v == "k":
            plgpu.copy_gmem_to_smem(kc_ref.at[bi, rows, gi], k_smem.at[slot], full.at[slot])
            plgpu.copy_gmem_to_smem(cbias_ref.at[bi, rows], bias_smem.at[slot], full.at[slot])
          else:
            plgpu.copy_gmem_to_smem(vc_ref.at[bi, rows, gi], v_smem.at[slot], full.at[slot])

        @pl.when(i >= n_ctx)
        def _():
          rows = pl.ds((i - n_ctx) * bk, bk)
          if k_or_v == "k":
            plgpu.copy_gmem_to_smem(ks_ref.at[bi, rows, gi], k_smem.at[slot], full.at[slot])
            plgpu.copy_gmem_to_smem(sbias_ref.at[bi, rows], bias_smem.at[slot], full.at[slot])
          else:
            plgpu.copy_gmem_to_smem(vs_ref.at[bi, rows, gi], v_smem.at[slot], full.at[slot])

      for i in range(stages):
        @pl.when(i < num_steps)
        def _():
          fetch(jnp.int32(i), i, "k")
          fetch(jnp.int32(i), i, "v")

      @pl.loop(0, jnp.maximum(num_steps - stages, 0))
      def _(j):
        i = j + stages
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(k_free.at[slot])
        fetch(i, slot, "k")
        plgpu.barrier_wait(v_free.at[slot])
        fetch(i, slot, "v")

      @pl.loop(jnp.maximum(num_steps - stages, 0), num_steps)
      def _(i):  # the last releases: every phase of every barrier gets observed
        slot = lax.rem(i, jnp.array(stages, i.dtype))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

  def attention_fwd_ws(*refs):
    scratch = (
        plgpu.SMEM((COMPUTE_WGS, bq, d), jnp.bfloat16, transforms=tr),
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
        plgpu.SMEM((stages, bk, d), jnp.bfloat16, transforms=tr),
        plgpu.SMEM((stages, bk, d), jnp.bfloat16, transforms=tr),
        plgpu.SMEM((stages, bk), jnp.float32),
    )
    barriers = (
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),   # K tile + its bias
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    )
    pl.run_scoped(lambda scoped: kernel(*refs, scoped), (scratch, barriers),
                  collective_axes="wg")

  return plgpu.kernel(
      attention_fwd_ws,
      out_type=(jax.ShapeDtypeStruct((b, m if rows is None else rows, h, d), jnp.bfloat16),
                jax.ShapeDtypeStruct((b, h, m), jnp.float32)),
      grid=(b, h, m // (COMPUTE_WGS * bq)),
      grid_names=("b", "h", "q"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_platform.lane_params(approx_math=True) if compiled else None,
      interpret=interpret_params,
  )
