"""The unfused chunk-score kernels (Mosaic GPU): a ``K̄R`` tile × the queries → the max over
query columns, one ``[tile]`` vector of chunk scores per tile.

``chunk_max_call`` reads bf16 keys; ``chunk_max_quant_call`` reads fp8 e4m3 / int8 codes
against queries quantised per column to the same dtype. Each runs in one of two shells:
one program per (tile, pass) (``_chunk_max_kernel``), or with ``BlockSizes.persistent``
a few programs each streaming a run of tiles (``_persistent_kernel``). Their callers, the queries' layout, tiling and the ragged tail are
in :mod:`pallas_kernels.block_routing` (``chunk_scores``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _platform
from pallas_kernels import block_top_k

if TYPE_CHECKING:
  from pallas_kernels.block_routing import BlockSizes



def _scores_kernel(per_program, grid, grid_names, num_tiles: int, tile_c: int, passes: int,
                   interpret, compiler_params=None):
  """A ``plgpu.kernel`` writing ``[passes, num_tiles·tile_c]`` float32 chunk scores:
  ``per_program(out_smem, out_gmem, in_gmem_refs)`` runs in each program of ``grid`` with
  an SMEM ``[tile_c]`` float32 buffer for the scores on their way out."""
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()

  def body(*refs):
    *in_refs, out_gmem = refs
    pl.run_scoped(lambda out_smem: per_program(out_smem, out_gmem, in_refs),
                  plgpu.SMEM((tile_c,), jnp.float32))

  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((passes, num_tiles * tile_c), jnp.float32),
      grid=grid,
      grid_names=grid_names,
      compiler_params=compiler_params,
      interpret=_platform.mosaic_interpret_params(interpret),
  )


def _chunk_max_kernel(fill_tile, num_tiles: int, tile_c: int, passes: int, interpret,
                      compiler_params=None):
  """The per-tile chunk-score kernels' shell: one program per (tile, pass) writes ``tile_c``
  chunk scores. ``fill_tile(tile, p, out_smem, *in_gmem_refs)`` computes them into
  ``out_smem`` (SMEM ``[tile_c]`` float32); the shell copies them to
  ``out[p, tile·tile_c:]`` of the ``[passes, num_tiles·tile_c]`` output."""
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()

  def per_program(out_smem, out_gmem, in_refs):
    tile = lax.axis_index("tile")
    p = lax.axis_index("pass")
    fill_tile(tile, p, out_smem, *in_refs)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[p, pl.ds(tile * tile_c, tile_c)])
    plgpu.wait_smem_to_gmem(0)

  return _scores_kernel(per_program, (num_tiles, passes), ("tile", "pass"), num_tiles, tile_c,
                        passes, interpret, compiler_params)


def _persistent_kernel(num_tiles: int, tile_c: int, num_f: int, passes: int, bs: BlockSizes,
                       interpret, in_specs, operands, accumulate, tile_scores, acc0,
                       compiler_params=None):
  """The persistent shell: ``bs.blocks`` programs a pass (0: one per SM), each streaming
  its contiguous run of tiles through ONE pipeline over ``(tile, feature step)``.

  ``in_specs(tile_of)``: the BlockSpecs over ``(g, j)`` (``tile_of(g)`` the bank tile of
  the program's g-th); ``operands(p, *in_gmem_refs)``: the refs they slice;
  ``accumulate(acc, *smem)``: one feature step into the carried accumulator;
  ``tile_scores(acc, *smem)``: the tile's ``[tile_c]`` scores after its last step;
  ``acc0()``: the zero accumulator (built inside the kernel: no captured constants). Each
  tile's scores leave through one SMEM buffer by an asynchronous copy, waited for (long
  done) only before the next tile's overwrite it; the last program may repeat the final
  tile (the same values to the same place)."""
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  blocks, per_block = block_top_k.num_blocks_for(num_tiles, bs.blocks)

  def per_program(out_smem, out_gmem, in_refs):
    blk = lax.axis_index("block")
    p = lax.axis_index("pass")

    def tile_of(g):
      return jnp.minimum(blk * per_block + g, num_tiles - 1)

    def step(idx, *smem_and_acc):
      g, j = idx
      *smem, acc = smem_and_acc
      acc = accumulate(acc, *smem)
      last_f = j == num_f - 1

      @pl.when(last_f)
      def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous tile's copy
        out_smem[...] = tile_scores(acc, *smem)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[p, pl.ds(tile_of(g) * tile_c, tile_c)])
      return acc * jnp.where(last_f, 0, 1).astype(acc.dtype)

    plgpu.emit_pipeline(
        step, grid=(per_block, num_f), in_specs=in_specs(tile_of),
        max_concurrent_steps=min(bs.stages, per_block * num_f), init_carry=acc0(),
    )(*operands(p, *in_refs))
    plgpu.wait_smem_to_gmem(0)

  return _scores_kernel(per_program, (blocks, passes), ("block", "pass"), num_tiles, tile_c,
                        passes, interpret, compiler_params)


def chunk_max_call(num_tiles: int, f: int, cols: int, passes: int, bs: BlockSizes, interpret):
  """``plgpu.kernel`` computing ``out[p, c] = max_j kr[c]·q[p, :, j]`` for full tiles of
  bf16 keys: one program per (tile, pass), or with ``bs.persistent`` a persistent kernel
  (:func:`_persistent_kernel`): no program ends and starts between tiles, so the copies of
  a tile's first steps are in flight while the previous tile's last steps multiply.

  Why the persistent one: with one program per tile (192 KB of pipeline buffers, one
  program an SM) each of the ~118 tiles an SM takes at 100M tokens starts with an empty
  pipeline; the kernel ran 912 µs against a pure read's 890 (H200, 2026-12-05). Not yet
  run on a GPU (``BlockSizes.persistent``, off by default).
  """
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  tile_c, tile_f = bs.chunks, bs.features
  num_f = f // tile_f
  k_transforms = _platform.swizzle_transforms(tile_f, 2)
  q_transforms = _platform.swizzle_transforms(cols, 2)

  def specs(k_index, q_index):
    return [plgpu.BlockSpec((tile_c, tile_f), k_index, transforms=k_transforms),
            plgpu.BlockSpec((tile_f, cols), q_index, transforms=q_transforms)]

  def operands(p, kr_gmem, q_gmem):
    return kr_gmem.at[pl.ds(0, num_tiles * tile_c)], q_gmem.at[p]

  if bs.persistent:
    compiled = _platform.mosaic_interpret_params(interpret) is None

    def accumulate(acc, k_smem, q_smem):
      acc = _platform.mma_accumulate(acc, k_smem, q_smem, compiled=compiled)
      if compiled:
        plgpu.wgmma_wait(0)
      return acc

    return _persistent_kernel(
        num_tiles, tile_c, num_f, passes, bs, interpret,
        in_specs=lambda tile_of: specs(lambda g, j: (tile_of(g), j), lambda g, j: (j, 0)),
        operands=operands, accumulate=accumulate,
        tile_scores=lambda acc, k_smem, q_smem: acc.max(axis=1),
        acc0=lambda: _platform.layout_cast(jnp.zeros((tile_c, cols), jnp.float32),
                                           plgpu.Layout.WGMMA if compiled else None, compiled),
        compiler_params=_platform.lane_params() if compiled else None)

  def fill_tile(tile, p, out_smem, kr_gmem, q_gmem):
    def with_acc(acc_ref):
      def step(_, k_smem, q_smem):
        plgpu.wgmma(acc_ref, k_smem, q_smem)
        plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(
          step,
          grid=(num_f,),
          in_specs=specs(lambda j: (tile, j), lambda j: (j, 0)),
          max_concurrent_steps=min(bs.stages, num_f),
      )(*operands(p, kr_gmem, q_gmem))
      return acc_ref[...].max(axis=1)

    out_smem[...] = pl.run_scoped(with_acc, plgpu.ACC((tile_c, cols), jnp.float32))

  return _chunk_max_kernel(fill_tile, num_tiles, tile_c, passes, interpret)


def chunk_max_quant_call(num_tiles: int, f: int, cols: int, passes: int, bs: BlockSizes,
                          key_dtype: str, query_terms: int, interpret):
  """``plgpu.kernel`` for quantised keys:
  ``out[p, c] = kr_scale[c] · max_j q_scale[p, j] · codes[c]·q[p, j]``.

  Inputs: ``kr [≥ num_tiles·tile_c, F]`` fp8 e4m3 / int8 codes, ``query_terms`` query
  operands ``[passes, cols, F]`` of the same dtype (K-major, as 8-bit wgmma reads both
  operands), ``q_scale [passes, cols]`` float32, ``kr_scale [≥ num_tiles·tile_c]`` float32.
  The chunk's own (positive) scale commutes with the max and multiplies the tile's maxima
  in registers (an XLA multiply of the ``[B, C]`` scores after the kernel, fused into the
  tail's first reduction, took that reduction from 10 to 30-37 µs of device time at 2M
  chunks on the H200, 2026-12-04). int8 accumulates exactly in s32; fp8
  sums each term of each K step from a fresh accumulator in float32 registers
  (``block_top_k.fp8_accumulate``), as the fused kernel does. ``bs.persistent``: as a
  persistent kernel (:func:`_persistent_kernel`; compiled tests pass, but on an H100 at 100M
  tokens it took 1.26 x its keys' read against 1.12 x for the default, 2026-12-05), else
  one program per (tile, pass).
  """
  import jax.experimental.pallas as pl
  plgpu = _platform.plgpu()
  tile_c, tile_f = bs.chunks, bs.features
  num_f = f // tile_f
  fp8 = key_dtype == "float8_e4m3fn"
  acc_dtype = jnp.float32 if fp8 else jnp.int32
  transforms = _platform.swizzle_transforms(tile_f, 1)
  compiled = _platform.mosaic_interpret_params(interpret) is None
  wgmma_layout = plgpu.Layout.WGMMA if compiled else None
  col_layout = plgpu.Layout.WGMMA.reduce(0) if compiled else None
  row_layout = plgpu.Layout.WGMMA.reduce(1) if compiled else None
  cast = lambda x, layout: _platform.layout_cast(x, layout, compiled)  # noqa: E731
  params = _platform.lane_params() if compiled else None
  acc0 = lambda: cast(jnp.zeros((tile_c, cols), acc_dtype), wgmma_layout)  # noqa: E731

  def accumulate(acc, k_smem, *rest):     # rest: the query terms, q_scale, kr_scale
    q_smems = rest[:query_terms]
    if compiled and fp8:
      return block_top_k.fp8_accumulate(acc, k_smem, q_smems)
    if compiled:
      rhs = plgpu.transpose_ref(q_smems[0], (1, 0))
      acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, k_smem, rhs))(plgpu.ACC.init(acc))
      plgpu.wgmma_wait(0)
      return acc
    for q in q_smems:   # the interpreter's wgmma takes no transposed views: a plain dot
      acc = acc + jnp.dot(k_smem[...].astype(acc_dtype), q[...].astype(acc_dtype).T,
                          preferred_element_type=acc_dtype)
    return acc

  def tile_scores(acc, k_smem, *rest):
    qs_smem, ks_smem = rest[query_terms], rest[query_terms + 1]
    q_scale = cast(lax.broadcast_in_dim(cast(qs_smem[...], col_layout), (tile_c, cols), [1]),
                   wgmma_layout)
    return (acc.astype(jnp.float32) * q_scale).max(axis=1) * cast(ks_smem[...], row_layout)

  def specs(k_index, q_index, scale_index, chunk_index):
    return [plgpu.BlockSpec((tile_c, tile_f), k_index, transforms=transforms),
            *[plgpu.BlockSpec((cols, tile_f), q_index, transforms=transforms)
              for _ in range(query_terms)],
            plgpu.BlockSpec((cols,), scale_index), plgpu.BlockSpec((tile_c,), chunk_index)]

  def operands(p, kr_gmem, *refs):
    q_gmems, qs_gmem, ks_gmem = refs[:query_terms], refs[query_terms], refs[query_terms + 1]
    return (kr_gmem.at[pl.ds(0, num_tiles * tile_c)], *(q.at[p] for q in q_gmems),
            qs_gmem.at[p], ks_gmem.at[pl.ds(0, num_tiles * tile_c)])

  if bs.persistent:
    return _persistent_kernel(
        num_tiles, tile_c, num_f, passes, bs, interpret,
        in_specs=lambda tile_of: specs(lambda g, j: (tile_of(g), j), lambda g, j: (0, j),
                                       lambda g, j: (0,), lambda g, j: (tile_of(g),)),
        operands=operands, accumulate=accumulate, tile_scores=tile_scores, acc0=acc0,
        compiler_params=params)

  def fill_tile(tile, p, out_smem, *in_refs):
    def step(idx, *smem_and_acc):
      (j,) = idx
      *smem, acc = smem_and_acc
      acc = accumulate(acc, *smem)

      @pl.when(j == num_f - 1)
      def _():
        out_smem[...] = tile_scores(acc, *smem)
      return acc

    plgpu.emit_pipeline(
        step, grid=(num_f,),
        in_specs=specs(lambda j: (tile, j), lambda j: (0, j), lambda j: (0,),
                       lambda j: (tile,)),
        max_concurrent_steps=min(bs.stages, num_f), init_carry=acc0(),
    )(*operands(p, *in_refs))

  return _chunk_max_kernel(fill_tile, num_tiles, tile_c, passes, interpret, params)
