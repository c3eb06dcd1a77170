"""A synthetic memory bank in the bank's own layout, without running the model (issue 11).

  python -m benchmarks.synth_bank --shape=qwen3-4b --tokens=100000000 \
      --kr_dtype=float8_e4m3fn --kv_dtype=int8 --out=/data/synth_100m

Routing and attention cost do not depend on what the keys are, only on how many there are
and how they are stored, so a bank of random keys times the engine as a real one would:
each router layer's ``K̄R`` rows are random unit vectors, ``K̄``/``V̄`` standard normal,
quantised to the requested precision exactly as the encoder's output would be
(``msa_jax.inference.quantize``). Document lengths are drawn as ``benchmarks.engine`` draws
them (from the shape's recipe task), or from a log-normal (``--doc_lengths=lognormal:600:1``).

Two forms:
  * on disk (this command): a complete bank directory (manifest, checksums, prefix,
    documents of random tokens). Its manifest says ``"synthetic"`` and carries no model
    fingerprint: ``MemoryEngine.load`` refuses it unless ``allow_synthetic=True``.
  * in device memory (:func:`synthetic_device_bank`): the placed ``DeviceBank`` built
    directly on the devices, for banks that do not fit on disk (a 100M-token Qwen3-4B bank
    is ~110 GB at fp8/int8; the H200 machine has a 64 GiB disk). K̄/V̄ on the devices, or
    (``kv_placement="host"``) in host memory, read through the engine's ``HostFetch`` as a
    bank on disk would be (host K̄/V̄ hold random bit patterns: only their bytes matter).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"qwen3-4b": "configs/16k_to_100m.py:4b", "tiny": "configs/16k_to_100m.py:tiny"}
SYNTHETIC_FINGERPRINT = "synthetic"
_BLOCK_ROWS = 1 << 16     # chunks generated per device call (bounds the float32 temporaries)


def recipe_of(shape: str) -> str:
  if shape not in SHAPES:
    raise ValueError(f"unknown --shape={shape!r}; choose one of {sorted(SHAPES)}")
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      SHAPES[shape])


def model_config_of(shape: str, **overrides):
  """The ``ModelConfig`` of a shape (its recipe's model), with ``overrides``."""
  from benchmarks.engine import _load_config
  from msa_jax.trainer import resolve_model_config
  return resolve_model_config(_load_config(recipe_of(shape))).replace(**overrides)


def doc_lengths(shape: str, tokens: int, spec: str = "recipe", seed: int = 0) -> np.ndarray:
  """Document lengths summing to at least ``tokens``: ``recipe`` (the shape's task, as
  ``benchmarks.engine`` draws them) or ``lognormal:MEDIAN:SIGMA`` (clipped to [1, 32·MEDIAN])."""
  rng = np.random.default_rng(seed)
  if spec == "recipe":
    from benchmarks.engine import doc_lengths_of_recipe
    pool = doc_lengths_of_recipe(recipe_of(shape), 4096, seed)
    draw = lambda n: rng.choice(pool, n)
  elif spec.startswith("lognormal:"):
    _, median, sigma = spec.split(":")
    median, sigma = float(median), float(sigma)
    draw = lambda n: np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), 1, 32 * median)
  else:
    raise ValueError(f"--doc_lengths={spec!r}: use 'recipe' or 'lognormal:MEDIAN:SIGMA'")
  out, total = [], 0
  while total < tokens:
    n = max(1024, int(1.1 * (tokens - total) / max(1.0, float(np.mean(draw(1024))))))
    x = draw(n).astype(np.int64)
    out.append(x)
    total += int(x.sum())
  lengths = np.concatenate(out)
  return lengths[:int(np.searchsorted(np.cumsum(lengths), tokens) + 1)]


