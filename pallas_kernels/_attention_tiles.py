"""Pieces shared by the single-warpgroup attention kernels (the forward in
``sparse_attention`` and the dQ kernel in ``sparse_attention_bwd``): the masked logits
of one ``[block_q, block_kv]`` tile and the sweep over a query block's keys."""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax

from pallas_kernels import _platform

MASKED = -1e30


def finish_rows(acc, m_i, l_i, d: int, zero_unseen: bool):
  """A forward kernel's ``(out [bq, d] f32, lse [bq] f32)`` from its online-softmax state
  (``acc``, running max ``m_i`` and sum ``l_i``, base-2 logits).

  ``zero_unseen``: a row that saw no key (every logit ``MASKED``, so ``m_i`` never rose
  above it) outputs zeros and a log-sum-exp of ``-MASKED``, so the backward kernels give
  its probabilities ``exp2(logit − lse) = 0``: no gradient, as for the zeros the caller
  would otherwise select in and out. Otherwise such a row averages the values it swept."""
  out = acc / lax.broadcast_in_dim(l_i, (acc.shape[0], d), [0])
  lse = m_i + jnp.log2(l_i)
  if not zero_unseen:
    return out, lse
  # (the max broadcast, not the mask: f32 row vectors broadcast in every register layout)
  out = jnp.where(lax.broadcast_in_dim(m_i, out.shape, [0]) > 0.5 * MASKED, out, 0.0)
  return out, jnp.where(m_i > 0.5 * MASKED, lse, -MASKED)


@dataclasses.dataclass(frozen=True)
class Tile:
  """A ``[rows, cols]`` f32 register tile in the WGMMA layout (plain arrays interpreted)."""
  rows: int
  cols: int
  compiled: bool

  @property
  def row_layout(self):
    """Layout of a per-row vector (reduced over columns)."""
    return _platform.plgpu().Layout.WGMMA.reduce(1)

  @property
  def col_layout(self):
    """Layout of a per-column vector (reduced over rows)."""
    return _platform.plgpu().Layout.WGMMA.reduce(0)

  def cast(self, x, layout):
    return _platform.layout_cast(x, layout, self.compiled)

  def zeros(self, cols: int):
    """An f32 ``[rows, cols]`` accumulator."""
    return self.cast(jnp.zeros((self.rows, cols), jnp.float32), _platform.plgpu().Layout.WGMMA)

  def iota(self, dim: int):
    return _platform.wgmma_iota((self.rows, self.cols), dim, self.compiled)

  def logits(self, qk, scale: float, bias_smem, causal: bool, q0, k0):
    """``qk·scale`` plus the keys' mask bias (columns); with ``causal``, keys after the
    query (row ``i`` is query ``q0 + i``, column ``j`` key ``k0 + j``) get ``MASKED``."""
    bias = self.cast(bias_smem[...], self.col_layout)
    out = qk * scale + lax.broadcast_in_dim(bias, (self.rows, self.cols), [1])
    if causal:
      out = jnp.where(self.iota(0) + q0 >= self.iota(1) + k0, out, MASKED)
    return out


def sweep_keys(step, carry, *, tile: Tile, d: int, s: int, m: int, stages: int, q0,
               ctx_refs, self_refs):
  """Runs ``step`` over every key tile that queries ``[q0, q0 + rows)`` see.

  First the ``s // cols`` context tiles, then the own tiles wholly below the diagonal
  (no causal mask needed), then the ``max(1, rows // cols)`` tiles on it. Each is a TMA
  pipeline of ``(K, V, bias)`` tiles; ``step(causal, k0, k_smem, v_smem, bias_smem,
  carry)`` gets the tile's first key position among the own tokens in ``k0`` (None
  where ``causal`` is False).
  ``ctx_refs``: ``(K, V, bias)`` of the context; ``self_refs(first, size)``: those of
  own tokens ``[first, first + size)``, or None (no own tokens: the context only).
  Returns the final carry.
  """
  plgpu = _platform.plgpu()
  bk = tile.cols
  tr = _platform.swizzle_transforms(d)
  specs = [
      plgpu.BlockSpec((bk, d), lambda j: (j, 0), transforms=tr),
      plgpu.BlockSpec((bk, d), lambda j: (j, 0), transforms=tr),
      plgpu.BlockSpec((bk,), lambda j: (j,)),
  ]

  def body(causal, base, idx, k_smem, v_smem, bias_smem, carry):
    (j,) = idx
    k0 = base + j * bk if causal else None   # only the causal mask needs it
    return step(causal, k0, k_smem, v_smem, bias_smem, carry)

  def run(causal, base, grid, depth, refs, carry):
    return plgpu.emit_pipeline(
        functools.partial(body, causal, base), grid=(grid,), in_specs=specs,
        max_concurrent_steps=depth, init_carry=carry)(*refs)

  if s:
    carry = run(False, 0, s // bk, min(stages, s // bk), ctx_refs, carry)
  if self_refs is None:
    return carry
  num_full = lax.div(q0, jnp.array(bk, q0.dtype))
  num_diag = max(1, tile.rows // bk)
  carry = run(False, 0, num_full, stages, self_refs(0, m), carry)
  return run(True, num_full * bk, num_diag, min(stages, num_diag),
             self_refs(num_full * bk, num_diag * bk), carry)
