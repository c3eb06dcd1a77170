"""Reading and writing (sharded) safetensors weights one tensor at a time.

Layout, as transformers writes it: either ``model.safetensors`` or
``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}``).
bfloat16 tensors are numpy arrays of ``ml_dtypes.bfloat16``.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable, Sequence

import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from msa_jax.export.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-{k:05d}-of-{n:05d}.safetensors"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# safetensors dtype tags of the float dtypes a checkpoint may hold.
DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16), "float64": np.dtype(np.float64)}


def numpy_dtype(name) -> np.dtype:
  """``np.dtype`` for a name ("bfloat16", ...), a numpy/jax dtype or scalar type."""
  key = name if isinstance(name, str) else np.dtype(name).name
  if key not in NUMPY_DTYPES:
    raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(NUMPY_DTYPES)}")
  return NUMPY_DTYPES[key]


def has_weights(directory: str) -> bool:
  return any(os.path.exists(os.path.join(directory, f)) for f in (SINGLE_FILE, INDEX_FILE))


class SafetensorsReader:
  """All tensors of a checkpoint dir, read lazily by name (a context manager).

  ``model.safetensors`` wins when both it and an index exist (as in transformers).
  """

  def __init__(self, directory: str):
    self.directory = directory
    single = os.path.join(directory, SINGLE_FILE)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(single):
      files = [SINGLE_FILE]
      self._file_of = None
    elif os.path.exists(index):
      weight_map = _read_index(index)
      files = sorted(set(weight_map.values()))
      for f in files:
        if not os.path.exists(os.path.join(directory, f)):
          raise CheckpointError(f"{index}: shard {f!r} is listed in weight_map but missing "
                                f"from {directory}")
      self._file_of = weight_map
    else:
      others = [os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin"))]
      hint = f" (found {others}: only safetensors is supported)" if others else ""
      raise CheckpointError(f"{directory}: no weights: neither {SINGLE_FILE} nor "
                            f"{INDEX_FILE}{hint}")
    self._handles = {f: _open(os.path.join(directory, f)) for f in files}
    if self._file_of is None:
      self._file_of = {name: SINGLE_FILE for name in self._handles[SINGLE_FILE].keys()}
    else:
      for f, handle in self._handles.items():
        present = set(handle.keys())
        for name, shard in self._file_of.items():
          if shard == f and name not in present:
            raise CheckpointError(f"{INDEX_FILE}: tensor {name!r} is mapped to shard {f!r}, "
                                  "which does not contain it (corrupt index)")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    self._handles.clear()

  def names(self) -> list[str]:
    return list(self._file_of)

  def __contains__(self, name: str) -> bool:
    return name in self._file_of

  def _slice(self, name: str):
    if name not in self._file_of:
      raise CheckpointError(f"{self.directory}: missing tensor {name!r}")
    return self._handles[self._file_of[name]].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def dtype_name(self, name: str) -> str:
    """"float32", "bfloat16", ... of a stored tensor (without reading it)."""
    tag = self._slice(name).get_dtype()
    if tag not in DTYPE_NAMES:
      raise CheckpointError(f"{self.directory}: tensor {name!r} has dtype {tag}; expected a "
                            f"float dtype {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[tag]

  def read(self, name: str) -> np.ndarray:
    """The tensor as a numpy array in its stored dtype."""
    self._slice(name)  # raises a named error when absent
    try:
      return self._handles[self._file_of[name]].get_tensor(name)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file and tensor
      raise CheckpointError(f"{os.path.join(self.directory, self._file_of[name])}: cannot read "
                            f"tensor {name!r} ({type(e).__name__}: {e}); the file may be "
                            "truncated or corrupt: copy or download it again") from e


def _open(path: str):
  """``safe_open`` of one file; a truncated or corrupt file is a ``CheckpointError`` naming it."""
  try:
    return safe_open(path, framework="numpy")
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
    raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}; "
                          f"{os.path.getsize(path)} bytes); it may be truncated (an interrupted "
                          "download or copy) or corrupt: copy or download it again") from e


def _read_index(path: str) -> dict[str, str]:
  try:
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path}: not a safetensors index (need a 'weight_map' object): "
                          f"{e}") from None
  if not isinstance(weight_map, dict) or not weight_map:
    raise CheckpointError(f"{path}: 'weight_map' is empty or not an object")
  return weight_map


def parse_size(size) -> int:
  """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"10KiB"``."""
  if isinstance(size, (int, np.integer)):
    return int(size)
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"bad max_shard_size {size!r}; use bytes or a string like '5GB'")
  base = 1024 if m.group(3) else 1000
  power = " KMGT".index(m.group(2).upper() or " ")
  return int(float(m.group(1)) * base ** power)


def plan_shards(sizes: Sequence[int], max_shard_bytes: int) -> list[list[int]]:
  """Greedy split of tensors (in order) into shards of at most ``max_shard_bytes``.

  A tensor larger than the limit gets a shard of its own.
  """
  shards: list[list[int]] = []
  used = 0
  for i, size in enumerate(sizes):
    if not shards or used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(i)
    used += size
  return shards


def is_shard_name(name: str) -> bool:
  """Whether ``name`` is a shard file name of :func:`write_tensors`."""
  return bool(_SHARD_RE.match(name))


def remove_weight_files(directory: str) -> None:
  """Deletes a previous save's weight files so that stale shards cannot be loaded."""
  for f in os.listdir(directory):
    if f in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.match(f):
      os.remove(os.path.join(directory, f))


def _c_contiguous(x: np.ndarray) -> np.ndarray:
  """C-contiguous ``x`` keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
  x = np.asarray(x)
  return x if x.flags.c_contiguous else x.copy(order="C")


def write_tensors(directory: str, names: Sequence[str], nbytes: Sequence[int],
                  produce: Callable[[int], np.ndarray], max_shard_size="5GB",
                  metadata: dict | None = None) -> list[str]:
  """Writes tensors ``names[i] = produce(i)`` as one file or shards plus an index.

  ``produce`` is called once per tensor, shard by shard, so only one shard's
  arrays are in host memory at a time. Returns the written file names.
  """
  shards = plan_shards(nbytes, parse_size(max_shard_size))
  os.makedirs(directory, exist_ok=True)
  remove_weight_files(directory)
  metadata = {"format": "pt", **(metadata or {})}
  files, weight_map = [], {}
  for k, members in enumerate(shards):
    fname = (SINGLE_FILE if len(shards) == 1
             else SHARD_PATTERN.format(k=k + 1, n=len(shards)))
    arrays = {names[i]: _c_contiguous(produce(i)) for i in members}
    safetensors.numpy.save_file(arrays, os.path.join(directory, fname), metadata=metadata)
    del arrays
    files.append(fname)
    weight_map.update({names[i]: fname for i in members})
  if len(shards) > 1:
    index = {"metadata": {"total_size": int(sum(nbytes))}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
    files.append(INDEX_FILE)
  return files
