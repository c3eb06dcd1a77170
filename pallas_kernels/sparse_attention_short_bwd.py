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
head's q and dO, ~2.5 x the bytes of one pass that reads each operand once (a program
per (example, kv head) computing dQ, dK and dV together: two warpgroups, as dK and dV of
128 keys do not fit one warpgroup's registers; not built).

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
  check_fits(m, d, dq_smem_bytes(m, d, stages), f"dQ kernel with {stages} stages",
             "use fewer stages (BlockSizes.bwd_stages)")
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
  check_fits(m, d, dkv_smem_bytes(m, d, stages), f"dK/dV kernel with {stages} stages",
             "use fewer stages (BlockSizes.bwd_stages)")
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


# keys a dQ product of :func:`one_pass_call` takes at once: wgmma contracts bf16 in 64s
# (128-byte swizzle), so 64, with dK/dV (128 registers a thread) live beside the step's
# logits, dP and dQ (another 128): at the 255-register limit, some may spill
KEY_STEP = 64


def one_pass_smem_bytes(m: int, d: int) -> int:
  """Shared memory of :func:`one_pass_call`: the item's K, V and bias and two slots of a
  head's q, dO, lse and Δ (dQ is staged in its dO rows, dK/dV in K's and V's place)."""
  return 2 * m * d * 2 + m * 4 + 2 * (2 * m * d * 2 + 2 * m * 4)


