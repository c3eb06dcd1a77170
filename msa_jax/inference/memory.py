"""A bank on the devices: memory-parallel routing and the fetch of selected chunks.

``DeviceBank.load`` places a bank for the engine (SPEC §5 memory parallel):
  * ``K̄R`` and the chunk→document map are sharded by chunk over the ``memory`` mesh axis,
    each shard holding whole documents (so a shard's document maxima are exact), padded
    to one length;
  * ``K̄``/``V̄`` either sit beside them on the devices (``kv_placement="device"``) or stay
    in host memory (``"host"``: the bank's memory maps), and only the selected documents'
    chunks, as fixed-size ``[max_doc_chunks]`` slices, reach the device.

Quantised banks (``quantize.py``) stay quantised on the devices and in host memory: routing
reads fp8/int8 ``K̄R`` codes with their per-chunk scales directly; the selected int8
``K̄``/``V̄`` chunks are fetched as codes plus per-(chunk, head) scales and dequantised to
the bank's compute dtype on the device, after the fetch, before attention.

``BankLayerMemory`` is the per-layer memory source the model's ``decode_active`` routes
through (the same interface as ``model.ExampleMemory`` of training): route over every
shard, merge, gather the winners' chunks in document order.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from msa_jax import routing
from msa_jax.inference import bank_routing, quantize
from msa_jax.inference.bank import INDEX_COLUMNS, BankError, MemoryBank

MEMORY_AXIS = "memory"
_START, _NCHUNK = INDEX_COLUMNS.index("chunk_start"), INDEX_COLUMNS.index("num_chunks")


@flax.struct.dataclass
class BankRouting:
  """What one router layer chose from a shared bank (a bank has no full score vector)."""

  top_scores_bk: jax.Array   # float32 [B, k], scores of doc_idx_bk (-inf where invalid)
  doc_idx_bk: jax.Array      # int32 [B, k], global document indices in document order
  valid_bk: jax.Array        # bool [B, k]


@dataclasses.dataclass(frozen=True)
class BankSettings:
  """Static facts of a placed bank (hashable: they are part of the compiled program)."""

  mesh: Mesh
  max_doc_chunks: int
  tile: Optional[int]          # chunks per routing scan step (None: a fixed score budget)
  routing: str                  # "xla" | "pallas"
  host_fetch: Optional[Callable] = None   # kv_placement="host": numpy gather of chunks
  compute_dtype: str = "float32"          # what fetched K̄/V̄ are (de)quantised to
  score_dtype: str = "float32"            # XLA routing: float32 (HIGHEST), bfloat16 operands,
                                          # or the GPU kernels' numerics ("kernel", "kernel_fp8q1")
  route_fused: bool = False               # Pallas routing: the unfused chunk scores + the XLA
                                          # top-k from their row maxima (default), or the fused
                                          # block top-k kernel (BENCHMARKS.md)
  route_options: tuple = ()               # Pallas routing: (BlockSizes field, value) pairs over
                                          # the engine's defaults (benchmarks, tuning)

  def route_block_sizes(self, key_width: int, key_dtype="bfloat16"):
    """The Pallas route's ``BlockSizes`` for ``key_dtype`` keys of ``key_width`` columns
    (None: XLA)."""
    if self.routing != "pallas":
      return None
    return bank_routing.engine_block_sizes(key_width, key_dtype, fused=self.route_fused,
                                           **dict(self.route_options))


@flax.struct.dataclass
class BankLayerMemory:
  """One router layer of a placed bank: a memory source for ``MSAModel.decode_active``."""

  kr_cf: jax.Array                 # [S*Cs, F] sharded over memory
  chunk_doc_c: jax.Array           # int32 [S*Cs] global document of each chunk, -1 padding
  k_cgd: Optional[jax.Array]       # [S*Cs, Hkv, D] sharded, or None (host placement)
  v_cgd: Optional[jax.Array]
  doc_shard_n: jax.Array           # int32 [N] shard holding each document
  doc_row_n: jax.Array             # int32 [N] its first chunk's row within that shard
  doc_chunks_n: jax.Array          # int32 [N] its chunk count
  forced: Optional[routing.Selection]
  kr_scale_c: Optional[jax.Array]          # float32 [S*Cs] per-chunk scales of quantised K̄R
  k_scale_cg: Optional[jax.Array]          # float32 [S*Cs, Hkv] scales of int8 K̄ (device)
  v_scale_cg: Optional[jax.Array]
  layer: int = flax.struct.field(pytree_node=False)
  settings: BankSettings = flax.struct.field(pytree_node=False)
  route_layouts: Optional[dict] = None     # pallas routing: {tile: BankLayout}, sharded

  def select(self, rq_bmf, route_mask_bm, top_k: int):
    """Routes over the whole bank; returns ``(BankRouting, k, v, mask)`` of the winners."""
    s = self.settings
    scores_bk, docs_bk = bank_routing.sharded_top_k(
        s.mesh, rq_bmf, route_mask_bm, self.kr_cf, self.chunk_doc_c, top_k, tile=s.tile,
        axis=MEMORY_AXIS, implementation=s.routing, kr_scale_c=self.kr_scale_c,
        score_dtype=s.score_dtype, layouts=self.route_layouts,
        block_sizes=s.route_block_sizes(rq_bmf.shape[-1], self.kr_cf.dtype),
        max_doc_chunks=s.max_doc_chunks)
    selection, sel_scores = bank_routing.selection_in_document_order(scores_bk, docs_bk)
    if self.forced is not None:
      selection = self.forced
    if self.k_cgd is None:
      k, v, mask = _host_gather(s.host_fetch, self.layer, selection, s.max_doc_chunks,
                                rq_bmf.shape[0], s.compute_dtype)
    else:
      k, v, mask = _device_gather(s.mesh, self.k_cgd, self.v_cgd, self.doc_shard_n,
                                  self.doc_row_n, self.doc_chunks_n, selection, s.max_doc_chunks,
                                  s.compute_dtype, self.k_scale_cg, self.v_scale_cg)
    return BankRouting(sel_scores, selection.doc_idx_bk, selection.valid_bk), k, v, mask


def _device_gather(mesh, k_cgd, v_cgd, doc_shard_n, doc_row_n, doc_chunks_n,
                   selection: routing.Selection, cmax: int, compute_dtype: str,
                   k_scale_cg=None, v_scale_cg=None):
  """The selected documents' chunks from the shards that hold them (one psum of k·cmax rows).

  Int8 K̄/V̄ (``k_scale_cg`` given) are gathered as codes and scales and dequantised on the
  device before the psum; the result is in ``compute_dtype``.
  """
  from jax.experimental.shard_map import shard_map

  def per_shard(k, v, shard_n, row_n, chunks_n, docs_bk, valid_bk, *scales):
    me = jax.lax.axis_index(MEMORY_AXIS)
    owned = valid_bk & (shard_n[docs_bk] == me)
    start = jnp.where(owned, row_n[docs_bk], 0)
    take = lambda x: jax.vmap(jax.vmap(
        lambda s0: jax.lax.dynamic_slice_in_dim(x, s0, cmax, axis=0)))(start)
    present = (jnp.arange(cmax)[None, None] < chunks_n[docs_bk][..., None]) & owned[..., None]
    k_sel = quantize.dequantise(take(k), take(scales[0]) if scales else None, jnp.float32)
    v_sel = quantize.dequantise(take(v), take(scales[1]) if scales else None, jnp.float32)
    k_sel = jnp.where(present[..., None, None], k_sel, 0)
    v_sel = jnp.where(present[..., None, None], v_sel, 0)
    k_sel = jax.lax.psum(k_sel, MEMORY_AXIS).astype(compute_dtype)
    v_sel = jax.lax.psum(v_sel, MEMORY_AXIS).astype(compute_dtype)
    mask = jax.lax.psum(present.astype(jnp.int32), MEMORY_AXIS) > 0
    b, kk = docs_bk.shape
    return (k_sel.reshape(b, kk * cmax, *k.shape[1:]), v_sel.reshape(b, kk * cmax, *v.shape[1:]),
            mask.reshape(b, kk * cmax))

  rep, sharded = PartitionSpec(), PartitionSpec(MEMORY_AXIS)
  scales = () if k_scale_cg is None else (k_scale_cg, v_scale_cg)
  fn = shard_map(per_shard, mesh=mesh,
                 in_specs=(sharded, sharded, rep, rep, rep, rep, rep) + (sharded,) * len(scales),
                 out_specs=(rep, rep, rep), check_rep=False)
  return fn(k_cgd, v_cgd, doc_shard_n, doc_row_n, doc_chunks_n, selection.doc_idx_bk,
            selection.valid_bk, *scales)


def _host_gather(fetch, layer: int, selection: routing.Selection, cmax: int, b: int,
                 compute_dtype: str):
  """The selected chunks read from host memory (only ``k·cmax`` rows per question move).

  Int8 K̄/V̄ cross as codes plus scales and are dequantised on the device.
  """
  kk = selection.doc_idx_bk.shape[1]
  k_dtype, g, d = fetch.kv_dtype, fetch.kv_heads, fetch.head_dim
  rows = (b, kk * cmax)
  shapes = (jax.ShapeDtypeStruct((*rows, g, d), k_dtype),
            jax.ShapeDtypeStruct((*rows, g, d), k_dtype),
            jax.ShapeDtypeStruct(rows, jnp.bool_))
  if fetch.quantised:
    shapes += (jax.ShapeDtypeStruct((*rows, g), jnp.float32),) * 2
  out = jax.pure_callback(lambda docs, valid: fetch(layer, docs, valid), shapes,
                          selection.doc_idx_bk, selection.valid_bk)
  k, v, mask = out[:3]
  k_scale, v_scale = out[3:] if fetch.quantised else (None, None)
  return (quantize.dequantise(k, k_scale, compute_dtype),
          quantize.dequantise(v, v_scale, compute_dtype), mask)


class HostFetch:
  """Gathers selected documents' chunks from a bank's memory-mapped K̄/V̄ (numpy)."""

  def __init__(self, bank: MemoryBank, cmax: int):
    self.bank, self.cmax = bank, cmax
    self.index = np.asarray(bank.doc_index[:, [_START, _NCHUNK]])
    cfg = bank.manifest["model_config"]
    self.kv_heads, self.head_dim = cfg["num_kv_heads"], cfg["head_dim"]
    self.kv_dtype = bank.k(bank.router_layers[0]).dtype
    self.quantised = quantize.is_quantised(bank.kv_dtype)

  def __call__(self, layer: int, docs_bk, valid_bk):
    """``(k, v, mask)`` of the selected chunks, plus ``(k_scale, v_scale)`` for int8 K̄/V̄."""
    docs_bk, valid_bk = np.asarray(docs_bk), np.asarray(valid_bk)
    start = self.index[docs_bk, 0]
    n = np.where(valid_bk, self.index[docs_bk, 1], 0)
    rows = start[..., None] + np.arange(self.cmax)               # [B, k, cmax]
    present = np.arange(self.cmax) < n[..., None]
    rows = np.where(present, rows, 0)
    k = np.where(present[..., None, None], self.bank.k(layer)[rows], 0)
    v = np.where(present[..., None, None], self.bank.v(layer)[rows], 0)
    b, kk = docs_bk.shape
    shape = (b, kk * self.cmax, self.kv_heads, self.head_dim)
    out = (k.reshape(shape).astype(self.kv_dtype), v.reshape(shape).astype(self.kv_dtype),
           present.reshape(b, kk * self.cmax))
    if not self.quantised:
      return out
    scales = [np.where(present[..., None], self.bank.scale(layer, part)[rows], 1)
              .reshape(shape[:3]).astype(np.float32) for part in ("k", "v")]
    return out + tuple(scales)


def check_scales(scale: np.ndarray, name: str, path: str) -> None:
  """Raises ``BankError`` unless every scale is a positive finite number (reads them once)."""
  step = 1 << 22
  for lo in range(0, scale.shape[0], step):
    part = np.asarray(scale[lo:lo + step])
    bad = ~(np.isfinite(part) & (part > 0))
    if bad.any():
      row = lo + int(np.argwhere(bad)[0][0])
      raise BankError(f"bank file {path}/{name} is corrupt: row {row} holds scale "
                      f"{part.reshape(part.shape[0], -1)[row - lo].tolist()} (scales are positive "
                      "and finite); check it with open_bank(verify=True) and re-encode the bank")


def shard_plan(chunks_per_doc: np.ndarray, num_shards: int) -> np.ndarray:
  """First document of each shard (and the end): contiguous runs of ~equal chunk counts."""
  n = len(chunks_per_doc)
  cum = np.concatenate([[0], np.cumsum(chunks_per_doc, dtype=np.int64)])
  targets = cum[-1] * np.arange(num_shards + 1) / num_shards
  bounds = np.searchsorted(cum, targets, side="left").astype(np.int64)
  bounds[0], bounds[-1] = 0, n
  return np.maximum.accumulate(bounds)


def place_rows(read, row_shape, dtype, fill, *, sharding, chunk_bounds, rows: int):
  """A ``[shards * rows, *row_shape]`` array sharded over ``memory``, built one shard at a
  time: shard s holds ``read(lo, hi)`` (its chunks ``chunk_bounds[s]:chunk_bounds[s+1]``)
  then ``fill`` up to ``rows``. Host memory holds one shard, never the whole array."""
  shards = len(chunk_bounds) - 1

  def shard_data(idx):
    s = (idx[0].start or 0) // rows
    lo, hi = chunk_bounds[s], chunk_bounds[s + 1]
    out = np.full((rows, *row_shape), fill, dtype)
    out[:hi - lo] = read(lo, hi)
    return out
  return jax.make_array_from_callback((shards * rows, *row_shape), sharding, shard_data)


def bank_layout(chunks_per_doc: np.ndarray, shards: int, cmax: int, step: int):
  """Where a bank's chunks sit on the ``memory`` shards.

  Returns ``(chunk_bounds [shards+1], rows per shard, doc_shard [N], doc_row [N])``: shard
  ``s`` holds chunks ``chunk_bounds[s]:chunk_bounds[s+1]`` (whole documents) in its first
  rows, padded to ``rows`` (a multiple of ``step``, with room for a ``cmax`` slice).
  """
  bounds = shard_plan(chunks_per_doc, shards)
  chunk_bounds = np.concatenate([[0], np.cumsum(chunks_per_doc)])[bounds]
  per_shard = np.diff(chunk_bounds)
  rows = int(-(-(per_shard.max() + cmax) // step) * step)   # + cmax: slices stay in bounds
  doc_shard = np.repeat(np.arange(shards, dtype=np.int32), np.diff(bounds))
  starts = np.concatenate([[0], np.cumsum(chunks_per_doc)[:-1]])
  doc_row = (starts - chunk_bounds[doc_shard]).astype(np.int32)
  return chunk_bounds, rows, doc_shard, doc_row


@dataclasses.dataclass
class DeviceBank:
  """A bank placed on a mesh: per-layer arrays plus the document table (see module doc)."""

  bank: MemoryBank
  settings: BankSettings
  kr: dict[int, jax.Array]
  k: dict[int, Optional[jax.Array]]
  v: dict[int, Optional[jax.Array]]
  chunk_doc: jax.Array
  doc_shard: jax.Array
  doc_row: jax.Array
  doc_chunks: jax.Array
  scales: dict[str, dict[int, Optional[jax.Array]]] = dataclasses.field(
      default_factory=lambda: {"kr": {}, "k": {}, "v": {}})   # quantised parts only
  # pallas routing: the unfused route's chunk runs and the fused kernel's per-tile document
  # slots of chunk_doc, built once here (bank_routing.sharded_layouts), not in every call
  route_layouts: Optional[dict] = None

  @classmethod
  def load(cls, bank: MemoryBank, mesh: Optional[Mesh] = None, *, kv_placement: str = "device",
           routing_impl: str = "xla", tile: Optional[int] = None, pad_to: int = 4096,
           score_dtype: str = "float32", route_fused: bool = False, route_options=(),
           log=print) -> "DeviceBank":
    """Places ``bank`` on ``mesh`` (default: every device on one ``memory`` axis).

    ``route_fused`` (``routing_impl="pallas"``): the unfused chunk-score kernel with the
    documents' top-k in XLA from the chunk scores' row maxima (default:
    ``block_routing.run_top_k``; faster on the H200 at 10M-100M tokens for bf16, fp8 and
    int8 keys, batch 1 and 8, BENCHMARKS.md), or the fused block top-k kernel (True).
    ``route_options``: ``(BlockSizes field, value)`` pairs over the route's defaults
    (``bank_routing.engine_block_sizes``), e.g. ``(("fp8_query_terms", 2),)`` for fp8 keys
    scored against two e4m3 query terms instead of the default one.

    ``score_dtype`` (XLA routing): ``float32`` scores at HIGHEST precision; ``bfloat16``
    multiplies bfloat16 operands on tensor cores (exact for fp8/int8 codes; the queries
    are rounded); ``kernel`` / ``kernel_fp8q1`` score as the GPU routing kernels do (queries
    quantised to the codes' dtype; fp8 as two e4m3 terms or one), to measure the Pallas
    route's accuracy on any platform; see ``bank_routing._tile_chunk_scores``.

    Reads the memory maps one shard at a time: host RAM never holds a whole array.
    """
    if kv_placement not in ("device", "host"):
      raise ValueError(f"kv_placement must be 'device' or 'host', got {kv_placement!r}")
    from msa_jax.inference.bank_routing import SCORE_DTYPES
    if score_dtype not in SCORE_DTYPES:   # before placing the bank, not at the first route
      raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}, got {score_dtype!r}")
    if mesh is None:
      mesh = Mesh(np.array(jax.devices()), (MEMORY_AXIS,))
    if MEMORY_AXIS not in mesh.axis_names:
      raise ValueError(f"the engine's mesh needs a {MEMORY_AXIS!r} axis, got {mesh.axis_names}")
    shards = mesh.shape[MEMORY_AXIS]
    index = np.asarray(bank.doc_index)
    chunks = index[:, _NCHUNK]
    cmax = max(1, bank.max_doc_chunks)
    chunk_bounds, rows, doc_shard, doc_row = bank_layout(chunks, shards, cmax, tile or pad_to)
    sharding = NamedSharding(mesh, PartitionSpec(MEMORY_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())

    place = functools.partial(place_rows, sharding=sharding, chunk_bounds=chunk_bounds,
                              rows=rows)

    def place_scale(layer, part):
      a = bank.scale(layer, part)
      if a is None:
        return None
      check_scales(a, f"layer_{layer:02d}.{part}_scale", bank.path)
      return place(lambda lo, hi: a[lo:hi], a.shape[1:], np.float32, 1)

    chunk_doc = place(lambda lo, hi: bank.chunk_doc[lo:hi], (), np.int32, -1)
    kr, k, v = {}, {}, {}
    scales = {"kr": {}, "k": {}, "v": {}}
    for i in bank.router_layers:
      kr_map, k_map, v_map = bank.kr(i), bank.k(i), bank.v(i)
      kr[i] = place(lambda lo, hi, a=kr_map: a[lo:hi], kr_map.shape[1:], kr_map.dtype, 0)
      scales["kr"][i] = place_scale(i, "kr")
      if kv_placement == "device":
        k[i] = place(lambda lo, hi, a=k_map: a[lo:hi], k_map.shape[1:], k_map.dtype, 0)
        v[i] = place(lambda lo, hi, a=v_map: a[lo:hi], v_map.shape[1:], v_map.dtype, 0)
        scales["k"][i], scales["v"][i] = place_scale(i, "k"), place_scale(i, "v")
      else:
        k[i] = v[i] = None
        scales["k"][i] = scales["v"][i] = None
        for part in ("k", "v"):
          if bank.scale(i, part) is not None:
            check_scales(bank.scale(i, part), f"layer_{i:02d}.{part}_scale", bank.path)
    host = HostFetch(bank, cmax) if kv_placement == "host" else None
    settings = BankSettings(mesh, cmax, tile, routing_impl, host, bank.compute_dtype,
                            score_dtype, route_fused, tuple(map(tuple, route_options)))
    put = lambda x: jax.device_put(x, replicated)
    log(f"bank {bank.path}: {bank.num_docs:,} documents, {bank.num_chunks:,} chunks over "
        f"{shards} memory shard(s) of {rows:,} rows; K̄R {bank.kr_dtype}, K̄/V̄ {bank.kv_dtype} "
        f"on the {kv_placement}; routing: {routing_impl}")
    return cls(bank, settings, kr, k, v, chunk_doc, put(doc_shard), put(doc_row),
               put(chunks.astype(np.int32)), scales, route_layouts_for(settings, chunk_doc))

  def arrays(self) -> dict[str, Any]:
    """The device arrays as one pytree (what a jitted step takes as an argument)."""
    return {"kr": self.kr, "k": self.k, "v": self.v, "chunk_doc": self.chunk_doc,
            "doc_shard": self.doc_shard, "doc_row": self.doc_row, "doc_chunks": self.doc_chunks,
            "scales": self.scales, "route_layouts": self.route_layouts}


def route_layouts_for(settings: BankSettings, chunk_doc: jax.Array) -> Optional[dict]:
  """The Pallas routes' bank layouts (``bank_routing.sharded_layouts``: chunk runs for the
  unfused route, per-tile document slots for the fused kernel) when the bank is routed by
  them (``settings.routing == "pallas"``), else None."""
  if settings.routing != "pallas":
    return None
  return bank_routing.sharded_layouts(settings.mesh, chunk_doc, MEMORY_AXIS)


class BankMemory:
  """The memory source of a placed bank, built inside a jitted step from ``arrays()``."""

  def __init__(self, arrays: dict, settings: BankSettings,
               forced: Optional[routing.Selection] = None):
    self.arrays, self.settings, self.forced = arrays, settings, forced

  def layer(self, i: int) -> Optional[BankLayerMemory]:
    a = self.arrays
    if i not in a["kr"]:
      return None
    sc = a.get("scales", {"kr": {}, "k": {}, "v": {}})
    return BankLayerMemory(a["kr"][i], a["chunk_doc"], a["k"][i], a["v"][i], a["doc_shard"],
                           a["doc_row"], a["doc_chunks"], self.forced, sc["kr"].get(i),
                           sc["k"].get(i), sc["v"].get(i), i, self.settings,
                           a.get("route_layouts"))