def bank_bytes(cfg, lengths: np.ndarray, kr_dtype: str, kv_dtype: str) -> dict[str, int]:
  """Bytes of the K̄R and K̄/V̄ arrays (scales included) over all router layers."""
  from msa_jax.inference import quantize
  c = int((-(-lengths // cfg.pooling_chunk_size)).sum())
  f, g, layers = cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads, len(cfg.router_layer_ids)
  size = lambda d: np.dtype(jnp.dtype(d)).itemsize
  kr = c * f * size(kr_dtype) + (4 * c if quantize.is_quantised(kr_dtype) else 0)
  kv = 2 * (c * f * size(kv_dtype) + (4 * c * g if quantize.is_quantised(kv_dtype) else 0))
  return {"chunks": c, "kr": layers * kr, "kv": layers * kv}


# ------------------------------------------------------------------------------- random rows
@functools.partial(jax.jit, static_argnames=("n", "row_shape", "dtype", "unit"))
def _random_rows(key, n_real, *, n: int, row_shape: tuple, dtype: str, unit: bool):
  """``n`` rows (the first ``n_real`` random, the rest zero) as ``(codes, scale or None)``."""
  from msa_jax.inference import quantize
  x = jax.random.normal(key, (n, *row_shape), jnp.float32)
  if unit:
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  real = jnp.arange(n) < n_real
  x = jnp.where(real.reshape((n,) + (1,) * len(row_shape)), x, 0.0)
  return quantize.quantise_jax(x, dtype, 1)


def random_rows(key, n: int, n_real: int, row_shape: tuple, dtype: str, unit: bool, device=None):
  """``n`` rows of random keys on ``device``, generated in blocks: ``(codes, scale or None)``."""
  codes, scales = [], []
  for j, lo in enumerate(range(0, n, _BLOCK_ROWS)):
    block = min(_BLOCK_ROWS, n - lo)
    k = jax.random.fold_in(key, j)
    if device is not None:
      k = jax.device_put(k, device)
    c, s = _random_rows(k, jnp.int32(max(0, min(block, n_real - lo))), n=block,
                        row_shape=tuple(row_shape), dtype=dtype, unit=unit)
    codes.append(c)
    scales.append(s)
  cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)
  return cat(codes), (None if scales[0] is None else cat(scales))


# ------------------------------------------------------------------------------- on disk
def write_synthetic_bank(path: str, cfg, lengths: np.ndarray, *, kr_dtype: str, kv_dtype: str,
                         seed: int = 0, window_docs: int = 65_536, log=print) -> dict:
  """Writes a complete synthetic bank directory (see module doc); returns its manifest."""
  from msa_jax.inference import bank as bank_lib
  from msa_jax.inference.bank import DocRecord
  rng = np.random.default_rng(seed)
  g, d, p = cfg.num_kv_heads, cfg.head_dim, cfg.pooling_chunk_size
  compute = np.dtype(jnp.dtype(cfg.dtype))
  prefix_kv = [(rng.normal(size=(1, g, d)).astype(compute), rng.normal(size=(1, g, d))
                .astype(compute)) for _ in range(cfg.num_layers)]
  writer = bank_lib.BankWriter.create(
      path, fingerprint=SYNTHETIC_FINGERPRINT, model_config=cfg, kr_dtype=kr_dtype,
      kv_dtype=kv_dtype, prefix_tokens=[1], prefix_kv=prefix_kv,
      corpus={"path": "synthetic", "rows": int(len(lengths)), "bytes": 0}, tokenizer={})
  writer.manifest["synthetic"] = {"seed": seed, "note": "random unit-norm K̄R and normal K̄/V̄ "
                                  "written by benchmarks.synth_bank; no model encoded it"}
  key = jax.random.PRNGKey(seed)
  t0 = time.perf_counter()
  try:
    for w, lo in enumerate(range(0, len(lengths), window_docs)):
      lens = lengths[lo:lo + window_docs]
      docs = [DocRecord(f"syn{lo + j}", rng.integers(8, cfg.vocab_size, int(n)).tolist(), 0)
              for j, n in enumerate(lens)]
      chunks = (-(-lens // p)).astype(np.int64)
      c = int(chunks.sum())
      layers = {}
      for i in cfg.router_layer_ids:
        kw = jax.random.fold_in(jax.random.fold_in(key, w), i)
        # float32 rows: the writer quantises them as it would the encoder's output
        layers[i] = {"kr": np.asarray(random_rows(jax.random.fold_in(kw, 0), c, c, (g * d,),
                                                  "float32", True)[0]),
                     "k": np.asarray(random_rows(jax.random.fold_in(kw, 1), c, c, (g, d),
                                                 "float32", False)[0]),
                     "v": np.asarray(random_rows(jax.random.fold_in(kw, 2), c, c, (g, d),
                                                 "float32", False)[0])}
      writer.append(docs, layers, chunks.tolist())
      done = lo + len(lens)
      writer.commit(done, complete=done >= len(lengths))
      m = writer.manifest
      log(f"synth_bank: {done:,}/{len(lengths):,} documents, {m['num_tokens']:,} tokens "
          f"({m['num_tokens'] / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s)")
  finally:
    writer.close()
  return writer.manifest


# ------------------------------------------------------------------------------- in memory
@dataclasses.dataclass
class SyntheticBank:
  """What the engine reads of a bank's host side. ``host_kv`` (``kv_placement="host"``):
  per router layer ``{"k", "v", "k_scale", "v_scale"}`` numpy arrays in global chunk order,
  read as a bank on disk's ``k(layer)``/``v(layer)``/``scale(layer, part)``; None when
  K̄/V̄ live on the devices. Documents have no id tokens."""

  manifest: dict
  doc_index: np.ndarray
  chunk_doc: np.ndarray
  prefix_tokens: list
  prefix_kv: list
  seed: int
  path: str = "<synthetic bank in device memory>"
  host_kv: Optional[dict] = None

  num_docs = property(lambda self: self.manifest["num_docs"])
  num_chunks = property(lambda self: self.manifest["num_chunks"])
  num_tokens = property(lambda self: self.manifest["num_tokens"])
  max_doc_chunks = property(lambda self: self.manifest["max_doc_chunks"])
  router_layers = property(lambda self: list(self.manifest["router_layers"]))
  kr_dtype = property(lambda self: self.manifest["kr_dtype"])
  kv_dtype = property(lambda self: self.manifest["kv_dtype"])

  @property
  def compute_dtype(self) -> str:
    return self.manifest["model_config"]["dtype"]

  @functools.cached_property
  def doc_ids(self) -> list[str]:
    return [f"syn{j}" for j in range(self.num_docs)]

  def doc_tokens(self, j: int) -> list[int]:
    """Document ``j``'s (random, reproducible) tokens."""
    n = int(self.doc_index[j, 1])
    vocab = self.manifest["model_config"]["vocab_size"]
    return np.random.default_rng((self.seed, j)).integers(8, vocab, n).tolist()

  def id_table(self) -> dict:
    return {}

  def k(self, layer: int) -> np.ndarray:
    return self._host(layer)["k"]

  def v(self, layer: int) -> np.ndarray:
    return self._host(layer)["v"]

  def scale(self, layer: int, part: str) -> Optional[np.ndarray]:
    """int8 K̄/V̄ scales ``[C, Hkv]`` of a host-placed layer (None for float K̄/V̄)."""
    if part not in ("k", "v"):
      raise ValueError(f"a synthetic bank keeps only K̄/V̄ on the host, not {part!r}")
    return self._host(layer)[f"{part}_scale"]

  def _host(self, layer: int) -> dict:
    if self.host_kv is None:
      raise ValueError("this synthetic bank keeps K̄/V̄ on the devices; build it with "
                       "kv_placement='host' to read them from host memory")
    return self.host_kv[layer]


def random_host_kv(num_chunks: int, g: int, d: int, kv_dtype: str, seed: int) -> dict:
  """One layer's host K̄/V̄ of ``num_chunks`` chunks: random bit patterns of finite values
  (bf16/f32 in [0.125, 1), int8 codes with scales 0.01): what a host fetch moves, fast to
  draw (no normal samples; the values never matter for timing)."""
  rng = np.random.default_rng(seed)
  shape = (num_chunks, g, d)

  def one():
    if kv_dtype == "int8":
      return rng.integers(-127, 128, shape, dtype=np.int8)
    if kv_dtype == "bfloat16":      # exponents of 0.125 .. 0.99: finite, normal
      return rng.integers(0x3E00, 0x3F80, shape, dtype=np.uint16).view(jnp.bfloat16)
    return rng.uniform(0.125, 1.0, shape).astype(kv_dtype)
  scale = np.full((num_chunks, g), 0.01, np.float32) if kv_dtype == "int8" else None
  return {"k": one(), "v": one(), "k_scale": scale, "v_scale": scale}   # read-only, shared


def synthetic_device_bank(cfg, lengths: np.ndarray, *, kr_dtype: str, kv_dtype: str, mesh=None,
                          seed: int = 0, routing_impl: str = "xla", tile: Optional[int] = None,
                          pad_to: int = 4096, with_kv: bool = True,
                          score_dtype: str = "float32", route_fused: bool = False,
                          kv_placement: str = "device", log=print):
  """A ``DeviceBank`` of random keys built directly on the devices (see module doc).

  ``with_kv=False`` leaves K̄/V̄ out (``None``): a bank to time routing alone.
  ``route_fused``: the Pallas route's kernel, as ``DeviceBank.load``'s.
  ``kv_placement="host"``: K̄/V̄ in host memory (``random_host_kv``), fetched as
  ``DeviceBank.load(kv_placement="host")`` fetches a bank's.
  """
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from msa_jax.inference import quantize
  from msa_jax.inference.bank import INDEX_COLUMNS
  from msa_jax.inference.memory import (MEMORY_AXIS, BankSettings, DeviceBank, HostFetch,
                                       bank_layout, place_rows, route_layouts_for)
  quantize.check_dtype(kr_dtype, "kr")
  quantize.check_dtype(kv_dtype, "kv")
  if kv_placement not in ("device", "host"):
    raise ValueError(f"kv_placement must be 'device' or 'host', got {kv_placement!r}")
  on_host = kv_placement == "host" and with_kv
  if mesh is None:
    mesh = Mesh(np.array(jax.devices()), (MEMORY_AXIS,))
  shards = mesh.shape[MEMORY_AXIS]
  g, d, p = cfg.num_kv_heads, cfg.head_dim, cfg.pooling_chunk_size
  lengths = np.asarray(lengths, np.int64)
  chunks = -(-lengths // p)
  cmax = int(chunks.max())
  chunk_bounds, rows, doc_shard, doc_row = bank_layout(chunks, shards, cmax, tile or pad_to)
  index = np.zeros((len(lengths), len(INDEX_COLUMNS)), np.int64)
  index[:, 0] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  index[:, 1] = lengths
  index[:, 3] = np.concatenate([[0], np.cumsum(chunks)[:-1]])
  index[:, 4] = chunks
  chunk_doc = np.repeat(np.arange(len(lengths), dtype=np.int32), chunks)
  sharding = NamedSharding(mesh, PartitionSpec(MEMORY_AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())
  placement = sharding.addressable_devices_indices_map((shards * rows,))
  key = jax.random.PRNGKey(seed)

  def place_random(key, row_shape, dtype, unit):
    codes, scales = [], []
    for dev, idx in placement.items():
      s = (idx[0].start or 0) // rows
      n_real = int(chunk_bounds[s + 1] - chunk_bounds[s])
      c, sc = random_rows(jax.random.fold_in(key, s), rows, n_real, row_shape, dtype, unit, dev)
      codes.append(c)
      scales.append(sc)
    make = lambda xs, shape: jax.make_array_from_single_device_arrays(shape, sharding, xs)
    codes_a = make(codes, (shards * rows, *row_shape))
    scale_a = None if scales[0] is None else make(scales, (shards * rows, *row_shape[:-1]))
    return codes_a, scale_a

  t0 = time.perf_counter()
  chunk_doc_dev = place_rows(lambda lo, hi: chunk_doc[lo:hi], (), np.int32, -1,
                             sharding=sharding, chunk_bounds=chunk_bounds, rows=rows)
  kr, k, v, host_kv = {}, {}, {}, {}
  scales = {"kr": {}, "k": {}, "v": {}}
  for i in cfg.router_layer_ids:
    ki = jax.random.fold_in(key, i)
    kr[i], scales["kr"][i] = place_random(jax.random.fold_in(ki, 0), (g * d,), kr_dtype, True)
    if on_host:
      host_kv[i] = random_host_kv(int(chunks.sum()), g, d, kv_dtype, seed * 1000 + i)
      k[i] = v[i] = scales["k"][i] = scales["v"][i] = None
    elif with_kv:
      k[i], scales["k"][i] = place_random(jax.random.fold_in(ki, 1), (g, d), kv_dtype, False)
      v[i], scales["v"][i] = place_random(jax.random.fold_in(ki, 2), (g, d), kv_dtype, False)
    else:
      k[i] = v[i] = scales["k"][i] = scales["v"][i] = None
    jax.block_until_ready((kr[i], k[i], v[i]))
    log(f"synth_bank: router layer {i} placed ({time.perf_counter() - t0:.1f}s)")
  rng = np.random.default_rng(seed)
  compute = np.dtype(jnp.dtype(cfg.dtype))
  prefix_kv = [(rng.normal(size=(1, g, d)).astype(compute), rng.normal(size=(1, g, d))
                .astype(compute)) for _ in range(cfg.num_layers)]
  manifest = {"fingerprint": SYNTHETIC_FINGERPRINT, "synthetic": {"seed": seed},
              "model_config": cfg.to_dict(), "router_layers": list(cfg.router_layer_ids),
              "kr_dtype": kr_dtype, "kv_dtype": kv_dtype, "num_docs": int(len(lengths)),
              "num_chunks": int(chunks.sum()), "num_tokens": int(lengths.sum()),
              "max_doc_chunks": cmax, "tokenizer": {}}
  bank = SyntheticBank(manifest, index, chunk_doc, [1], prefix_kv, seed,
                       host_kv=host_kv if on_host else None)
  settings = BankSettings(mesh, cmax, tile, routing_impl,
                          HostFetch(bank, cmax) if on_host else None, cfg.dtype, score_dtype,
                          route_fused)
  put = lambda x: jax.device_put(x, replicated)
  log(f"synthetic bank: {bank.num_docs:,} documents, {bank.num_tokens:,} tokens, "
      f"{bank.num_chunks:,} chunks over {shards} memory shard(s) of {rows:,} rows; K̄R "
      f"{kr_dtype}, K̄/V̄ {kv_dtype} on the {'host' if on_host else 'device'} "
      f"({time.perf_counter() - t0:.1f}s)")
  return DeviceBank(bank, settings, kr, k, v, chunk_doc_dev, put(doc_shard), put(doc_row),
                    put(chunks.astype(np.int32)), scales,
                    route_layouts_for(settings, chunk_doc_dev))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  ap.add_argument("--tokens", type=int, default=1_000_000)
  ap.add_argument("--kr_dtype", default="", help="'' = the model dtype")
  ap.add_argument("--kv_dtype", default="", help="'' = the model dtype")
  ap.add_argument("--doc_lengths", default="recipe", help="recipe | lognormal:MEDIAN:SIGMA")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", required=True, help="the bank directory to write (must not exist)")
  args = ap.parse_args()
  cfg = model_config_of(args.shape)
  kr, kv = args.kr_dtype or cfg.dtype, args.kv_dtype or cfg.dtype
  lengths = doc_lengths(args.shape, args.tokens, args.doc_lengths, args.seed)
  size = bank_bytes(cfg, lengths, kr, kv)
  print(f"{args.shape}: {len(lengths):,} documents, {int(lengths.sum()):,} tokens, "
        f"{size['chunks']:,} chunks; K̄R {kr} {size['kr'] / 1e9:,.2f} GB, K̄/V̄ {kv} "
        f"{size['kv'] / 1e9:,.2f} GB on disk", flush=True)
  m = write_synthetic_bank(args.out, cfg, lengths, kr_dtype=kr, kv_dtype=kv, seed=args.seed)
  print(f"wrote {args.out}: {m['num_docs']:,} documents, {m['num_tokens']:,} tokens "
        "(synthetic: MemoryEngine.load(..., allow_synthetic=True) to time it)")


if __name__ == "__main__":
  main()