def one_pass_call(b, m, h, g, d, blocks: int = 0, interpret_params=None, rows=None):
  """``plgpu.kernel``: ``(q, do, lse, delta, ks, vs, sbias) -> (dq [B, rows, H, D],
  dk [B, rows, G, D], dv [B, rows, G, D])`` bf16, in one pass. Operands as in
  :func:`dq_call`.

  An item is (example, kv head); one program an SM streams its items. K, V and the mask
  bias of an item are loaded once and stay in shared memory while the group's ``H/G``
  heads stream through two slots (a head's q, dO, lse and Δ; the next head loads while this
  one computes). ``m / 64`` warpgroups, warpgroup ``w`` owning keys ``[64w, 64w + 64)`` and
  queries ``[64w, 64w + 64)``:

  * dK/dV: its key block against every query block from its own on (the causal rule skips
    the earlier ones), ``dV += Pᵀ·dO`` and ``dK += dSᵀ·Q`` summed in registers over the
    group's heads, staged in K's and V's place after the last head (both warpgroups done
    with K and V first) and stored;
  * dQ, once both groups are done with the head's dK/dV products: its query block against
    the keys it sees, ``KEY_STEP`` keys a product (its dK and dV stay in registers
    meanwhile: ~256 registers a thread, so some may spill), staged in its own rows of the
    slot's dO and stored each head (separate staging tiles took the kernel 56 bytes past an
    SM's shared memory at m 128, D 128: Mosaic rounds each buffer up to 1 KB).

  The shared-memory fills a layer are the item's operands once (~8 GB at the 0.6b step's
  documents, against ~32 GB for :func:`dq_call` with :func:`dkv_call`, BENCHMARKS.md).
  Written and tested interpreted on the CPU; not yet compiled or timed on a GPU.
  """
  check_fits(m, d, one_pass_smem_bytes(m, d), "one-pass backward (K, V and two slots of a "
             "head's q and dO)", "use the two-pass kernels (BlockSizes.short_one_pass_bwd="
             "False)")
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  bq = BLOCK
  r = h // g
  nq = m // bq
  wgs = nq
  scale = LOG2E / math.sqrt(d)
  compiled = interpret_params is None
  tr = _platform.swizzle_transforms(d)
  n_items = b * g
  num_programs, per_program = block_top_k.num_blocks_for(n_items, blocks)
  n_steps = per_program * r
  a_tile = tiles.Tile(bq, bq, compiled)        # dK/dV: keys on rows, queries on columns
  q_tile = tiles.Tile(bq, KEY_STEP, compiled)  # dQ: queries on rows, a key step on columns

  def short_one_pass(q_ref, do_ref, lse_ref, delta_ref, ks_ref, vs_ref, sbias_ref,
                     dq_ref, dk_ref, dv_ref):
    def scoped(scratch, barriers):
      stream(q_ref, do_ref, lse_ref, delta_ref, ks_ref, vs_ref, sbias_ref, dq_ref, dk_ref,
             dv_ref, *scratch, *barriers)
    pl.run_scoped(
        scoped,
        (plgpu.SMEM((m, d), jnp.bfloat16, transforms=tr),           # K
         plgpu.SMEM((m, d), jnp.bfloat16, transforms=tr),           # V
         plgpu.SMEM((m,), jnp.float32),                              # mask bias
         plgpu.SMEM((2, m, d), jnp.bfloat16, transforms=tr),        # q, two slots
         plgpu.SMEM((2, m, d), jnp.bfloat16, transforms=tr),        # dO
         plgpu.SMEM((2, m), jnp.float32),                            # lse
         plgpu.SMEM((2, m), jnp.float32)),                           # Δ
        (plgpu.Barrier(num_arrivals=3),                              # K, V, bias in
         plgpu.Barrier(num_arrivals=4, num_barriers=2),              # a slot's four in
         plgpu.Barrier(num_arrivals=wgs, num_barriers=2),            # a slot done with
         plgpu.Barrier(num_arrivals=wgs),                            # K/V done with
         plgpu.Barrier(num_arrivals=wgs),                            # staging K/V free
         plgpu.Barrier(num_arrivals=wgs)),                           # a head's dK/dV done
        collective_axes="wg")

  def stream(q_ref, do_ref, lse_ref, delta_ref, ks_ref, vs_ref, sbias_ref, dq_ref, dk_ref,
             dv_ref, k_smem, v_smem, bias_smem, q_smem, do_smem, lse_smem, delta_smem,
             kv_full, qd_full, qd_free, kv_used, kv_free, dkv_done):
    blk = lax.axis_index("block")

    def coords(t):
      """Step ``t`` as (example, kv head, query head, the head's place in the group)."""
      i = jnp.minimum(blk * per_program + lax.div(t, r), n_items - 1)
      j = lax.rem(t, r)
      gi = lax.rem(i, g)
      return lax.div(i, g), gi, gi * r + j, j

    def load_kv(t):
      bi, gi, _, _ = coords(t)
      rows_all = pl.ds(bi * 0, m)     # traced: pad-free rows past the array are zero-filled
      plgpu.copy_gmem_to_smem(ks_ref.at[bi, rows_all, gi], k_smem, kv_full)
      plgpu.copy_gmem_to_smem(vs_ref.at[bi, rows_all, gi], v_smem, kv_full)
      plgpu.copy_gmem_to_smem(sbias_ref.at[bi], bias_smem, kv_full)

    def load_head(t):
      bi, _, hi, _ = coords(t)
      slot = lax.rem(t, 2)
      rows_all = pl.ds(bi * 0, m)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows_all, hi], q_smem.at[slot], qd_full.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[bi, rows_all, hi], do_smem.at[slot], qd_full.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi], lse_smem.at[slot], qd_full.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi], delta_smem.at[slot], qd_full.at[slot])

    def dkv_products(w, slot, dk, dv):
      """Key block ``w`` against query blocks ``w..nq-1`` of the slot's head."""
      k0 = w * bq
      keys = pl.ds(k0, bq)
      bias = _platform.load_vector(bias_smem.at[keys], a_tile.row_layout, compiled)
      bias_b = lax.broadcast_in_dim(bias.astype(jnp.float32), (bq, bq), [0])
      for qb in range(w, nq):
        q0 = qb * bq
        rows_q = pl.ds(q0, bq)
        q_rows, do_rows = q_smem.at[slot, rows_q], do_smem.at[slot, rows_q]
        lse = a_tile.cast(lse_smem.at[slot][rows_q], a_tile.col_layout)
        delta = a_tile.cast(delta_smem.at[slot][rows_q], a_tile.col_layout)
        zeros = a_tile.zeros(bq)
        st, dpt = _platform.mma_group((zeros, k_smem.at[keys], q_rows, True),
                                      (zeros, v_smem.at[keys], do_rows, True),
                                      compiled=compiled)
        logits = st * scale + bias_b - lax.broadcast_in_dim(lse, (bq, bq), [1])
        if qb == w:                         # the diagonal block: keys after the query
          logits = jnp.where(a_tile.iota(1) + q0 >= a_tile.iota(0) + k0, logits,
                             tiles.MASKED)
        pt = jnp.exp2(logits)
        dst = pt * (dpt - lax.broadcast_in_dim(delta, (bq, bq), [1]))
        dv, dk = _platform.mma_group((dv, pt.astype(jnp.bfloat16), do_rows, False),
                                     (dk, dst.astype(jnp.bfloat16), q_rows, False),
                                     compiled=compiled)
      return dk, dv

    def dq_products(w, slot, bi, hi):
      """Query block ``w`` of the slot's head against keys ``[0, 64w + 64)``; dQ staged in
      the block's dO rows (no other group reads them now) and stored."""
      q0 = w * bq
      rows_q = pl.ds(q0, bq)
      q_rows, do_rows = q_smem.at[slot, rows_q], do_smem.at[slot, rows_q]
      lse = _platform.load_vector(lse_smem.at[slot, rows_q], q_tile.row_layout, compiled)
      delta = _platform.load_vector(delta_smem.at[slot, rows_q], q_tile.row_layout, compiled)
      lse_b = lax.broadcast_in_dim(lse, (bq, KEY_STEP), [0])
      delta_b = lax.broadcast_in_dim(delta, (bq, KEY_STEP), [0])
      dq = tiles.Tile(bq, d, compiled).zeros(d)
      for k0 in range(0, q0 + bq, KEY_STEP):
        keys = pl.ds(k0, KEY_STEP)
        zeros = q_tile.zeros(KEY_STEP)
        s, dp = _platform.mma_group((zeros, q_rows, k_smem.at[keys], True),
                                    (zeros, do_rows, v_smem.at[keys], True),
                                    compiled=compiled)
        logits = q_tile.logits(s, scale, bias_smem.at[keys], k0 + KEY_STEP > q0, q0, k0)
        p = jnp.exp2(logits - lse_b)
        ds = (p * (dp - delta_b)).astype(jnp.bfloat16)
        dq = _platform.mma_accumulate(dq, ds, k_smem.at[keys], compiled=compiled)
      do_rows[...] = (dq * (1 / math.sqrt(d))).astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(do_rows, dq_ref.at[bi, pl.ds(bi * 0 + q0, bq), hi])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)     # the slot may be refilled after

    def stage_dkv(w, bi, gi, dk, dv):
      """After the item's last head: this group's dK/dV rows in K's and V's place, stored."""
      keys = pl.ds(w * bq, bq)
      k_smem.at[keys][...] = (dk * (1 / math.sqrt(d))).astype(jnp.bfloat16)
      v_smem.at[keys][...] = dv.astype(jnp.bfloat16)
      plgpu.commit_smem()
      out_rows = pl.ds(bi * 0 + w * bq, bq)
      plgpu.copy_smem_to_gmem(k_smem.at[keys], dk_ref.at[bi, out_rows, gi])
      plgpu.copy_smem_to_gmem(v_smem.at[keys], dv_ref.at[bi, out_rows, gi])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)     # K/V's buffers free again

    def group(w):
      """Warpgroup ``w``'s whole program (``w`` static; group 0 also issues the copies)."""
      if w == 0:
        load_kv(jnp.int32(0))
        load_head(jnp.int32(0))
        if n_steps > 1:
          load_head(jnp.int32(1))

      def step(t, carry):
        bi, gi, hi, j = coords(t)
        slot = lax.rem(t, 2)
        fresh = (j != 0).astype(jnp.float32)      # 0 at an item's first head: a new sum
        dk, dv = (acc * fresh for acc in carry)

        @pl.when(j == 0)
        def _():
          plgpu.barrier_wait(kv_full)

        plgpu.barrier_wait(qd_full.at[slot])
        dk, dv = dkv_products(w, slot, dk, dv)
        plgpu.barrier_arrive(dkv_done)            # no group reads another's dO rows after
        plgpu.barrier_wait(dkv_done)
        dq_products(w, slot, bi, hi)
        plgpu.barrier_arrive(qd_free.at[slot])
        if w == 0:
          @pl.when(t + 2 < n_steps)
          def _():
            plgpu.barrier_wait(qd_free.at[slot])
            load_head(t + 2)

        @pl.when(j == r - 1)
        def _():
          plgpu.barrier_arrive(kv_used)           # every group done reading K and V
          plgpu.barrier_wait(kv_used)
          stage_dkv(w, bi, gi, dk, dv)
          plgpu.barrier_arrive(kv_free)
          if w == 0:
            @pl.when(t + 1 < n_steps)
            def _():
              plgpu.barrier_wait(kv_free)
              load_kv(t + 1)
        return dk, dv

      zeros = a_tile.zeros(d)
      lax.fori_loop(0, n_steps, step, (zeros, zeros))
      if w == 0:      # the releases no copy waited for: every phase of a barrier observed
        for t in range(max(n_steps - 2, 0), n_steps):
          plgpu.barrier_wait(qd_free.at[t % 2])
        plgpu.barrier_wait(kv_free)
      plgpu.wait_smem_to_gmem(0)

    wg = lax.axis_index("wg")
    for w in range(wgs):
      pl.when(wg == w)(lambda w=w: group(w))

  kv_type = jax.ShapeDtypeStruct((b, m if rows is None else rows, g, d), jnp.bfloat16)
  return plgpu.kernel(
      short_one_pass,
      out_type=(jax.ShapeDtypeStruct((b, m if rows is None else rows, h, d), jnp.bfloat16),
                kv_type, kv_type),
      grid=(num_programs,),
      grid_names=("block",),
      num_threads=wgs,
      thread_name="wg",
      compiler_params=_platform.lane_params(approx_math=True) if compiled else None,
      interpret=interpret_params,
  )
