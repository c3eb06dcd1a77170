"""Bank precisions: symmetric per-row quantisation of pooled keys and values (issue 11).

A bank stores each router layer's ``K̄R`` ``[C, F]`` and ``K̄``/``V̄`` ``[C, Hkv, D]`` either
in a float dtype (the model dtype by default, no scale) or quantised with a float32 scale
per *row group*:

  * ``K̄R`` in ``float8_e4m3fn`` or ``int8`` with one scale per chunk (``[C]``);
  * ``K̄``/``V̄`` in ``int8`` with one scale per (chunk, kv-head) (``[C, Hkv]``).

``x ≈ scale · q``, ``scale = amax(|x|) · (1/QMAX)`` over the group (``QMAX`` 127 for int8, 448
for e4m3), ``q = round(x / scale)`` (int8: round half to even, clipped; e4m3: the cast's own
rounding). A group that is all zero gets scale 1 (so a scale is always a positive finite
number: routing multiplies scores by it, and ``0 · -inf`` would be NaN).

A per-chunk scale makes quantised routing exact in structure: ``rq · (s_c q_c) = s_c (rq ·
q_c)`` and ``s_c > 0`` commutes with the max over routing tokens, so the router scores the
quantised keys and multiplies each chunk's score by its scale (``bank_routing``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
KR_DTYPES = FLOAT_DTYPES + ("float8_e4m3fn", "int8")
KV_DTYPES = FLOAT_DTYPES + ("int8",)
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
SCALE_DTYPE = "float32"


def is_quantised(dtype: str) -> bool:
  """Whether a bank dtype stores codes plus a scale (``int8``, ``float8_e4m3fn``)."""
  return dtype in QMAX


def check_dtype(dtype: str, kind: str) -> str:
  """``dtype`` if a bank may store ``kind`` (``"kr"`` or ``"kv"``) in it, else a clear error."""
  allowed = KR_DTYPES if kind == "kr" else KV_DTYPES
  if dtype not in allowed:
    flag = "--kr_dtype" if kind == "kr" else "--kv_dtype"
    raise ValueError(f"{flag}={dtype!r} is not a bank precision for {'K̄R' if kind == 'kr' else 'K̄/V̄'}; "
                     f"choose one of {', '.join(allowed)}")
  return dtype


# The error for keys/values that are NaN or inf (host quantisation and the encoder's check).
NON_FINITE = ("cannot quantise non-finite keys/values (NaN or inf in the encoder's output); "
              "check the checkpoint")


def np_dtype(name: str) -> np.dtype:
  """The numpy dtype of a bank precision name (ml_dtypes for bfloat16 and fp8)."""
  import jax.numpy as jnp
  return np.dtype(jnp.dtype(name))


def quantise(x: np.ndarray, dtype: str, group_ndim: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """``(codes, scale)`` of ``x`` in ``dtype``; the scale covers the last ``group_ndim`` axes.

  ``K̄R [C, F]`` per chunk: ``group_ndim=1`` (scale ``[C]``); ``K̄ [C, Hkv, D]`` per (chunk,
  head): ``group_ndim=1`` (scale ``[C, Hkv]``). A float ``dtype`` returns ``(x cast, None)``.
  """
  if not is_quantised(dtype):
    return np.asarray(x).astype(np_dtype(dtype)), None
  x = np.asarray(x, np.float32)
  axes = tuple(range(x.ndim - group_ndim, x.ndim))
  amax = np.max(np.abs(x), axis=axes) if x.size else np.zeros(x.shape[:x.ndim - group_ndim])
  if not np.all(np.isfinite(amax)):
    raise ValueError(NON_FINITE)
  # amax times the float32 reciprocal, as XLA computes a division by a constant
  scale = np.where(amax > 0, amax * np.float32(1 / QMAX[dtype]), 1.0).astype(np.float32)
  y = x / scale.reshape(scale.shape + (1,) * group_ndim)
  if dtype == "int8":
    codes = np.clip(np.rint(y), -127, 127).astype(np.int8)
  else:
    codes = np.clip(y, -QMAX[dtype], QMAX[dtype]).astype(np_dtype(dtype))
  return codes, scale


def dequantise_np(codes: np.ndarray, scale: Optional[np.ndarray], dtype=np.float32) -> np.ndarray:
  """``scale · codes`` in ``dtype`` (numpy; ``scale=None``: a plain cast)."""
  x = np.asarray(codes).astype(np.float32)
  if scale is not None:
    x = x * scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))
  return x.astype(dtype)


def dequantise(codes, scale, dtype):
  """``scale · codes`` in ``dtype`` (jax, on the device; ``scale=None``: a plain cast)."""
  import jax.numpy as jnp
  if scale is None:
    return codes.astype(dtype)
  x = codes.astype(jnp.float32) * scale.reshape(scale.shape + (1,) * (codes.ndim - scale.ndim))
  return x.astype(dtype)


def quantise_jax(x, dtype: str, group_ndim: int):
  """:func:`quantise` on the device (jax): the same codes and scales, ``(x cast, None)`` for
  a float ``dtype``. Used where a bank is built on the device (``benchmarks.synth_bank``)."""
  import jax.numpy as jnp
  if not is_quantised(dtype):
    return x.astype(dtype), None
  x = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - group_ndim, x.ndim))
  amax = jnp.max(jnp.abs(x), axis=axes)
  scale = jnp.where(amax > 0, amax * np.float32(1 / QMAX[dtype]), 1.0).astype(jnp.float32)
  y = x / scale.reshape(scale.shape + (1,) * group_ndim)
  if dtype == "int8":
    codes = jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8)
  else:
    codes = jnp.clip(y, -QMAX[dtype], QMAX[dtype]).astype(dtype)
  return codes, scale
