"""Persistent backward kernels for short self-contained sequences (Mosaic GPU): the
gradients of ``sparse_attention_short``'s forward, for the documents' attention in
training (no context, every own token in one tile of at most ``SHORT_ROWS`` rows).

``sparse_attention_bwd``'s kernels run one program per (example, head, query block) for
dQ and per (example, kv head, key block) for dK/dV, each loading its operands, waiting,
computing a tile or two and storing, with nothing in flight between programs: at the
0.6b step's documents (104 tokens, 5,216 of them) the backward took ~7.7 ms on an H100
against ~2.2 ms to move its operands once (BENCHMARKS.md, 2026-12-05). Here, as in the
persistent forward, one program an SM streams a run of items through one TMA pipeline,
the next items' operands loading while the current one multiplies:

* :func:`dq_call`: an item is (example, query head, 64-query block): its q, dO, lse and
  Δ rows and all ``m`` keys and values of the kv head; ``dQ = dS·K/√D`` in one
  ``[64, m]`` tile (the keys after the block's last query are masked, as in the forward).
* :func:`dkv_call`: an item is (example, kv head, 64-key block), taken in ``H/G`` steps,
  one a query head of the group: the key block's K, V and bias and all ``m`` rows of the
  head's q, dO, lse and Δ; ``dK = Σ dSᵀ·Q/√D`` and ``dV = Σ Pᵀ·dO`` accumulate in
  registers over the group's heads and are stored after the last. Query rows before the
  key block are masked rather than skipped (at most half the tiles of a block, which
  keeps every step the same shape).

Each item issues its independent products together and waits once for them
(``_platform.mma_group``): ``S`` with ``dP``, then (dK/dV) ``dV`` with ``dK``. Measured at
the 0.6b step's documents on an H100 (2026-12-05, ``python -m benchmarks.doc_attention
--shape 0.6b``, BENCHMARKS.md), forward + backward: the tiled kernels 11.22-11.52 ms, these
kernels waiting after every product 11.25, grouped 11.60: **no faster, so off in the
recipes**. Neither the launches nor the waits set the pace; what the two designs share is
their traffic: every dQ item reads all of its kv head's K and V, every dK/dV step all of a
head's q and dO, ~2.5 x the bytes of one pass that reads each operand once. That one pass
was built (a program per (example, kv head) computing dQ, dK and dV together, two
warpgroups, K and V held in shared memory while the group's heads streamed through) and
was **slower**: 10.15 ms of kernel time against 6.42 for these two (H100, 2026-12-05,
BENCHMARKS.md "Session 33"); it was removed (its code: commit 321925e,
``one_pass_call``).

With base-2 logits ``S``, the forward's base-2 log-sum-exp ``lse`` and ``Δ = rowsum(O ∘
dO)``: ``P = exp2(S − lse)``, ``dP = dO·Vᵀ``, ``dS = P ∘ (dP − Δ)``. The gradients of
``sparse_attention_bwd``'s kernels at ``s = 0``, up to the order of float32 sums.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _attention_tiles as tiles
from pallas_kernels import _platform
from pallas_kernels import block_top_k
from pallas_kernels.sparse_attention_short import (BLOCK_Q, LOG2E, QueryBlockItems,
                                                   check_fits)

BLOCK = BLOCK_Q      # query rows of a dQ item, key rows of a dK/dV item


def dq_smem_bytes(m: int, d: int, stages: int) -> int:
  """Shared memory of :func:`dq_call`: ``stages`` items' q, dO, K, V, bias, lse and Δ,
  and the output tile."""
  return stages * (2 * BLOCK * d * 2 + 2 * m * d * 2 + m * 4 + 2 * BLOCK * 4) + BLOCK * d * 2


def dkv_smem_bytes(m: int, d: int, stages: int) -> int:
  """Shared memory of :func:`dkv_call`: ``stages`` steps' K, V and bias of a key block and
  q, dO, lse and Δ of all ``m`` rows, and one output tile (dK, then dV)."""
  return stages * (2 * BLOCK * d * 2 + BLOCK * 4 + 2 * m * d * 2 + 2 * m * 4) + BLOCK * d * 2


def dq_call(b, m, h, g, d, stages: int = 2, blocks: int = 0, interpret_params=None,
            rows=None):
  """``plgpu.kernel``: ``(q, do, lse, delta, ks, vs, sbias) -> dq [B, rows, H, D] bf16``.

  q, do ``[B, rows, H, D]`` and ks, vs ``[B, rows, G, D]`` bf16 (``rows``: ``m`` or fewer,
  pad-free: TMA zero-fills the rows past them on loads and drops them on stores); lse, delta
  ``[B, H, m]`` f32; sbias ``[B, m]`` f32 (0 visible, ``MASKED`` not). ``blocks`` programs
  (0: one per SM), ``stages`` items in flight a program.
  """
  check_fits(m, d, stages, dq_smem_bytes(m, d, stages), "dQ kernel", "BlockSizes.bwd_stages")
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  bq = BLOCK
  r = h // g
  nq = m // bq
  scale = LOG2E / math.sqrt(d)
  compiled = interpret_params is None
  tr = _platform.swizzle_transforms(d)
  tile = tiles.Tile(bq, m, compiled)
  n_items = b * h * nq
  num_programs, per_program = block_top_k.num_blocks_for(n_items, blocks)

  def short_dq(q_ref, do_ref, lse_ref, delta_ref, ks_ref, vs_ref, sbias_ref, dq_ref):
    pl.run_scoped(lambda dq_smem: stream(q_ref, do_ref, lse_ref, delta_ref, ks_ref, vs_ref,
                                         sbias_ref, dq_ref, dq_smem),
                  plgpu.SMEM((bq, d), jnp.bfloat16, transforms=tr))

  def stream(q_ref, do_ref, lse_ref, delta_ref, ks_ref, vs_ref, sbias_ref, dq_ref, dq_smem):
    items = QueryBlockItems(lax.axis_index("block"), per_program, n_items, h, r, nq)

    def step(idx, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, bias_smem):
      (t,) = idx
      bi, hi, _, qb = items.coords(t)
      q0 = qb * bq
      lse = _platform.load_vector(lse_smem, tile.row_layout, compiled)
      delta = _platform.load_vector(delta_smem, tile.row_layout, compiled)
      zeros = tile.zeros(m)
      qk, dp = _platform.mma_group((zeros, q_smem, k_smem, True), (zeros, do_smem, v_smem, True),
                                   compiled=compiled)
      p = jnp.exp2(tile.logits(qk, scale, bias_smem, True, q0, 0)
                   - lax.broadcast_in_dim(lse, (bq, m), [0]))
      ds = (p * (dp - lax.broadcast_in_dim(delta, (bq, m), [0]))).astype(jnp.bfloat16)
      dq = _platform.mma(ds, k_smem, (bq, d), compiled=compiled)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # the previous item's dQ copy
      dq_smem[...] = (dq * (1 / math.sqrt(d))).astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bi, pl.ds(q0, bq), hi])

    row_spec = plgpu.BlockSpec((None, bq, None, d), items.rows, transforms=tr)
    stats_spec = plgpu.BlockSpec((None, None, bq), items.row_stats)
    kv_spec = plgpu.BlockSpec((None, m, None, d), items.kv, transforms=tr)
    plgpu.emit_pipeline(
        step, grid=(per_program,),
        in_specs=[row_spec, row_spec, stats_spec, stats_spec, kv_spec, kv_spec,
                  plgpu.BlockSpec((None, m), items.bias)],
        max_concurrent_steps=min(stages, per_program),
    )(q_ref, do_ref, lse_ref, delta_ref, ks_ref, vs_ref, sbias_ref)
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      short_dq,
      out_type=jax.ShapeDtypeStruct((b, m if rows is None else rows, h, d), jnp.bfloat16),
      grid=(num_programs,),
      grid_names=("block",),
      compiler_params=_platform.lane_params(approx_math=True) if compiled else None,
      interpret=interpret_params,
  )


def dkv_call(b, m, h, g, d, stages: int = 2, blocks: int = 0, interpret_params=None,
             rows=None):
  """``plgpu.kernel``: ``(q, do, lse, delta, ks, vs, sbias) -> (dk, dv)``, each
  ``[B, rows, G, D]`` bf16. Operands as in :func:`dq_call`."""
  check_fits(m, d, stages, dkv_smem_bytes(m, d, stages), "dK/dV kernel",
             "BlockSizes.bwd_stages")
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  bk = bq = BLOCK
  r = h // g
  nk = m // bk
  scale = LOG2E / math.sqrt(d)
  compiled = interpret_params is None
  tr = _platform.swizzle_transforms(d)
  tile = tiles.Tile(bk, bq, compiled)   # transposed: keys on rows, queries on columns
  n_items = b * g * nk
  num_programs, per_program = block_top_k.num_blocks_for(n_items, blocks)

  def short_dkv(q_ref, do_ref, lse_ref, delta_ref, ks_ref, vs_ref, sbias_ref, dk_ref, dv_ref):
    pl.run_scoped(lambda out_smem: stream(q_ref, do_ref, lse_ref, delta_ref, ks_ref, vs_ref,
                                          sbias_ref, dk_ref, dv_ref, out_smem),
                  plgpu.SMEM((bk, d), jnp.bfloat16, transforms=tr))

  def stream(q_ref, do_ref, lse_ref, delta_ref, ks_ref, vs_ref, sbias_ref, dk_ref, dv_ref,
             out_smem):
    blk = lax.axis_index("block")

    def coords(t):
      """Step ``t`` of this program as (example, kv head, key block, query head, the
      head's place ``j`` in the group); the last program may repeat the final item."""
      i = jnp.minimum(blk * per_program + lax.div(t, r), n_items - 1)
      j = lax.rem(t, r)
      kb = lax.rem(i, nk)
      bg = lax.div(i, nk)
      gi = lax.rem(bg, g)
      return lax.div(bg, g), gi, kb, gi * r + j, j

    def key_index(t):
      bi, gi, kb, _, _ = coords(t)
      return bi, kb, gi, 0

    def key_bias_index(t):
      bi, _, kb, _, _ = coords(t)
      return bi, kb

    def rows_index(t):
      bi, _, _, hi, _ = coords(t)
      return bi, bi * 0, hi, 0        # a traced row block: pad-free rows may be < m

    def row_stats_index(t):
      bi, _, _, hi, _ = coords(t)
      return bi, hi, bi * 0

    def store(smem_value, out_ref, bi, gi, k0):
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # the last copy out of out_smem
      out_smem[...] = smem_value.astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, out_ref.at[bi, pl.ds(k0, bk), gi])

    def step(idx, k_smem, v_smem, bias_smem, q_smem, do_smem, lse_smem, delta_smem, carry):
      (t,) = idx
      bi, gi, kb, _, j = coords(t)
      k0 = kb * bk
      fresh = (j != 0).astype(jnp.float32)   # 0 at an item's first head: a new sum
      dk_acc, dv_acc = (acc * fresh for acc in carry)
      bias = _platform.load_vector(bias_smem, tile.row_layout, compiled)
      bias_b = lax.broadcast_in_dim(bias, (bk, bq), [0])
      for q0 in range(0, m, bq):           # query columns, 64 at a time
        rows = pl.ds(q0, bq)
        q_rows, do_rows = q_smem.at[rows], do_smem.at[rows]
        lse = tile.cast(lse_smem[rows], tile.col_layout)
        delta = tile.cast(delta_smem[rows], tile.col_layout)
        zeros = tile.zeros(bq)
        st, dpt = _platform.mma_group((zeros, k_smem, q_rows, True),
                                      (zeros, v_smem, do_rows, True), compiled=compiled)
        logits = st * scale + bias_b - lax.broadcast_in_dim(lse, (bk, bq), [1])
        logits = jnp.where(tile.iota(1) + q0 >= tile.iota(0) + k0, logits, tiles.MASKED)
        pt = jnp.exp2(logits)
        dst = pt * (dpt - lax.broadcast_in_dim(delta, (bk, bq), [1]))
        dv_acc, dk_acc = _platform.mma_group(
            (dv_acc, pt.astype(jnp.bfloat16), do_rows, False),
            (dk_acc, dst.astype(jnp.bfloat16), q_rows, False), compiled=compiled)

      @pl.when(j == r - 1)
      def _():
        store(dk_acc * (1 / math.sqrt(d)), dk_ref, bi, gi, k0)
        store(dv_acc, dv_ref, bi, gi, k0)
      return dk_acc, dv_acc

    key_spec = plgpu.BlockSpec((None, bk, None, d), key_index, transforms=tr)
    row_spec = plgpu.BlockSpec((None, m, None, d), rows_index, transforms=tr)
    stats_spec = plgpu.BlockSpec((None, None, m), row_stats_index)
    zeros = tile.zeros(d)
    plgpu.emit_pipeline(
        step, grid=(per_program * r,),
        in_specs=[key_spec, key_spec, plgpu.BlockSpec((None, bk), key_bias_index),
                  row_spec, row_spec, stats_spec, stats_spec],
        max_concurrent_steps=min(stages, per_program * r), init_carry=(zeros, zeros),
    )(ks_ref, vs_ref, sbias_ref, q_ref, do_ref, lse_ref, delta_ref)
    plgpu.wait_smem_to_gmem(0)

  kv_type = jax.ShapeDtypeStruct((b, m if rows is None else rows, g, d), jnp.bfloat16)
  return plgpu.kernel(
      short_dkv,
      out_type=(kv_type, kv_type),
      grid=(num_programs,),
      grid_names=("block",),
      compiler_params=_platform.lane_params(approx_math=True) if compiled else None,
      interpret=interpret_params,
  )
