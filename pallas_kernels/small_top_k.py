"""Exact top-k of a short row in ONE Mosaic GPU kernel: the routing tail's tree top-k.

:func:`pallas_kernels.route_tail.tree_top_k` takes the top k of a ``[B, n]`` row (n up to
~16K: the credited row maxima of a 100M-token bank, then the chosen windows' runs) as a tree
of XLA reductions, two kernels a level, 4-7 kernels of 1-3 µs each on an H200, most of it
launch and drain (BENCHMARKS.md, issue 11). This kernel does the same selection in one
launch, one program (one warpgroup) per row of the batch.

How, exactly (ties to the lower key, as ``tree_top_k``): the row is cut into 128 *slabs*
of ``W`` contiguous entries. A slab's best entry is its maximum, ties to the lower key. The
``k`` slabs whose best entries rank highest (by value desc, key asc, then slab asc) hold the
top k entries: an entry outside them is beaten by each of those ``k`` best entries. So a
level ranks its (64 or 128) slab bests (all pairs, in registers), copies the chosen slabs
from global memory into the next level's buffer (TMA, one copy per slab), and the next
level cuts that buffer into narrower slabs. Once 16 slabs of 32 are left, each slab's best
16 are found (a rank among its 32), and those 256 entries are ranked all pairs (what
precedes a top-k entry is one, so their ranks are exact); the first ``k`` are written,
best first. (A row of ≤ 512 entries is ranked all pairs at once.)

Inputs are ``x [B, n_pad]`` float32 (``-inf`` padding) and ``keys [B or 1, n_pad]`` int32
(unique among finite entries; the indices when the caller has no keys). :func:`plan` says
whether a shape fits (``n ≤ 16,384``, ``k ≤ 16``); :func:`top_k` runs it or returns None.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from pallas_kernels import _platform

SLABS = 128            # slabs a level: two 64-row register tiles
FINAL_MAX = 512        # entries ranked all pairs at the end
MIN_WIDTH = 32         # float32 entries a gathered slab: 128 bytes, the least a copy moves
MAX_ENTRIES = 16384    # 128 slabs of 128 entries: 64 KB of values + 64 KB of keys in SMEM
MAX_K = 16             # slabs kept a level: 16 · (W / W') rows of the next, ≤ 128
INT_MAX = np.iinfo(np.int32).max


class Plan(NamedTuple):
  """``n_pad``: the padded row; ``widths``: the slab width of each level (level 0's
  buffer is ``[128, widths[0]]``; level ``ℓ+1``'s is ``[rows[ℓ+1], widths[ℓ+1]]``, the
  chosen slabs of level ``ℓ`` cut ``widths[ℓ] / widths[ℓ+1]`` rows each); ``final``: the
  entries ranked at the end."""
  n_pad: int
  widths: tuple
  rows: tuple
  final: int


def plan(n: int, k: int) -> Optional[Plan]:
  """The levels for the top ``k`` of ``n`` entries, or None when the kernel does not take
  the shape (``k > 16`` or ``n > 16,384``: use ``tree_top_k``). The kernel always keeps
  16 slabs a level (``k`` only has to fit), so every buffer is whole 64-row tiles, and no
  slab is narrower than 32 entries (Mosaic GPU's copies move multiples of 128 bytes)."""
  if not 1 <= k <= MAX_K or n < 1 or n > MAX_ENTRIES:
    return None
  if n <= FINAL_MAX:
    n_pad = 64 * -(-n // 64)
    return Plan(n_pad, (), (), n_pad)
  w = max(MIN_WIDTH, 1 << math.ceil(math.log2(-(-n // SLABS))))
  widths, rows = [w], [SLABS]
  while MAX_K * widths[-1] > FINAL_MAX:
    nxt = max(MIN_WIDTH, widths[-1] // 8)
    widths.append(nxt)
    rows.append(MAX_K * (widths[-2] // nxt))
  return Plan(SLABS * w, tuple(widths), tuple(rows), MAX_K * widths[-1])


def _kernel(p: Plan, batch: int, key_rows: int, index_keys: bool, interpret):
  """``index_keys``: the keys are the indices (``key_rows == 1``, ``keys = arange``):
  level 0 computes them instead of copying 4 bytes an entry."""
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  compiled = _platform.mosaic_interpret_params(interpret) is None
  lanes = _platform.LaneLayouts(compiled)
  wgmma, row_layout, col_layout = lanes.wgmma, lanes.row, lanes.col
  iota, cols_of, rows_of = lanes.iota, lanes.cols_of, lanes.rows_of
  levels = len(p.widths)
  k = MAX_K          # slabs kept a level

  def load2d(ref):       # an SMEM [64, W] block in the WGMMA register layout
    return plgpu.load(ref, (), layout=wgmma, optimized=False) if compiled else ref[...]

  def vec(ref, layout):  # a 1-D SMEM ref as a register vector
    return _platform.load_vector(ref, layout, compiled)

  def row_index(i):     # the row vector 64·i … 64·i + 63
    return (iota((64, 8), 0) + 64 * i).max(axis=1)

  def beats(a_val, a_key, b_val, b_key):
    """a before b: value desc, then key asc."""
    return (a_val > b_val) | ((a_val == b_val) & (a_key < b_key))

  def precedes(a_val, a_key, a_pos, b_val, b_key, b_pos):
    """a before b: value desc, key asc, position asc (a strict total order)."""
    return beats(a_val, a_key, b_val, b_key) | (
        (a_val == b_val) & (a_key == b_key) & (a_pos < b_pos))

  def rank_into(val_ref, key_ref, n, rank_ref, by_position=True):
    """rank_ref[i] = the number of the n entries that precede entry i. Without
    ``by_position`` entries equal in value and key share a rank (then a slot may hold
    either, or none): only ``-inf`` entries can be equal, keys being unique among the
    finite ones, and the position compare is a third of the work."""
    for i in range(n // 64):
      e_val = vec(val_ref.at[pl.ds(64 * i, 64)], row_layout)
      e_key = vec(key_ref.at[pl.ds(64 * i, 64)], row_layout)
      rank = None
      for j in range(-(-n // 128)):
        w = min(128, n - 128 * j)
        p_val = vec(val_ref.at[pl.ds(128 * j, w)], col_layout)
        p_key = vec(key_ref.at[pl.ds(128 * j, w)], col_layout)
        a_val, a_key, b_val, b_key = (cols_of(p_val, w), cols_of(p_key, w),
                                      rows_of(e_val, w), rows_of(e_key, w))
        if by_position:
          before = precedes(a_val, a_key, iota((64, w), 1) + 128 * j,
                            b_val, b_key, iota((64, w), 0) + 64 * i)
        else:
          before = beats(a_val, a_key, b_val, b_key)
        part = jnp.where(before, 1, 0).sum(axis=1)
        rank = part if rank is None else rank + part
      rank_ref[pl.ds(64 * i, 64)] = rank

  def slots(rank_ref, val_ref, n, fill, dtype):
    """Row vector [64]: slot t holds the entry of rank t from val_ref (fill past n)."""
    out = None
    for j in range(-(-n // 128)):
      w = min(128, n - 128 * j)
      hit = cols_of(vec(rank_ref.at[pl.ds(128 * j, w)], col_layout), w) == iota((64, w), 0)
      v = cols_of(vec(val_ref.at[pl.ds(128 * j, w)], col_layout), w)
      part = jnp.where(hit, v, jnp.asarray(fill, dtype)).max(axis=1)
      out = part if out is None else jnp.maximum(out, part)
    return out

  def sort_slabs(val_ref, key_ref, rank_ref, w, out_val, out_key):
    """The best ``k`` entries of each of ``k`` slabs of ``w`` (``val_ref``, ``w`` = 32:
    two slabs a 64-row tile), best first, into ``out_*[16·t:16·t+16]`` for slab ``t``.

    Why it is enough: an entry that precedes one of the top ``k`` is one of them, and each
    of the top ``k`` is among its slab's best ``k``; so ranking these ``k·k`` entries among
    themselves ranks the top ``k`` exactly (the rest rank ``≥ k``), at a quarter of the
    pairs of ranking all ``k·w``."""
    assert w == 32, w
    half = iota((64, w), 0) < 32
    for i in range(k * w // 64):     # each entry's rank among its 32 slab-mates
      mate = lambda ref: jnp.where(  # noqa: E731
          half, cols_of(vec(ref.at[pl.ds(64 * i, w)], col_layout), w),
          cols_of(vec(ref.at[pl.ds(64 * i + 32, w)], col_layout), w))
      e_val = rows_of(vec(val_ref.at[pl.ds(64 * i, 64)], row_layout), w)
      e_key = rows_of(vec(key_ref.at[pl.ds(64 * i, 64)], row_layout), w)
      m_val, m_key = mate(val_ref), mate(key_ref)
      before = beats(m_val, m_key, e_val, e_key)
      rank_ref[pl.ds(64 * i, 64)] = jnp.where(before, 1, 0).sum(axis=1)
    group = iota((64, w), 0) // k                    # 4 slabs an output tile
    want = rows_of((iota((64, 8), 0) % k).max(axis=1), w)
    for o in range(k // 4):
      def pick(ref):
        out = None
        for g in range(4):
          v = cols_of(vec(ref.at[pl.ds((4 * o + g) * w, w)], col_layout), w)
          out = v if out is None else jnp.where(group == g, v, out)
        return out
      hit = pick(rank_ref) == want
      out_val[pl.ds(64 * o, 64)] = jnp.where(hit, pick(val_ref), -jnp.inf).max(axis=1)
      out_key[pl.ds(64 * o, 64)] = jnp.where(hit, pick(key_ref),
                                             jnp.iinfo(jnp.int32).min).max(axis=1)

  def body(x_gmem, key_gmem, *rest):
    views = rest[:levels]        # x as [B, n_pad / W, W] for each level's width
    key_views = rest[levels:2 * levels]
    val_out, key_out = rest[2 * levels:2 * levels + 2]
    b = lax.axis_index("row")
    kb = b if key_rows > 1 else 0

    def scoped(bufs, kbufs, sval, skey, spos, srank, goff, fval, fkey, frank, oval, okey,
               cval, ckey, *bars):
      # one barrier a copy, never reused: a group for the row's first copies, then one a
      # level (its 2·16 gathers; Mosaic GPU allows 32 barriers a group)
      bar_i = iter([(g, i) for g in range(len(bars)) for i in range(bars[g].shape[0])])

      def fetch(src, dst):
        g, i = next(bar_i)
        bar = bars[g].at[i]
        plgpu.copy_gmem_to_smem(src, dst, bar)
        return bar

      # level 0: the whole row, [128, W0] (or the final buffer when no level is needed)
      if levels:
        pending = [fetch(views[0].at[b], bufs[0])]
        if not index_keys:
          pending.append(fetch(key_views[0].at[kb], kbufs[0]))
      else:
        pending = []
        for lo in range(0, p.final, 256):   # (a copy's box spans at most 256 entries)
          part = pl.ds(lo, min(256, p.final - lo))
          pending += [fetch(x_gmem.at[b, part], fval.at[part]),
                      fetch(key_gmem.at[kb, part], fkey.at[part])]
      for bar in pending:
        plgpu.barrier_wait(bar)

      for lv in range(levels):
        w, nrows = p.widths[lv], p.rows[lv]
        # slab bests: max, then the lowest key among the entries at the max
        for i in range(nrows // 64):
          v = load2d(bufs[lv].at[pl.ds(64 * i, 64), :])
          if lv == 0 and index_keys:
            kk = rows_of(row_index(i) * w, w) + iota((64, w), 1)
          else:
            kk = load2d(kbufs[lv].at[pl.ds(64 * i, 64), :])
          m = v.max(axis=1)
          sval[pl.ds(64 * i, 64)] = m
          skey[pl.ds(64 * i, 64)] = jnp.where(v == rows_of(m, w), kk, INT_MAX).min(axis=1)
          if lv == 0:
            spos[pl.ds(64 * i, 64)] = row_index(i) * w
        rank_into(sval, skey, nrows, srank)
        # the k best slabs' offsets in the row (level 0: slab · W0; later: the parent's
        # offset + the row's place in it, kept in spos by the previous level)
        goff[...] = slots(srank, spos, nrows, -1, jnp.int32)
        pending = []
        if lv + 1 < levels:
          w2, rows2 = p.widths[lv + 1], p.rows[lv + 1]
          per = w // w2
          for t in range(k):
            off = goff[t]
            rows_at = pl.ds(off // w2, per)
            dst = pl.ds(t * per, per)
            pending.append(fetch(views[lv + 1].at[b, rows_at, :], bufs[lv + 1].at[dst, :]))
            pending.append(fetch(key_views[lv + 1].at[kb, rows_at, :], kbufs[lv + 1].at[dst, :]))
          # the next level's slab offsets: parent offset + row within it · w2
          for i in range(rows2 // 64):
            r = row_index(i)
            hit = iota((64, 64), 1) == rows_of(r // per, 64)
            base = jnp.where(hit, cols_of(vec(goff, col_layout), 64), -1).max(axis=1)
            spos[pl.ds(64 * i, 64)] = base + (r % per) * w2
        else:
          for t in range(k):
            off = goff[t]
            dst = pl.ds(t * w, w)
            pending.append(fetch(x_gmem.at[b, pl.ds(off, w)], fval.at[dst]))
            pending.append(fetch(key_gmem.at[kb, pl.ds(off, w)], fkey.at[dst]))
        for bar in pending:
          plgpu.barrier_wait(bar)

      n = p.final
      if levels:   # 16 slabs of W: each slab's best 16, then the 256 ranked
        sort_slabs(fval, fkey, frank, p.widths[-1], cval, ckey)
        fval, fkey, n = cval, ckey, k * k
      rank_into(fval, fkey, n, frank, by_position=False)
      oval[...] = slots(frank, fval, n, -jnp.inf, jnp.float32)
      okey[...] = slots(frank, fkey, n, jnp.iinfo(jnp.int32).min, jnp.int32)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(oval, val_out.at[b])
      plgpu.copy_smem_to_gmem(okey, key_out.at[b])
      plgpu.wait_smem_to_gmem(0)

    bufs = [plgpu.SMEM((r, w), jnp.float32) for r, w in zip(p.rows, p.widths)]
    # (index keys: level 0 computes its keys, so its key buffer is a stub, never used)
    kbufs = [plgpu.SMEM((64, 8) if lv == 0 and index_keys else (r, w), jnp.int32)
             for lv, (r, w) in enumerate(zip(p.rows, p.widths))]
    barriers = [plgpu.Barrier(num_barriers=4)] + [plgpu.Barrier(num_barriers=2 * k)
                                                   for _ in range(levels)]
    pl.run_scoped(
        lambda *refs: scoped(refs[:levels], refs[levels:2 * levels], *refs[2 * levels:]),
        *bufs, *kbufs,
        plgpu.SMEM((SLABS,), jnp.float32), plgpu.SMEM((SLABS,), jnp.int32),
        plgpu.SMEM((SLABS,), jnp.int32), plgpu.SMEM((SLABS,), jnp.int32),
        plgpu.SMEM((64,), jnp.int32),
        plgpu.SMEM((p.final,), jnp.float32), plgpu.SMEM((p.final,), jnp.int32),
        plgpu.SMEM((p.final,), jnp.int32),
        plgpu.SMEM((64,), jnp.float32), plgpu.SMEM((64,), jnp.int32),
        plgpu.SMEM((k * k,), jnp.float32), plgpu.SMEM((k * k,), jnp.int32),
        *barriers)

  return plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((batch, 64), jnp.float32),
                jax.ShapeDtypeStruct((batch, 64), jnp.int32)),
      grid=(batch,), grid_names=("row",),
      compiler_params=_platform.lane_params() if compiled else None,
      interpret=_platform.mosaic_interpret_params(interpret))


def top_k(x_bn, k: int, keys_bn=None, interpret=None):
  """``(values [B, k'], keys [B, k'])`` of the top ``k' = min(k, n)`` of each row, best
  first, ties to the lower key (``keys_bn`` int32 ``[B, n]``, unique among finite entries;
  None: the indices), as :func:`pallas_kernels.route_tail.tree_top_k`; or None when
  :func:`plan` rejects the shape. Past the finite entries values are ``-inf`` (keys
  arbitrary; with no keys, indices clipped to ``n - 1``). NaN not allowed."""
  b, n = x_bn.shape
  kk = min(k, n)
  p = plan(n, kk)
  if p is None:
    return None
  pad = ((0, 0), (0, p.n_pad - n))
  x = jnp.pad(x_bn.astype(jnp.float32), pad, constant_values=-jnp.inf)
  if keys_bn is None:
    keys = jnp.asarray(np.arange(p.n_pad, dtype=np.int32)[None])   # a constant
  else:
    keys = jnp.pad(keys_bn.astype(jnp.int32), pad, constant_values=INT_MAX)
  views = [x.reshape(b, p.n_pad // w, w) for w in p.widths]
  key_views = [keys.reshape(keys.shape[0], p.n_pad // w, w) for w in p.widths]
  val, key = _kernel(p, b, keys.shape[0], keys_bn is None, interpret)(
      x, keys, *views, *key_views)
  val, key = val[:, :kk], key[:, :kk]
  return val, (jnp.minimum(key, n - 1) if keys_bn is None else key)
