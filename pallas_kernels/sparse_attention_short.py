"""A persistent forward for short self-contained sequences (Mosaic GPU): the documents'
attention in training and encoding, where a query sees no context and every own token
fits in one tile of at most ``SHORT_ROWS`` rows.

The other forward kernels run one program per (example, head, query block), each of which
loads its tiles, computes, and stores, with nothing in flight between programs: at the
0.6b step's documents (104 tokens, 5,216 of them, 16 heads) a forward call took ~4.1 ms on
the H200 against ~2 ms to move its q, k, v and o once (BENCHMARKS.md, 2026-12-05). Here
one program an SM streams a run of (example, head, 64-query block) items through one
TMA pipeline: the next items' q, K, V and mask bias load while the current one
multiplies, and each item's output leaves by an asynchronous copy. An item takes its
``block_q`` queries against all ``m`` keys of its sequence in one ``[block_q, m]`` tile
(causal mask and key bias; a single tile needs no online softmax), so K and V of a
sequence are read once per item (consecutive items share them through L2).

Same outputs as ``sparse_attention._forward_call`` (``out``, base-2 ``lse``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _attention_tiles as tiles
from pallas_kernels import _platform
from pallas_kernels import block_top_k

SHORT_ROWS = 128     # the most own tokens a sequence may have (one K/V tile)
BLOCK_Q = 64         # queries per item (one warpgroup's wgmma rows)
SMEM_BYTES = 227 * 1024   # an H100/H200 SM's shared memory a block may use
LOG2E = math.log2(math.e)


def smem_bytes(m: int, d: int, stages: int) -> int:
  """Shared memory of the kernel: ``stages`` items' q, K, V and bias, and the output."""
  return stages * (BLOCK_Q * d * 2 + 2 * m * d * 2 + m * 4) + BLOCK_Q * d * 2 + BLOCK_Q * 4


def applies(m: int, s: int) -> bool:
  """The kernel covers these padded shapes: no context and one tile of own tokens."""
  return s == 0 and 0 < m <= SHORT_ROWS and m % BLOCK_Q == 0


def check_fits(m: int, d: int, stages: int, smem: int, kernel: str, stages_field: str) -> None:
  """Refuses, by name, a shape no short kernel covers (:func:`applies`) or ``stages``
  whose ``smem`` bytes exceed an SM's shared memory."""
  if not applies(m, 0):
    raise ValueError(f"the short {kernel} takes one tile of at most {SHORT_ROWS} own rows "
                     f"in blocks of {BLOCK_Q}, got m={m}")
  if smem > SMEM_BYTES:
    raise ValueError(f"the short {kernel}'s {stages} stages need {smem} bytes of shared "
                     f"memory at m={m}, D={d}, more than an SM's {SMEM_BYTES}: use fewer "
                     f"stages ({stages_field})")


class QueryBlockItems:
  """The (example, head, ``BLOCK_Q``-query block) items program ``blk`` streams, in runs
  of ``per_program`` (the last program may repeat the final item: the same values to the
  same place), and the ``BlockSpec`` index maps of their operands."""

  def __init__(self, blk, per_program: int, n_items: int, h: int, r: int, nq: int):
    self.blk, self.per_program, self.n_items = blk, per_program, n_items
    self.h, self.r, self.nq = h, r, nq

  def coords(self, t):
    """Item ``t`` as (example, head, kv head, query block)."""
    i = jnp.minimum(self.blk * self.per_program + t, self.n_items - 1)
    qb = lax.rem(i, self.nq)
    bh = lax.div(i, self.nq)
    hi = lax.rem(bh, self.h)
    return lax.div(bh, self.h), hi, lax.div(hi, self.r), qb

  def rows(self, t):
    """The item's query rows of a ``[B, rows, H, D]`` operand."""
    bi, hi, _, qb = self.coords(t)
    return bi, qb, hi, 0

  def row_stats(self, t):
    """The item's entries of a ``[B, H, m]`` per-row operand (lse, Δ)."""
    bi, hi, _, qb = self.coords(t)
    return bi, hi, qb

  def kv(self, t):
    """All rows of the item's kv head in a ``[B, rows, G, D]`` operand."""
    bi, _, gi, _ = self.coords(t)
    return bi, bi * 0, gi, 0        # a traced row block: pad-free rows may be < m

  def bias(self, t):
    """The item's sequence in a ``[B, m]`` mask bias."""
    bi = self.coords(t)[0]
    return bi, bi * 0


