"""The routing kernels' queries against quantised keys, and their numerics in plain XLA.

Both routing kernels (``block_top_k``'s fused one and ``chunk_max``'s unfused one) read
``K̄R`` as bf16, or as fp8 e4m3 / int8 codes with a per-chunk scale; queries against codes
are quantised per column to the keys' dtype (:func:`route_queries`). ``fused_chunk_scores``
computes what the kernels compute per chunk, in plain XLA: it scores a bank's ragged tail
and is the kernels' numerics reference in tests.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

QUANT_KEY_DTYPES = ("float8_e4m3fn", "int8")   # K̄R codes the kernel reads with a per-chunk scale


class RouteQueries(NamedTuple):
  """The fused kernel's queries per example, before they are laid out for the kernel.

  q_bgjf: ``[B, groups, cols, F]``: bf16 for bf16 keys, else codes in the keys' dtype
    (masked and padding rows already filled with a valid row of the example).
  scale_bgj: float32 ``[B, groups, cols]`` per-column scales of quantised queries, or None.
  lo_bgjf: fp8 only, or None: the rounding residual ``q/scale - q_bgjf`` in e4m3 at the same
    scale (a second term: the query is ``scale · (hi + lo)``).
  """

  q_bgjf: jax.Array
  scale_bgj: jax.Array | None
  lo_bgjf: jax.Array | None = None


def route_queries(q_bgjf, key_dtype, fp8_terms: int = 2) -> RouteQueries:
  """:class:`RouteQueries` for keys of ``key_dtype``: bf16 queries for float keys;
  fp8 e4m3 / int8 codes with a float32 scale per query column for quantised keys
  (symmetric, ``amax/QMAX``, as the keys: ``msa_jax.inference.quantize``).

  ``fp8_terms=2`` adds the e4m3 residual as a second term: a query in e4m3 alone is off
  by up to 2^-4 relative per element (on random 1024-wide keys that moved ~2 of 100
  top-16 chunks beyond what the fp8 keys themselves move); ``hi + lo`` is within ~2^-8
  and costs a second fp8 wgmma per tile (the bf16 matmul's tensor time, no conversion).
  int8 queries (half a step of ``amax/127``) route as float queries do: one term.
  """
  from msa_jax.inference import quantize
  name = jnp.dtype(key_dtype).name
  if name not in QUANT_KEY_DTYPES:
    return RouteQueries(q_bgjf.astype(jnp.bfloat16), None)
  if fp8_terms not in (1, 2):
    raise ValueError(f"fp8_terms must be 1 or 2, got {fp8_terms}")
  codes, scale = quantize.quantise_jax(q_bgjf, name, 1)
  if name != "float8_e4m3fn" or fp8_terms == 1:
    return RouteQueries(codes, scale)
  rest = q_bgjf.astype(jnp.float32) / scale[..., None] - codes_to_float32(codes)
  return RouteQueries(codes, scale, rest.astype(jnp.float8_e4m3fn))


# float32 value of every e4m3 bit pattern (NaN for the two NaN codes), from ml_dtypes
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32)


def codes_to_float32(codes):
  """The exact float32 values of key/query codes, also inside a jitted GPU program.

  fp8 codes are looked up by their bits, not converted: XLA's GPU pipeline folds a chain of
  float converts ``f32 → e4m3 → f32`` into the identity (SimplifyFPConversions, run while
  ``xla_allow_excess_precision`` is on, the default), so where a code and its float value are
  made in one program ``code.astype(f32)`` is the unrounded input. That made the query
  residual ``q/scale - code`` zero on the H200 (BENCHMARKS.md, "fp8 mismatch: analysis").
  Other dtypes (int8: an integer convert, never folded) are cast.
  """
  if jnp.dtype(codes.dtype) != jnp.float8_e4m3fn:
    return codes.astype(jnp.float32)
  return jnp.asarray(_E4M3_VALUES)[lax.bitcast_convert_type(codes, jnp.uint8)]


def fused_chunk_scores(queries: RouteQueries, kr_cf, kr_scale_c=None):
  """What the fused kernel computes per chunk, in plain XLA: ``[B, C]`` float32.

  ``max over (group, column) of q·K̄R``: bf16 operands with float32 accumulation, or for
  codes ``kr_scale · max_j (q_scale_j · codes·q_j)`` (exact products, float32 sums).
  Scores the ragged tail of a bank, and is the kernel's numerics reference in tests.
  """
  s_bc = column_scores(queries, kr_cf).max(axis=(1, 2))
  return s_bc if kr_scale_c is None else s_bc * kr_scale_c[None].astype(jnp.float32)


def column_scores(queries: RouteQueries, kr_cf):
  """Each query column's score of each chunk as the routing kernels compute it, before the
  max over columns and the chunk's scale: float32 ``[B, groups, cols, C]`` (bf16 operands
  with float32 accumulation; for codes ``q_scale_j · codes·q_j``, exact products)."""
  if queries.scale_bgj is None:
    s_bgjc = jnp.einsum("bgjf,cf->bgjc", queries.q_bgjf.astype(jnp.bfloat16),
                        kr_cf.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
  else:
    # codes_to_float32, not astype: exact values under jit on a GPU too, and float32
    # operands that XLA cannot turn back into an fp8 (cuBLASLt) matmul
    q = codes_to_float32(queries.q_bgjf)
    if queries.lo_bgjf is not None:
      q = q + codes_to_float32(queries.lo_bgjf)     # exact: hi and lo are e4m3
    s_bgjc = jnp.einsum("bgjf,cf->bgjc", q, codes_to_float32(kr_cf),
                        precision=lax.Precision.HIGHEST)
    s_bgjc = s_bgjc * queries.scale_bgj[..., None]
  return s_bgjc
