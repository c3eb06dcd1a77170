"""The memory bank on disk (SPEC §5 stage 1): append-only flat arrays plus a manifest.

Layout of ``BANK/``::

    manifest.json        what is committed: format, model fingerprint and config, dtypes,
                         shapes, row counts, per-segment checksums, corpus rows done
    prefix.npz           the shared prefix tokens and its K, V in every layer
    docs.jsonl           one {"id", "text"?} per document, in bank order
    doc_tokens.i32       every document's tokens (id tokens first), concatenated
    doc_index.i64        [N, 5]: token offset, token count, id length, first chunk, chunks
    chunk_doc.i32        [C]: the document of each chunk (documents contiguous, in order)
    layer_XX.kr          [C, Hkv*D]: L2-normalised pooled router keys K̄R of router layer XX
    layer_XX.k, .v       [C, Hkv, D]: pooled keys K̄ and values V̄
    layer_XX.kr_scale    [C] float32, only when K̄R is quantised (fp8 e4m3 / int8 codes)
    layer_XX.k_scale, .v_scale  [C, Hkv] float32, only when K̄/V̄ are int8 codes

Precisions (``kr_dtype``, ``kv_dtype`` in the manifest, chosen at encode time): the model
dtype by default, or quantised codes with a per-chunk (K̄R) / per-(chunk, kv-head) (K̄/V̄)
scale, ``x ≈ scale · codes`` (``quantize.py``). Scales are arrays like any other
(checksummed, truncated and resumed with the rest). The prefix K/V stay in the model dtype.

Why raw little-endian arrays and not tensorstore/zarr or safetensors: the bank is written
once in order and read by row ranges. A flat file appends without rewriting anything,
``np.memmap`` slices it without reading the rest (a bank may exceed RAM), and a crash can
only leave bytes past the committed row count, which a resume truncates. The manifest is
replaced atomically (write, fsync, rename) after the data it describes is on disk, so it
never names a row that is not there. Every committed segment carries a BLAKE2b checksum
(``open_bank(verify=True)`` re-reads and checks them all).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from msa_jax.config import IMPLEMENTATION_FIELDS
from msa_jax.inference import quantize

FORMAT = "msa_jax.bank/1"
MANIFEST = "manifest.json"
PREFIX_FILE = "prefix.npz"
DOCS_FILE = "docs.jsonl"
INDEX_COLUMNS = ("token_offset", "num_tokens", "id_length", "chunk_start", "num_chunks")


def _bank_codes(arrs: dict, part: str, dtype: str, name: str):
  """``(codes, scale)`` of ``arrs[part]`` in the bank precision ``dtype``: as given when
  the rows are already in it (with ``arrs[part + "_scale"]`` for 8-bit), else quantised."""
  x, scale = arrs[part], arrs.get(part + "_scale")
  already = np.dtype(x.dtype) == quantize.np_dtype(dtype)
  if not already:
    if scale is not None:
      raise ValueError(f"{name}: rows in {x.dtype} with a scale, but the bank stores {dtype}; "
                       "encode with the bank's precisions")
    return quantize.quantise(x, dtype, 1)
  if quantize.is_quantised(dtype) and scale is None:
    raise ValueError(f"{name}: {dtype} codes without their {part}_scale")
  return x, scale


class BankError(ValueError):
  """A bank that cannot be used: missing, truncated, corrupt, or from another model."""


def _digest(data: bytes | memoryview) -> str:
  return hashlib.blake2b(data, digest_size=16).hexdigest()


def model_fingerprint(model_config, params) -> str:
  """A hash of what fixes the bank's contents: the model config and every parameter.

  Implementation switches (``config.IMPLEMENTATION_FIELDS``: remat, layer scan, kernels, how a
  gradient is computed) are left out: they do not change the computation (and a bank
  fingerprinted before a switch existed keeps its fingerprint).
  """
  import jax
  cfg = model_config.to_dict()
  for name in IMPLEMENTATION_FIELDS:
    cfg.pop(name, None)
  h = hashlib.blake2b(digest_size=16)
  h.update(json.dumps(cfg, sort_keys=True).encode())
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
    arr = np.asarray(jax.device_get(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class DocRecord:
  """One document as the bank stores it."""

  doc_id: str
  tokens: list[int]       # id tokens first (what interleave injects)
  id_length: int
  text: Optional[str] = None


def array_specs(model_config, kr_dtype: str, kv_dtype: str) -> dict[str, tuple[str, tuple]]:
  """``{file name: (dtype, row shape)}`` of every array a bank of this model holds."""
  g, d = model_config.num_kv_heads, model_config.head_dim
  specs = {"doc_tokens.i32": ("int32", ()), "doc_index.i64": ("int64", (len(INDEX_COLUMNS),)),
           "chunk_doc.i32": ("int32", ())}
  for i in model_config.router_layer_ids:
    specs[f"layer_{i:02d}.kr"] = (kr_dtype, (g * d,))
    if quantize.is_quantised(kr_dtype):
      specs[f"layer_{i:02d}.kr_scale"] = (quantize.SCALE_DTYPE, ())
    for part in ("k", "v"):
      specs[f"layer_{i:02d}.{part}"] = (kv_dtype, (g, d))
      if quantize.is_quantised(kv_dtype):
        specs[f"layer_{i:02d}.{part}_scale"] = (quantize.SCALE_DTYPE, (g,))
  return specs


def _prefix_dtype(manifest: dict) -> str:
  """The prefix K/V's dtype: the K̄/V̄ dtype of a float bank, else the model's compute dtype."""
  kv = manifest["kv_dtype"]
  return manifest["model_config"]["dtype"] if quantize.is_quantised(kv) else kv


def check_precision(manifest: dict, path: str) -> None:
  """Raises ``BankError`` unless every layer array has the manifest's precision and exactly
  the scale arrays it needs (a hand-edited or mixed-up manifest)."""
  kr_dtype, kv_dtype = manifest.get("kr_dtype"), manifest.get("kv_dtype")
  for dtype, kind in ((kr_dtype, "kr"), (kv_dtype, "kv")):
    if dtype not in (quantize.KR_DTYPES if kind == "kr" else quantize.KV_DTYPES):
      raise BankError(f"{os.path.join(path, MANIFEST)}: {kind}_dtype {dtype!r} is not a bank "
                      "precision this version reads; re-encode the bank")
  arrays = manifest["arrays"]
  for i in manifest["router_layers"]:
    for part, dtype in (("kr", kr_dtype), ("k", kv_dtype), ("v", kv_dtype)):
      name = f"layer_{i:02d}.{part}"
      if name not in arrays:
        raise BankError(f"bank {path}: the manifest lists no {name}; the bank is damaged: "
                        "re-encode it")
      if arrays[name]["dtype"] != dtype:
        raise BankError(f"bank {path}: {name} is stored as {arrays[name]['dtype']} but the "
                        f"manifest's {'kr' if part == 'kr' else 'kv'}_dtype is {dtype}; the "
                        "manifest is inconsistent: re-encode the bank")
      scale = name + "_scale"
      if quantize.is_quantised(dtype) and scale not in arrays:
        raise BankError(f"bank {path}: {name} holds {dtype} codes but the manifest has no "
                        f"{scale} (their scales); the bank is damaged: re-encode it")
      if not quantize.is_quantised(dtype) and scale in arrays:
        raise BankError(f"bank {path}: {scale} is listed but {name} is {dtype} (not "
                        "quantised); the manifest is inconsistent: re-encode the bank")
      if scale in arrays and arrays[scale]["rows"] != arrays[name]["rows"]:
        raise BankError(f"bank {path}: {scale} has {arrays[scale]['rows']} rows for "
                        f"{arrays[name]['rows']} rows of {name}; re-encode the bank")


def _atomic_write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class BankWriter:
  """Appends documents to a bank and commits them; resumes an interrupted bank.

  Use :meth:`create` for a new bank or :meth:`resume` for one whose manifest exists.
  ``append`` writes rows; ``commit`` makes everything appended so far durable (data
  fsynced, then the manifest replaced). Rows appended but not committed are dropped by
  the next resume.
  """

  def __init__(self, path: str, manifest: dict):
    self.path, self.manifest = path, manifest
    self._files = {}
    for name in manifest["arrays"]:
      self._files[name] = open(os.path.join(path, name), "r+b")
    self._docs = open(os.path.join(path, DOCS_FILE), "r+b")
    self._truncate_to_committed()

  # ------------------------------------------------------------------ set-up
  @classmethod
  def create(cls, path: str, *, fingerprint: str, model_config, kr_dtype: str, kv_dtype: str,
             prefix_tokens: Sequence[int], prefix_kv: Sequence[tuple[np.ndarray, np.ndarray]],
             corpus: dict, tokenizer: dict) -> "BankWriter":
    """A new, empty bank at ``path`` (which must not hold a bank already)."""
    if os.path.exists(os.path.join(path, MANIFEST)):
      raise BankError(f"{path} already holds a bank; resume it or choose another --bank")
    quantize.check_dtype(kr_dtype, "kr")
    quantize.check_dtype(kv_dtype, "kv")
    os.makedirs(path, exist_ok=True)
    np.savez(os.path.join(path, PREFIX_FILE), tokens=np.asarray(prefix_tokens, np.int32),
             # float32 in the npz (numpy has no bfloat16); cast back to the prefix dtype on load
             **{f"k_{i}": np.asarray(k, np.float32) for i, (k, _) in enumerate(prefix_kv)},
             **{f"v_{i}": np.asarray(v, np.float32) for i, (_, v) in enumerate(prefix_kv)})
    with open(os.path.join(path, PREFIX_FILE), "rb") as f:
      prefix_digest = _digest(f.read())
    arrays = {}
    for name, (dtype, row_shape) in array_specs(model_config, kr_dtype, kv_dtype).items():
      open(os.path.join(path, name), "wb").close()
      arrays[name] = {"dtype": dtype, "row_shape": list(row_shape), "rows": 0, "segments": []}
    open(os.path.join(path, DOCS_FILE), "wb").close()
    manifest = {
        "format": FORMAT, "fingerprint": fingerprint, "model_config": model_config.to_dict(),
        "router_layers": list(model_config.router_layer_ids),
        "pooling_chunk_size": model_config.pooling_chunk_size,
        "rope_mode": model_config.rope_mode, "kr_dtype": kr_dtype, "kv_dtype": kv_dtype,
        "kr_scale": "per chunk" if quantize.is_quantised(kr_dtype) else None,
        "kv_scale": "per chunk and kv head" if quantize.is_quantised(kv_dtype) else None,
        "prefix_length": len(prefix_tokens), "prefix_checksum": prefix_digest,
        "num_docs": 0, "num_chunks": 0, "num_tokens": 0, "max_doc_chunks": 0,
        "corpus": dict(corpus, rows_done=0), "tokenizer": tokenizer,
        "docs_jsonl": {"bytes": 0, "segments": []}, "arrays": arrays, "complete": False}
    _atomic_write_json(os.path.join(path, MANIFEST), manifest)
    return cls(path, manifest)

  @classmethod
  def resume(cls, path: str, fingerprint: str, *, kr_dtype: Optional[str] = None,
             kv_dtype: Optional[str] = None) -> "BankWriter":
    """Reopens an interrupted bank (same model, same precisions), dropping uncommitted rows."""
    manifest = read_manifest(path)
    _check_fingerprint(manifest, fingerprint, path)
    for kind, want in (("kr", kr_dtype), ("kv", kv_dtype)):
      have = manifest.get(f"{kind}_dtype")
      if want is not None and want != have:
        raise BankError(f"the bank {path} was started with --{kind}_dtype={have}, this run asks "
                        f"for {want}; rerun with --{kind}_dtype={have} to resume it, or encode "
                        "into a new --bank")
    check_precision(manifest, path)
    return cls(path, manifest)

  def _truncate_to_committed(self) -> None:
    for name, f in self._files.items():
      spec = self.manifest["arrays"][name]
      f.truncate(spec["rows"] * _row_bytes(spec))
      f.seek(0, os.SEEK_END)
    self._docs.truncate(self.manifest["docs_jsonl"]["bytes"])
    self._docs.seek(0, os.SEEK_END)

  # ------------------------------------------------------------------ writing
  def _write(self, name: str, rows: np.ndarray) -> None:
    spec = self.manifest["arrays"][name]
    data = np.ascontiguousarray(rows, dtype=quantize.np_dtype(spec["dtype"]))
    if tuple(data.shape[1:]) != tuple(spec["row_shape"]):
      raise ValueError(f"{name}: rows of shape {data.shape[1:]}, expected {spec['row_shape']}")
    buf = data.tobytes()
    self._files[name].write(buf)
    spec["segments"].append([int(data.shape[0]), _digest(buf)])
    spec["rows"] += int(data.shape[0])

  def append(self, docs: Sequence[DocRecord], layers: dict[int, dict[str, np.ndarray]],
             chunks_per_doc: Sequence[int]) -> None:
    """Appends documents (in bank order) and their pooled chunks.

    ``layers[i]`` holds ``kr [c, F]``, ``k [c, Hkv, D]``, ``v`` for the ``c =
    sum(chunks_per_doc)`` chunks of these documents, in the same order: float rows
    (quantised here to the bank's precisions) or rows already in them, 8-bit ones with
    their ``kr_scale`` / ``k_scale`` / ``v_scale`` (the encoder's, quantised on the device).
    """
    m = self.manifest
    n_chunks = int(sum(chunks_per_doc))
    index = np.zeros((len(docs), len(INDEX_COLUMNS)), np.int64)
    tok_off, chunk_off = m["num_tokens"], m["num_chunks"]
    for j, (doc, c) in enumerate(zip(docs, chunks_per_doc)):
      index[j] = (tok_off, len(doc.tokens), doc.id_length, chunk_off, c)
      tok_off += len(doc.tokens)
      chunk_off += c
    chunk_doc = np.repeat(np.arange(m["num_docs"], m["num_docs"] + len(docs), dtype=np.int32),
                          np.asarray(chunks_per_doc, np.int64))
    self._write("doc_tokens.i32",
                np.concatenate([np.asarray(d.tokens, np.int32) for d in docs]))
    self._write("doc_index.i64", index)
    self._write("chunk_doc.i32", chunk_doc)
    for i, arrs in layers.items():
      for part in ("kr", "k", "v"):
        if arrs[part].shape[0] != n_chunks:
          raise ValueError(f"layer {i} {part}: {arrs[part].shape[0]} chunk rows for "
                           f"{n_chunks} chunks")
        name = f"layer_{i:02d}.{part}"
        codes, scale = _bank_codes(arrs, part, self.manifest["arrays"][name]["dtype"], name)
        self._write(name, codes)
        if scale is not None:
          self._write(name + "_scale", scale)
    lines = "".join(json.dumps({"id": d.doc_id, **({"text": d.text} if d.text is not None
                                                    else {})}) + "\n" for d in docs).encode()
    self._docs.write(lines)
    m["docs_jsonl"]["segments"].append([len(lines), _digest(lines)])
    m["docs_jsonl"]["bytes"] += len(lines)
    m["num_docs"] += len(docs)
    m["num_chunks"] = chunk_off
    m["num_tokens"] = tok_off
    m["max_doc_chunks"] = max(m["max_doc_chunks"], max(chunks_per_doc, default=0))

  def commit(self, corpus_rows_done: int, complete: bool = False) -> None:
    """Makes every appended row durable and records how far the corpus was read."""
    for f in list(self._files.values()) + [self._docs]:
      f.flush()
      os.fsync(f.fileno())
    self.manifest["corpus"]["rows_done"] = int(corpus_rows_done)
    self.manifest["complete"] = bool(complete)
    _atomic_write_json(os.path.join(self.path, MANIFEST), self.manifest)

  def close(self) -> None:
    for f in list(self._files.values()) + [self._docs]:
      f.close()


def _row_bytes(spec: dict) -> int:
  return int(np.prod(spec["row_shape"], dtype=np.int64)) * quantize.np_dtype(spec["dtype"]).itemsize


def read_manifest(path: str) -> dict:
  """The bank's manifest; errors say what is wrong and how to make a bank."""
  file = os.path.join(path, MANIFEST)
  if not os.path.isdir(path):
    raise BankError(f"no bank at {path}: the directory does not exist; write one with "
                    "python -m msa_jax.encode --checkpoint=CKPT --corpus=CORPUS.jsonl "
                    f"--bank={path}")
  if not os.path.isfile(file):
    raise BankError(f"{path} is not a memory bank: {file} is missing (encode one with "
                    "python -m msa_jax.encode)")
  try:
    with open(file) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BankError(f"{file} is corrupt ({e}); re-encode the bank") from None
  if manifest.get("format") != FORMAT:
    raise BankError(f"{file}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
  return manifest


def _check_fingerprint(manifest: dict, fingerprint: Optional[str], path: str,
                       allow_synthetic: bool = False) -> None:
  if manifest.get("synthetic"):
    if fingerprint is not None and not allow_synthetic:
      raise BankError(f"the bank {path} is synthetic (random keys written by "
                      "benchmarks.synth_bank, not a model's encoding): answers from it mean "
                      "nothing; pass allow_synthetic=True (MemoryEngine.load) to load it anyway "
                      "for timing")
    return
  if fingerprint is not None and manifest["fingerprint"] != fingerprint:
    raise BankError(
        f"the bank {path} was encoded by another model or config (bank fingerprint "
        f"{manifest['fingerprint']}, this model's {fingerprint}); encode the corpus with "
        "this checkpoint (python -m msa_jax.encode) or load the checkpoint that wrote it")


class MemoryBank:
  """A committed bank opened read-only; arrays are memory-mapped, nothing is read whole.

  ``kr(i)``, ``k(i)``, ``v(i)``: router layer ``i``'s chunk arrays; ``chunk_doc``,
  ``doc_index`` (columns ``INDEX_COLUMNS``); ``doc_tokens(j)``, ``doc_ids``,
  ``id_table()`` for Memory Interleave; ``prefix_tokens``, ``prefix_kv``.
  """

  def __init__(self, path: str, manifest: dict):
    self.path, self.manifest = path, manifest
    self._maps: dict[str, np.ndarray] = {}
    self._doc_ids: Optional[list[str]] = None
    self._id_table: Optional[dict] = None
    with np.load(os.path.join(path, PREFIX_FILE)) as z:
      self.prefix_tokens = z["tokens"].tolist()
      n_layers = manifest["model_config"]["num_layers"]
      dtype = quantize.np_dtype(_prefix_dtype(manifest))
      self.prefix_kv = [(z[f"k_{i}"].astype(dtype), z[f"v_{i}"].astype(dtype))
                        for i in range(n_layers)]

  @property
  def num_docs(self) -> int:
    return self.manifest["num_docs"]

  @property
  def num_chunks(self) -> int:
    return self.manifest["num_chunks"]

  @property
  def num_tokens(self) -> int:
    return self.manifest["num_tokens"]

  @property
  def max_doc_chunks(self) -> int:
    return self.manifest["max_doc_chunks"]

  @property
  def router_layers(self) -> list[int]:
    return list(self.manifest["router_layers"])

  def array(self, name: str) -> np.ndarray:
    """A read-only memory map of one array, ``[rows, *row_shape]``."""
    if name not in self._maps:
      spec = self.manifest["arrays"][name]
      shape = (spec["rows"], *spec["row_shape"])
      if spec["rows"] == 0:
        self._maps[name] = np.zeros(shape, quantize.np_dtype(spec["dtype"]))
      else:
        self._maps[name] = np.memmap(os.path.join(self.path, name), quantize.np_dtype(spec["dtype"]),
                                     mode="r", shape=shape)
    return self._maps[name]

  def kr(self, layer: int) -> np.ndarray:
    return self.array(f"layer_{layer:02d}.kr")

  def k(self, layer: int) -> np.ndarray:
    return self.array(f"layer_{layer:02d}.k")

  def v(self, layer: int) -> np.ndarray:
    return self.array(f"layer_{layer:02d}.v")

  def scale(self, layer: int, part: str) -> Optional[np.ndarray]:
    """The scales of layer ``layer``'s ``part`` (``"kr"`` ``[C]``, ``"k"``/``"v"``
    ``[C, Hkv]``), or None where that part is stored in a float dtype."""
    name = f"layer_{layer:02d}.{part}_scale"
    return self.array(name) if name in self.manifest["arrays"] else None

  @property
  def kr_dtype(self) -> str:
    return self.manifest["kr_dtype"]

  @property
  def kv_dtype(self) -> str:
    return self.manifest["kv_dtype"]

  @property
  def compute_dtype(self) -> str:
    """The dtype K̄/V̄ reach attention in (the model's; float banks: their own dtype)."""
    return _prefix_dtype(self.manifest)

  @property
  def chunk_doc(self) -> np.ndarray:
    return self.array("chunk_doc.i32")

  @property
  def doc_index(self) -> np.ndarray:
    return self.array("doc_index.i64")

  def doc_tokens(self, j: int) -> list[int]:
    """Document ``j``'s tokens, id tokens first."""
    off, n = self.doc_index[j, 0], self.doc_index[j, 1]
    return self.array("doc_tokens.i32")[off:off + n].tolist()

  def doc_id_tokens(self, j: int) -> list[int]:
    """Document ``j``'s id tokens (empty for a document without an id)."""
    off, id_len = self.doc_index[j, 0], self.doc_index[j, 2]
    return self.array("doc_tokens.i32")[off:off + id_len].tolist()

  @property
  def doc_ids(self) -> list[str]:
    """Every document's id, in bank order (read from docs.jsonl once)."""
    if self._doc_ids is None:
      ids = []
      with open(os.path.join(self.path, DOCS_FILE), "rb") as f:
        data = f.read(self.manifest["docs_jsonl"]["bytes"])
      for line in data.splitlines():
        ids.append(json.loads(line)["id"])
      self._doc_ids = ids
    return self._doc_ids

  def id_table(self) -> dict[tuple[int, ...], int]:
    """``{id tokens: document index}``: how a generated id names a document."""
    if self._id_table is None:
      index = np.asarray(self.doc_index)
      tokens = self.array("doc_tokens.i32")
      table = {}
      for j in range(index.shape[0]):
        off, _, id_len = index[j, 0], index[j, 1], index[j, 2]
        if id_len:
          table[tuple(tokens[off:off + id_len].tolist())] = j
      self._id_table = table
    return self._id_table

  def verify(self) -> None:
    """Re-reads every committed segment and checks its checksum (slow for large banks)."""
    for name, spec in self.manifest["arrays"].items():
      row = _row_bytes(spec)
      with open(os.path.join(self.path, name), "rb") as f:
        for i, (rows, digest) in enumerate(spec["segments"]):
          if _digest(f.read(rows * row)) != digest:
            raise BankError(f"{os.path.join(self.path, name)} is corrupt: segment {i} does "
                            "not match its checksum; re-encode the bank")
    with open(os.path.join(self.path, DOCS_FILE), "rb") as f:
      for i, (size, digest) in enumerate(self.manifest["docs_jsonl"]["segments"]):
        if _digest(f.read(size)) != digest:
          raise BankError(f"{os.path.join(self.path, DOCS_FILE)} is corrupt: segment {i} does "
                          "not match its checksum; re-encode the bank")


def open_bank(path: str, fingerprint: Optional[str] = None, *, verify: bool = False,
              allow_incomplete: bool = False, allow_synthetic: bool = False) -> MemoryBank:
  """Opens a bank for reading, checking that it is whole and (if given) from this model.

  A missing or short file raises ``BankError`` naming it; ``fingerprint`` (see
  :func:`model_fingerprint`) must match the bank's; an interrupted encode is refused
  unless ``allow_incomplete``; ``verify`` checks every segment's checksum. A synthetic bank
  (``benchmarks.synth_bank``: random keys, no model) is refused when a fingerprint is given
  unless ``allow_synthetic``.
  """
  manifest = read_manifest(path)
  _check_fingerprint(manifest, fingerprint, path, allow_synthetic)
  check_precision(manifest, path)
  if not manifest.get("complete") and not allow_incomplete:
    raise BankError(f"the bank {path} is incomplete ({manifest['corpus']['rows_done']} corpus "
                    "rows encoded): rerun the same python -m msa_jax.encode command to finish it")
  needed = {name: spec["rows"] * _row_bytes(spec) for name, spec in manifest["arrays"].items()}
  needed[DOCS_FILE] = manifest["docs_jsonl"]["bytes"]
  for name in [PREFIX_FILE, *needed]:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise BankError(f"bank file {file} is missing; the bank is damaged: re-encode it")
    size = os.path.getsize(file)
    if name in needed and size < needed[name]:
      raise BankError(f"bank file {file} is truncated: {size:,} bytes, the manifest commits "
                      f"{needed[name]:,}; re-encode the bank (or restore the file)")
  with open(os.path.join(path, PREFIX_FILE), "rb") as f:
    if _digest(f.read()) != manifest["prefix_checksum"]:
      raise BankError(f"bank file {os.path.join(path, PREFIX_FILE)} is corrupt (checksum); "
                      "re-encode the bank")
  bank = MemoryBank(path, manifest)
  if verify:
    bank.verify()
  return bank


def convert_bank(src: str, dst: str, *, kr_dtype: str, kv_dtype: str,
                 docs_per_window: int = 65_536, log=print) -> "MemoryBank":
  """Writes the bank ``src`` into a new bank ``dst`` at other precisions, without the model.

  ``src`` must hold K̄R and K̄/V̄ in the model's dtype (an unquantised encode): its rows are
  then exactly the encoder's output, so ``dst`` equals encoding the corpus with
  ``--kr_dtype``/``--kv_dtype`` byte for byte (the tests check it). Documents, tokens,
  prefix, fingerprint and corpus record are copied; ``dst`` must not exist.
  """
  from msa_jax.config import ModelConfig
  source = open_bank(src)
  m = source.manifest
  model_dtype = m["model_config"]["dtype"]
  if (m["kr_dtype"], m["kv_dtype"]) != (model_dtype, model_dtype):
    raise BankError(f"convert_bank reads a bank in the model dtype ({model_dtype}); {src} holds "
                    f"K̄R {m['kr_dtype']}, K̄/V̄ {m['kv_dtype']}: convert from the unquantised "
                    "bank, or re-encode with python -m msa_jax.encode --kr_dtype/--kv_dtype")
  model_config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in m["model_config"].items()})
  prefix_dtype = np.float32
  with np.load(os.path.join(src, PREFIX_FILE)) as z:
    prefix_kv = [(z[f"k_{i}"].astype(prefix_dtype), z[f"v_{i}"].astype(prefix_dtype))
                 for i in range(model_config.num_layers)]
  writer = BankWriter.create(dst, fingerprint=m["fingerprint"], model_config=model_config,
                             kr_dtype=kr_dtype, kv_dtype=kv_dtype,
                             prefix_tokens=source.prefix_tokens, prefix_kv=prefix_kv,
                             corpus={k: v for k, v in m["corpus"].items() if k != "rows_done"},
                             tokenizer=m["tokenizer"])
  texts = []
  with open(os.path.join(src, DOCS_FILE), "rb") as f:
    for line in f.read(m["docs_jsonl"]["bytes"]).splitlines():
      texts.append(json.loads(line).get("text"))
  index = np.asarray(source.doc_index)
  try:
    for lo in range(0, source.num_docs, docs_per_window):
      hi = min(lo + docs_per_window, source.num_docs)
      docs = [DocRecord(source.doc_ids[j], source.doc_tokens(j), int(index[j, 2]), texts[j])
              for j in range(lo, hi)]
      c0 = int(index[lo, 3])
      c1 = int(index[hi - 1, 3] + index[hi - 1, 4])
      layers = {i: {"kr": np.asarray(source.kr(i)[c0:c1]), "k": np.asarray(source.k(i)[c0:c1]),
                    "v": np.asarray(source.v(i)[c0:c1])} for i in source.router_layers}
      writer.append(docs, layers, index[lo:hi, 4].tolist())
      done = hi == source.num_docs
      writer.commit(m["corpus"]["rows_done"] if done else 0, complete=done)
      log(f"convert: {hi:,}/{source.num_docs:,} documents -> {dst} (K̄R {kr_dtype}, "
          f"K̄/V̄ {kv_dtype})")
  finally:
    writer.close()
  return open_bank(dst)