def forward_call(b, m, h, g, d, stages: int = 2, blocks: int = 0, interpret_params=None,
                 rows=None, zero_unseen=False):
  """``plgpu.kernel``: ``(q, ks, vs, sbias) -> (out [B, rows, H, D] bf16, lse [B, H, m]
  f32)``.

  q ``[B, rows, H, D]``, ks/vs ``[B, rows, G, D]`` bf16 (``rows``: ``m`` or fewer, pad-free:
  TMA fills the rows past them with zeros on loads and drops them on stores), sbias
  ``[B, m]`` f32 (0 visible, ``MASKED`` not). ``blocks`` programs (0: one per SM);
  ``stages`` items in flight a program; ``zero_unseen`` as in ``tiles.finish_rows``.
  """
  check_fits(m, d, stages, smem_bytes(m, d, stages), "forward", "BlockSizes.stages")
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  bq = BLOCK_Q
  r = h // g
  nq = m // bq
  scale = LOG2E / math.sqrt(d)
  compiled = interpret_params is None
  tr = _platform.swizzle_transforms(d)
  tile = tiles.Tile(bq, m, compiled)
  n_items = b * h * nq
  num_programs, per_program = block_top_k.num_blocks_for(n_items, blocks)

  def short_fwd(q_ref, ks_ref, vs_ref, sbias_ref, out_ref, lse_ref):
    pl.run_scoped(lambda o_smem, lse_smem: stream(q_ref, ks_ref, vs_ref, sbias_ref, out_ref,
                                                  lse_ref, o_smem, lse_smem),
                  plgpu.SMEM((bq, d), jnp.bfloat16, transforms=tr),
                  plgpu.SMEM((bq,), jnp.float32))

  def stream(q_ref, ks_ref, vs_ref, sbias_ref, out_ref, lse_ref, o_smem, lse_smem):
    items = QueryBlockItems(lax.axis_index("block"), per_program, n_items, h, r, nq)

    def step(idx, q_smem, k_smem, v_smem, bias_smem):
      (t,) = idx
      bi, hi, _, qb = items.coords(t)
      q0 = qb * bq
      qk = _platform.mma(q_smem, k_smem, (bq, m), transpose_b=True, compiled=compiled)
      logits = tile.logits(qk, scale, bias_smem, True, q0, 0)
      m_i = logits.max(axis=1)
      p = jnp.exp2(logits - lax.broadcast_in_dim(m_i, (bq, m), [0]))
      l_i = p.sum(axis=1)
      acc = _platform.mma(p.astype(jnp.bfloat16), v_smem, (bq, d), compiled=compiled)
      out, lse = tiles.finish_rows(acc, m_i, l_i, d, zero_unseen)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # the previous item's output copy
      o_smem[...] = out.astype(jnp.bfloat16)
      lse_smem[...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_ref.at[bi, pl.ds(q0, bq), hi])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(q0, bq)])

    plgpu.emit_pipeline(
        step, grid=(per_program,),
        in_specs=[plgpu.BlockSpec((None, bq, None, d), items.rows, transforms=tr),
                  plgpu.BlockSpec((None, m, None, d), items.kv, transforms=tr),
                  plgpu.BlockSpec((None, m, None, d), items.kv, transforms=tr),
                  plgpu.BlockSpec((None, m), items.bias)],
        max_concurrent_steps=min(stages, per_program),
    )(q_ref, ks_ref, vs_ref, sbias_ref)
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      short_fwd,
      out_type=(jax.ShapeDtypeStruct((b, m if rows is None else rows, h, d), jnp.bfloat16),
                jax.ShapeDtypeStruct((b, h, m), jnp.float32)),
      grid=(num_programs,),
      grid_names=("block",),
      compiler_params=_platform.lane_params(approx_math=True) if compiled else None,
      interpret=interpret_params,
  )
