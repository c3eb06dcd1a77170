"""Shared by the kernels: backend choice (``auto | pallas | xla``), interpret mode,
Mosaic GPU helpers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "pallas", "xla")


def on_gpu() -> bool:
  """True when the default JAX backend is a GPU."""
  return jax.default_backend() == "gpu"


def resolve(implementation: str) -> str:
  """Maps ``auto`` to ``pallas`` on a GPU and ``xla`` elsewhere; checks the name."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "auto":
    return "pallas" if on_gpu() else "xla"
  return implementation


def interpreting(interpret: bool | None) -> bool:
  """Whether a kernel asked with ``interpret`` runs interpreted: as asked, or (None) when
  no GPU is present."""
  return (not on_gpu()) if interpret is None else bool(interpret)


def mosaic_interpret_params(interpret: bool | None):
  """The ``interpret=`` value for ``plgpu.kernel``: None compiled, else GPU interpret mode.

  ``interpret=None`` means: interpret when no GPU is present (CPU tests). On a CPU,
  run interpreted kernels with ``jax.config.update("jax_cpu_enable_async_dispatch",
  False)`` set before JAX starts: the interpreter runs JAX ops inside host callbacks,
  and with async dispatch eager code that follows a kernel call can deadlock with them.
  """
  if not interpreting(interpret):
    return None
  try:  # exported in newer jax
    from jax.experimental.pallas import mosaic_gpu as plgpu
    params_cls = getattr(plgpu, "InterpretParams", None) or getattr(plgpu, "InterpretGPUParams")
  except AttributeError:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params_cls
  return params_cls()


def plgpu():
  """``jax.experimental.pallas.mosaic_gpu``, imported on first use (kernels only)."""
  from jax.experimental.pallas import mosaic_gpu
  return mosaic_gpu


def swizzle_transforms(minor_elems: int, itemsize: int = 2):
  """Tiling + swizzle transforms for an SMEM tile whose minor dim has ``minor_elems``."""
  mgpu = plgpu()
  swizzle = mgpu.find_swizzle(minor_elems * itemsize * 8)
  return (mgpu.TilingTransform((8, swizzle // itemsize)), mgpu.SwizzleTransform(swizzle))


def layout_cast(x, layout, compiled: bool):
  """``plgpu.layout_cast`` in compiled code; the interpreter has no layouts."""
  return plgpu().layout_cast(x, layout) if compiled else x


def wgmma_iota(shape, dim: int, compiled: bool):
  """int32 iota along ``dim`` in the WGMMA register layout (plain iota when interpreted)."""
  if compiled:
    return plgpu().broadcasted_iota(jnp.int32, shape, dim, layout=plgpu().Layout.WGMMA)
  return lax.broadcasted_iota(jnp.int32, shape, dim)


class LaneLayouts:
  """The register layouts of a lane-semantics kernel working on ``[64, n]`` WGMMA-layout
  arrays and their row / column vectors, with the casts, iotas and broadcasts between
  them; when interpreted (``compiled`` False) every layout is None and casts do nothing."""

  def __init__(self, compiled: bool):
    mgpu = plgpu() if compiled else None
    self.compiled = compiled
    self.wgmma = mgpu.Layout.WGMMA if compiled else None
    self.row = mgpu.Layout.WGMMA.reduce(1) if compiled else None      # a [64] row vector
    self.col = mgpu.Layout.WGMMA.reduce(0) if compiled else None      # an [n] column vector

  def cast(self, x, layout):
    return layout_cast(x, layout, self.compiled)

  def iota(self, shape, dim: int):
    return wgmma_iota(shape, dim, self.compiled)

  def cols_of(self, v, n: int, rows: int = 64):
    """A column-indexed vector broadcast over ``rows`` rows."""
    return self.cast(lax.broadcast_in_dim(v, (rows, n), [1]), self.wgmma)

  def rows_of(self, v, n: int):
    """A row-indexed ``[64]`` vector broadcast over ``n`` columns."""
    return self.cast(lax.broadcast_in_dim(v, (64, n), [0]), self.wgmma)


def load_vector(ref, layout, compiled: bool):
  """A 1-D SMEM ref as a register vector in ``layout`` (plain load when interpreted)."""
  return plgpu().load(ref, (), layout=layout) if compiled else ref[...]


def lane_params(**kwargs):
  """``CompilerParams`` with lane lowering semantics (explicit layouts).

  jax 0.11 defaults to warpgroup semantics, whose layout inference can take minutes on
  kernels with many register arrays; every kernel here casts its layouts explicitly.
  """
  mgpu = plgpu()
  return mgpu.CompilerParams(lowering_semantics=mgpu.LoweringSemantics.Lane, **kwargs)


def _dot_operand(x, transpose: bool, compiled: bool):
  if compiled:
    return plgpu().transpose_ref(x, (1, 0)) if transpose else x
  x = x if isinstance(x, jax.Array) else x[...]
  return x.T if transpose else x


def mma(a, b, out_shape, *, transpose_b: bool = False, compiled: bool):
  """``a @ b`` (``a @ bᵀ`` with ``transpose_b``) in float32 on the tensor cores.

  ``a`` is an SMEM ref or a bf16 register array in the WGMMA layout; ``b`` an SMEM
  ref. Interpreted (CPU tests), it is a plain ``jnp.dot`` of the values: the
  interpreter's wgmma takes no register operands and no transposed views.
  """
  if not compiled:
    return jnp.dot(_dot_operand(a, False, False), _dot_operand(b, transpose_b, False),
                   preferred_element_type=jnp.float32)
  import jax.experimental.pallas as pl
  mgpu = plgpu()

  def scope(acc_ref):
    mgpu.wgmma(acc_ref, a, _dot_operand(b, transpose_b, True))
    return acc_ref[...]
  return pl.run_scoped(scope, mgpu.ACC(out_shape, jnp.float32))


def mma_accumulate(acc, a, b, *, transpose_b: bool = False, compiled: bool):
  """``acc + a @ b`` (see :func:`mma`); compiled, it accumulates in place (no extra add)."""
  return mma_group((acc, a, b, transpose_b), compiled=compiled)[0]


def mma_group(*products, compiled: bool):
  """Several independent products issued together, waited for once: each ``(acc, a, b,
  transpose_b)`` gives ``acc + a @ b`` (``a @ bᵀ``); ``acc`` an f32 register array in the
  WGMMA layout (zeros for a fresh product). Compiled, one ``wgmma`` each into its own
  accumulator and a single wait for all (:func:`mma` waits after every product, so two
  independent products never overlap on the tensor cores); interpreted, plain dots."""
  if not compiled:
    return tuple(acc + mma(a, b, acc.shape, transpose_b=t, compiled=False)
                 for acc, a, b, t in products)
  import jax.experimental.pallas as pl
  mgpu = plgpu()

  def issue(acc_refs):
    for acc_ref, (_, a, b, t) in zip(acc_refs, products):
      mgpu.wgmma(acc_ref, a, _dot_operand(b, t, True))
  return tuple(pl.run_state(issue)(tuple(mgpu.ACC.init(acc) for acc, *_ in products)))
