r"""Stage 1: encode a corpus once into an on-disk memory bank (SPEC §5).

  python -m msa_jax.encode --checkpoint=CKPT --corpus=CORPUS.jsonl --bank=BANK

Corpus rows: ``{"id": str, "text": str}`` (stored as the tokenizer's id tokens + text
tokens, as in training) or ``{"id": str, "tokens": [int]}`` (stored as given; optional
``"text"`` is kept for display). Before anything is encoded the whole corpus is checked:
rows that are not valid JSON, empty documents and duplicate ids are reported with their
line numbers.

Documents are encoded in windows of about ``window_tokens`` tokens: each window is cut
into length-bucketed batches (few shapes, so few compiles), encoded with the model's own
``encode_documents`` and ``pool_layer_memory``, written in corpus order and committed.
A window is written and committed on a thread while the next one is encoded.
SIGTERM or Ctrl-C stops after the window in flight; a kill loses at most the uncommitted
windows (the one being written and the one being encoded). Rerunning the same command
resumes after the last committed corpus row, so no document is lost or duplicated.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax.inference import bank as bank_lib
from msa_jax.inference import quantize
from msa_jax.inference.bank import DocRecord


class CorpusError(ValueError):
  """Bad corpus rows, each named by ``file:line``."""


@dataclasses.dataclass
class CorpusInfo:
  """What the validation pass learnt about a corpus."""

  path: str
  rows: int
  bytes: int


def _doc_from_row(row: dict, tokenizer, vocab_size: int) -> tuple[Optional[DocRecord], str]:
  """A row as a ``DocRecord``, or ``(None, reason)``."""
  doc_id = row.get("id")
  if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
    return None, f"document id {doc_id!r} must be a non-empty string or int"
  doc_id = str(doc_id)
  text = row.get("text")
  if text is not None and not isinstance(text, str):
    return None, f"document {doc_id!r}: 'text' should be a string"
  if "tokens" in row:
    tokens = row["tokens"]
    # type(t) is int: JSON ints only (bool is a subclass of int and is refused).
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
      return None, f"document {doc_id!r}: 'tokens' should be a list of ints"
    if not tokens:
      return None, f"document {doc_id!r} is empty (no tokens); drop it or fill it"
    if min(tokens) < 0 or max(tokens) >= vocab_size:
      bad = next(t for t in tokens if not 0 <= t < vocab_size)
      return None, (f"document {doc_id!r}: token {bad} is outside the model's vocabulary "
                    f"[0, {vocab_size})")
    id_tokens = tokenizer.encode_doc_id(doc_id) if tokenizer is not None else []
    id_len = len(id_tokens) if id_tokens and tokens[:len(id_tokens)] == id_tokens else 0
    return DocRecord(doc_id, tokens, id_len, text), ""
  if text is None:
    return None, f"document {doc_id!r} has neither 'text' nor 'tokens'"
  if not text.strip():
    return None, f"document {doc_id!r} has empty text; drop it or fill it"
  if tokenizer is None:
    return None, "a 'text' row needs a tokenizer (pass --tokenizer_dir)"
  id_tokens = tokenizer.encode_doc_id(doc_id)
  try:
    tokens = id_tokens + tokenizer.encode(text)
  except KeyError as e:   # the synthetic word tokenizer's unknown word
    return None, f"document {doc_id!r}: {e.args[0]}"
  return DocRecord(doc_id, tokens, len(id_tokens), text), ""


def _lines(path: str, start_row: int = 0) -> Iterator[tuple[int, str]]:
  """``(line number, line)`` of the non-blank lines from the ``start_row``-th on."""
  seen = 0
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      if seen >= start_row:
        yield n, line
      seen += 1


def read_rows(path: str, tokenizer, vocab_size: int, start_row: int = 0
              ) -> Iterator[DocRecord]:
  """The corpus' documents from row ``start_row`` on (rows already validated)."""
  for n, line in _lines(path, start_row):
    doc, why = _doc_from_row(json.loads(line), tokenizer, vocab_size)
    if doc is None:
      raise CorpusError(f"{path}:{n}: {why}")
    yield doc


def validate_corpus(path: str, tokenizer, vocab_size: int, max_errors: int = 20) -> CorpusInfo:
  """Reads the whole corpus once; raises ``CorpusError`` listing bad rows by line."""
  if not os.path.isfile(path):
    raise CorpusError(f"corpus {path} not found: pass --corpus=FILE.jsonl")
  problems: list[str] = []
  first_line: dict[str, int] = {}
  rows = 0
  try:
    for n, line in _lines(path):
      rows += 1
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        problems.append(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
        continue
      if not isinstance(row, dict):
        problems.append(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        continue
      doc, why = _doc_from_row(row, tokenizer, vocab_size)
      if doc is None:
        problems.append(f"{path}:{n}: {why}")
        continue
      if doc.doc_id in first_line:
        problems.append(f"{path}:{n}: duplicate document id {doc.doc_id!r} (first at line "
                        f"{first_line[doc.doc_id]}); ids must be unique in a bank")
      else:
        first_line[doc.doc_id] = n
  except UnicodeDecodeError as e:
    raise CorpusError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                      "re-save the corpus as UTF-8") from None
  if problems:
    more = f"\n... and {len(problems) - max_errors} more" if len(problems) > max_errors else ""
    raise CorpusError(f"{len(problems)} bad corpus row(s); fix them and rerun:\n"
                      + "\n".join(problems[:max_errors]) + more)
  if rows == 0:
    raise CorpusError(f"corpus {path} has no documents")
  return CorpusInfo(os.path.abspath(path), rows, os.path.getsize(path))


def length_buckets(chunk_size: int, max_len: int) -> list[int]:
  """Padded document lengths P·{1, 2, 3, 4, 6, 8, 12, ...} (powers of two and 1.5× them),
  up to the first at or above ``max_len``: at most 1/3 of a batch is padding (not 1/2),
  with shapes fixed in advance so that every window reuses the same compiles (the
  ``tiny`` recipe's 48-token documents are 6 chunks: exactly one level, no padding)."""
  levels, n = [], 1
  while True:
    for m in (n, n + n // 2) if n >= 2 else (n,):
      levels.append(m * chunk_size)
      if levels[-1] >= max_len:
        return levels
    n *= 2


def padded_widths(lengths: np.ndarray, chunk_size: int, width_multiple: int = 0):
  """``(widths, level of each document)``: the padded lengths documents are batched at.

  ``width_multiple=0``: :func:`length_buckets` (at most 1/3 padding, few shapes for any
  corpus); else each document's length rounded up to that multiple, one shape per distinct
  rounded length: for corpora of few lengths (synthetic tasks), where whole chunks waste
  more (the 4b recipe's 100-token documents: 128 slots of P 64, 22 % padding; 104 with a
  multiple of 8, 4 %). Pooling masks a partial last chunk, so the bank's content is the
  same either way (to float rounding)."""
  if width_multiple < 0:
    raise ValueError(f"width_multiple={width_multiple}: 0 (chunk-size levels) or a positive "
                     "multiple of tokens")
  if width_multiple:
    rounded = -(-lengths // width_multiple) * width_multiple
    widths = sorted(int(w) for w in np.unique(rounded))
    return widths, np.searchsorted(widths, rounded)
  widths = length_buckets(chunk_size, int(lengths.max()))
  return widths, np.searchsorted(widths, lengths)


class Encoder:
  """Runs the model's stage-1 functions on batches of documents of one padded shape.

  ``width_multiple``: how documents are padded into batches (:func:`padded_widths`).
  """

  def __init__(self, model, params, *, batch_tokens: int = 16_384,
               kr_dtype: Optional[str] = None, kv_dtype: Optional[str] = None,
               width_multiple: int = 0, log: Optional[Callable[[str], None]] = None):
    self.model, self.params = model, params
    # Each batch shape's first call (its compile) is timed and logged: at large model
    # shapes it can take minutes before the first window's progress line.
    self.log = log
    self._compiled_shapes: set[tuple[int, int]] = set()
    cfg = model.config
    self.cfg = cfg
    self.batch_tokens = batch_tokens
    self.width_multiple = width_multiple
    self.kr_dtype = kr_dtype or cfg.dtype
    self.kv_dtype = kv_dtype or cfg.dtype
    # Pooling and quantisation in one program: the host receives the bank's codes and
    # scales (half the bytes of bf16 for 8-bit banks), not float rows to quantise itself,
    # which took ~2/3 of a 4B encode's time (numpy fp8/int8 over 18 layers × 3 arrays).
    self._encode = jax.jit(functools.partial(_encode_docs_quantised, model, self.kr_dtype,
                                             self.kv_dtype))
    # Seconds spent in encode() (device work and the copy back) and in writing banks
    # (BankWriter.append + commit, on the encode loop's writer thread, overlapping the next
    # window's encode): where an encode's time goes.
    self.seconds = {"encode": 0.0, "write": 0.0}
    self._prefix = jax.jit(functools.partial(_encode_prefix, model))

  def prefix_kv(self, prefix_tokens: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each layer's K, V of the shared prefix: ``[(k [T, Hkv, D], v), ...]``."""
    t = len(prefix_tokens)
    tokens = jnp.asarray(np.asarray(prefix_tokens, np.int32).reshape(1, t))
    kv = self._prefix(self.params, tokens)
    return [(np.asarray(k[0]), np.asarray(v[0])) for k, v in kv]

  def encode(self, docs: Sequence[DocRecord], starts: Sequence[int]):
    """Pooled chunks of ``docs`` (positions from ``starts``): ``(layers, chunks per doc)``.

    ``layers[i]`` holds ``kr``, ``k``, ``v`` rows of every document's chunks in the
    encoder's bank precisions (``kr_dtype``, ``kv_dtype``; quantised on the device,
    ``quantize.quantise_jax``), with ``kr_scale``, ``k_scale``, ``v_scale`` for the 8-bit
    ones; documents in the given order (batches are cut by length, their rows put back in
    order). Raises ``ValueError`` if a chunk of a document is not finite.
    """
    cfg = self.cfg
    p = cfg.pooling_chunk_size
    lengths = np.array([len(d.tokens) for d in docs], np.int64)
    flat = np.concatenate([np.asarray(d.tokens, np.int32) for d in docs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts = np.asarray(starts, np.int64)
    chunks = -(-lengths // p)
    first_row = np.concatenate([[0], np.cumsum(chunks)])      # window order
    levels, level_of = padded_widths(lengths, p, self.width_multiple)
    out = {i: {} for i in cfg.router_layer_ids}

    def collect(group, present, dest, encoded):
      arrays, finite_gc = encoded
      if not np.all(np.asarray(finite_gc)[:len(group)][present]):
        raise ValueError(quantize.NON_FINITE)
      for i, parts in arrays.items():
        for name, arr in parts.items():
          rows_ = np.asarray(arr[:len(group)])[present]
          if out[i].get(name) is None:
            out[i][name] = np.empty((first_row[-1], *rows_.shape[1:]), rows_.dtype)
          out[i][name][dest] = rows_

    # One batch in flight: the next batch is built and dispatched before the previous
    # one's rows are copied back, so the device never waits for the host's numpy work.
    in_flight = None
    for lv in np.unique(level_of):
      width = levels[lv]
      rows = max(1, self.batch_tokens // width)
      members = np.nonzero(level_of == lv)[0]
      for s in range(0, len(members), rows):
        group = members[s:s + rows]
        col = np.arange(width)
        mask = np.zeros((rows, width), bool)
        mask[:len(group)] = col[None] < lengths[group][:, None]
        take = np.where(mask[:len(group)], offsets[group][:, None] + col[None], 0)
        tokens = np.zeros((rows, width), np.int32)
        tokens[:len(group)] = np.where(mask[:len(group)], flat[take], 0)
        pos = np.zeros((rows, width), np.int32)
        pos[:len(group)] = starts[group][:, None] + col[None]
        first_call = (rows, width) not in self._compiled_shapes
        t_call = time.perf_counter()
        memory = self._encode(self.params, jnp.asarray(tokens), jnp.asarray(mask),
                              jnp.asarray(pos))
        if first_call:
          self._compiled_shapes.add((rows, width))
          if self.log is not None:
            jax.block_until_ready(memory)
            self.log(f"encoder: batches of {rows} × {width} tokens compiled and ran in "
                     f"{time.perf_counter() - t_call:.1f}s")
        c_max = -(-width // p)
        present = np.arange(c_max)[None] < chunks[group][:, None]        # [g, C]
        dest = (first_row[group][:, None] + np.arange(c_max)[None])[present]
        if in_flight is not None:
          collect(*in_flight)
        in_flight = (group, present, dest, memory)
    if in_flight is not None:
      collect(*in_flight)
    return out, chunks.tolist()


def _encode_docs(model, params, tokens_nl, mask_nl, pos_nl):
  from msa_jax.model import MSAModel
  return model.apply({"params": params}, tokens_nl[None], mask_nl[None], pos_nl[None],
                     method=MSAModel.encode_documents)


def _encode_docs_quantised(model, kr_dtype: str, kv_dtype: str, params, tokens_nl, mask_nl,
                           pos_nl):
  """:func:`_encode_docs` with each router layer's pooled chunks in the bank's precisions:
  ``({layer: {"kr": codes [n, C, F], "kr_scale": [n, C], "k": ..., "v": ...}}, finite
  [n, C])`` (no ``*_scale`` for float precisions; ``finite``: every value of the chunk
  is finite, checked by the caller on the chunks that exist)."""
  memory = _encode_docs(model, params, tokens_nl, mask_nl, pos_nl)
  out, finite = {}, None
  for i, mem in memory.items():
    parts = {}
    for part, arr, dtype in (("kr", mem.kr_bncf[0], kr_dtype), ("k", mem.k_bncgd[0], kv_dtype),
                             ("v", mem.v_bncgd[0], kv_dtype)):
      ok = jnp.all(jnp.isfinite(arr).reshape(*arr.shape[:2], -1), axis=-1)
      finite = ok if finite is None else finite & ok
      codes, scale = quantize.quantise_jax(arr, dtype, 1)
      parts[part] = codes
      if scale is not None:
        parts[part + "_scale"] = scale
    out[i] = parts
  return out, finite


def _encode_prefix(model, params, tokens_bt):
  from msa_jax.model import MSAModel
  b, t = tokens_bt.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return model.apply({"params": params}, tokens_bt, jnp.ones((b, t), bool), pos,
                     method=MSAModel.encode_prefix)


class _Stop:
  """SIGTERM / Ctrl-C: finish the window in flight, commit, exit."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    self._prev = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, *_):
    self.requested = True

  def __exit__(self, *exc):
    for s, h in self._prev.items():
      signal.signal(s, h)


def _fmt_time(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def encode_corpus(model, params, corpus_path: str, bank_path: str, *, tokenizer,
                  prefix_tokens: Sequence[int], fingerprint: Optional[str] = None,
                  window_tokens: int = 1 << 20, batch_tokens: int = 16_384,
                  kr_dtype: Optional[str] = None, kv_dtype: Optional[str] = None,
                  max_windows: Optional[int] = None, width_multiple: int = 0,
                  log=print, encoder: Optional["Encoder"] = None) -> dict:
  """Encodes ``corpus_path`` into the bank at ``bank_path`` (created, or resumed).

  ``kr_dtype``/``kv_dtype``: the bank's precisions (``quantize.KR_DTYPES``/``KV_DTYPES``;
  None: the model dtype, or on resume the bank's own). ``max_windows`` stops after that
  many windows, as an interruption would (tests). ``width_multiple``: the encoder's
  padding of documents (``padded_widths``; 0: chunk-size levels). ``fingerprint`` (the
  model's, ``bank.model_fingerprint``) and ``encoder`` (an :class:`Encoder` of the same
  model, params and precisions) may be given to skip hashing every parameter and
  compiling again, e.g. when encoding several corpora with one model.
  Returns the bank's manifest (``complete`` tells whether the corpus is done).
  """
  info = validate_corpus(corpus_path, tokenizer, model.config.vocab_size)
  corpus = {"path": info.path, "rows": info.rows, "bytes": info.bytes}
  return _encode(model, params, bank_path, corpus, tokenizer=tokenizer,
                 prefix_tokens=prefix_tokens, fingerprint=fingerprint,
                 rows_from=lambda done: read_rows(corpus_path, tokenizer,
                                                  model.config.vocab_size, start_row=done),
                 window_tokens=window_tokens, batch_tokens=batch_tokens, kr_dtype=kr_dtype,
                 kv_dtype=kv_dtype, max_windows=max_windows, log=log,
                 width_multiple=width_multiple, encoder=encoder)


def encode_documents(model, params, documents, num_docs: int, bank_path: str, *,
                     source: str, tokenizer, prefix_tokens: Sequence[int],
                     fingerprint: Optional[str] = None, window_tokens: int = 1 << 22,
                     batch_tokens: int = 262_144, kr_dtype: Optional[str] = None,
                     kv_dtype: Optional[str] = None, max_windows: Optional[int] = None,
                     encoder: Optional["Encoder"] = None, width_multiple: int = 0,
                     log=print) -> dict:
  """Encodes generated documents into a bank, without a corpus file (no JSON to write,
  validate and parse again: the fast path for synthetic corpora of 100M tokens).
  ``encoder``: an ``Encoder`` of the same model and parameters to reuse (its compiled
  shapes too, e.g. across banks of several sizes); by default a new one, padding documents
  as ``width_multiple`` says (``padded_widths``).

  ``documents(start, stop)`` returns the ``DocRecord``s of rows ``[start, stop)``, the same
  every call; ``source`` names the corpus in the manifest (e.g. ``"write_task:tiny:seed0"``)
  and a resume is accepted only for the same ``source`` and ``num_docs``. Interrupting and
  rerunning resumes after the last committed row, as ``encode_corpus`` does.
  """
  if num_docs < 1:
    raise ValueError(f"num_docs={num_docs}: encode at least one document")
  corpus = {"path": str(source), "rows": int(num_docs), "bytes": 0}

  def rows_from(done: int) -> Iterator[DocRecord]:
    block = 16_384
    for start in range(done, num_docs, block):
      docs = documents(start, min(num_docs, start + block))
      for d in docs:
        if len(d.tokens) == 0:
          raise CorpusError(f"{source}: document {d.doc_id!r} is empty")
      yield from docs
  return _encode(model, params, bank_path, corpus, tokenizer=tokenizer,
                 prefix_tokens=prefix_tokens, fingerprint=fingerprint, rows_from=rows_from,
                 window_tokens=window_tokens, batch_tokens=batch_tokens, kr_dtype=kr_dtype,
                 kv_dtype=kv_dtype, max_windows=max_windows, log=log, encoder=encoder,
                 width_multiple=width_multiple)


def _encode(model, params, bank_path: str, corpus: dict, *, tokenizer, prefix_tokens,
            fingerprint, rows_from, window_tokens: int, batch_tokens: int, kr_dtype,
            kv_dtype, max_windows, log, encoder: Optional[Encoder] = None,
            width_multiple: int = 0) -> dict:
  """The encode loop shared by a corpus file and generated documents: ``corpus`` is the
  manifest's record of the source, ``rows_from(done)`` its documents from row ``done``."""
  cfg = model.config
  for dtype, kind in ((kr_dtype, "kr"), (kv_dtype, "kv")):
    if dtype is not None:
      quantize.check_dtype(dtype, kind)
  fingerprint = fingerprint or bank_lib.model_fingerprint(cfg, params)
  if encoder is None or encoder.model is not model or encoder.params is not params:
    encoder = Encoder(model, params, batch_tokens=batch_tokens, kr_dtype=kr_dtype,
                      kv_dtype=kv_dtype, width_multiple=width_multiple, log=log)
  elif (kr_dtype or encoder.kr_dtype, kv_dtype or encoder.kv_dtype) != (encoder.kr_dtype,
                                                                        encoder.kv_dtype):
    raise ValueError(f"the encoder given writes K̄R {encoder.kr_dtype}, K̄/V̄ "
                     f"{encoder.kv_dtype}, not the {kr_dtype}/{kv_dtype} asked for; pass a "
                     "matching Encoder or none")
  total = corpus["rows"]
  if os.path.isfile(os.path.join(bank_path, bank_lib.MANIFEST)):
    writer = bank_lib.BankWriter.resume(bank_path, fingerprint, kr_dtype=kr_dtype,
                                        kv_dtype=kv_dtype)
    m = writer.manifest
    then = m["corpus"]
    if (then["path"] != corpus["path"] and not corpus["bytes"]) or (
        (then["bytes"], then["rows"]) != (corpus["bytes"], corpus["rows"])):
      writer.close()
      raise CorpusError(f"the corpus {corpus['path']} changed since the bank {bank_path} was "
                        f"started ({then['path']}: {then['rows']} rows, {then['bytes']} bytes "
                        f"then; {corpus['rows']}, {corpus['bytes']} now); encode into a new "
                        "--bank")
    if m["complete"]:
      writer.close()
      log(f"bank {bank_path} is complete ({m['num_docs']:,} documents, {m['num_tokens']:,} "
          "tokens); nothing to do")
      return m
    log(f"resuming {bank_path} after corpus row {m['corpus']['rows_done']:,}")
  else:
    tok_info = {"specials": dataclasses.asdict(tokenizer.specials)} if tokenizer else {}
    writer = bank_lib.BankWriter.create(
        bank_path, fingerprint=fingerprint, model_config=cfg, kr_dtype=encoder.kr_dtype,
        kv_dtype=encoder.kv_dtype, prefix_tokens=list(prefix_tokens),
        prefix_kv=encoder.prefix_kv(prefix_tokens), corpus=dict(corpus), tokenizer=tok_info)
  m = writer.manifest
  done = start_done = m["corpus"]["rows_done"]
  # Tokens of the documents handed to the writer so far: global-RoPE positions continue
  # from here (the manifest's count lags while a window is being written).
  tokens_before = m["num_tokens"]
  t0, tokens_here, windows = time.perf_counter(), 0, 0
  rows = rows_from(done)

  def write_window(window, layers, chunks, rows_done):
    t_write = time.perf_counter()
    writer.append(window, layers, chunks)
    writer.commit(rows_done, complete=rows_done >= total)
    encoder.seconds["write"] += time.perf_counter() - t_write

  # One window is written (append, digests, fsync, manifest) on a thread while the next
  # is encoded: the two overlapped, instead of the write (80 s of a 132 s 100M-token
  # encode on the H200, session 15) following each encode. Writes stay in corpus order
  # (at most one in flight) and a write's error is raised here at the next wait; on any
  # exit the pool's shutdown lets the write in flight end before the files are closed.
  pending: Optional[concurrent.futures.Future] = None
  stopped = False
  try:
    with _Stop() as stop, concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="bank-write") as pool:
      while done < total:
        window: list[DocRecord] = []
        n_tok = 0
        for doc in rows:
          window.append(doc)
          n_tok += len(doc.tokens)
          if n_tok >= window_tokens:
            break
        if not window:
          break
        starts = _positions_start(cfg, m["prefix_length"] + tokens_before, window)
        t_enc = time.perf_counter()
        layers, chunks = encoder.encode(window, starts)
        encoder.seconds["encode"] += time.perf_counter() - t_enc
        if pending is not None:
          pending.result()
        done += len(window)
        tokens_before += n_tok
        pending = pool.submit(write_window, window, layers, chunks, done)
        tokens_here += n_tok
        windows += 1
        elapsed = time.perf_counter() - t0
        rate = tokens_here / max(elapsed, 1e-9)
        left = (total - done) * tokens_here / max(done - start_done, 1)   # tokens to go
        log(f"encode: {done:,}/{total:,} documents ({100 * done / total:.0f}%) | "
            f"{tokens_before:,} tokens | {rate:,.0f} tok/s | elapsed {_fmt_time(elapsed)} "
            f"(encode {encoder.seconds['encode']:.1f}s, write {encoder.seconds['write']:.1f}s,"
            f" overlapped) ETA {_fmt_time(left / max(rate, 1e-9))}")
        if stop.requested or (max_windows is not None and windows >= max_windows):
          stopped = done < total
          break
      if pending is not None:
        pending.result()
    if stopped:
      log(f"stopped after corpus row {done:,}: the bank is committed up to there; rerun "
          "the same command to resume")
  finally:
    writer.close()
  return m


def _positions_start(cfg, first_position: int, docs: Sequence[DocRecord]) -> list[int]:
  """Each document's first position: 0 (document-wise RoPE) or its global offset, the
  first document's being ``first_position`` (the prefix and every token before it)."""
  if cfg.rope_mode == "document":
    return [0] * len(docs)
  out, start = [], first_position
  for d in docs:
    out.append(start)
    start += len(d.tokens)
  return out


def main(argv) -> None:
  """``python -m msa_jax.encode``: flags in ``msa_jax/encode.py``."""
  del argv
  from absl import flags
  from msa_jax.inference.checkpoint import load_model, load_tokenizer, task_prefix
  f = flags.FLAGS
  model, params = load_model(f.checkpoint)
  tokenizer = load_tokenizer(f.checkpoint, f.tokenizer_dir)
  prefix = task_prefix(f.checkpoint, tokenizer)
  m = encode_corpus(model, params, f.corpus, f.bank, tokenizer=tokenizer, prefix_tokens=prefix,
                    window_tokens=f.window_tokens, batch_tokens=f.batch_tokens,
                    width_multiple=f.width_multiple,
                    kr_dtype=f.kr_dtype or None, kv_dtype=f.kv_dtype or None)
  if m["complete"]:
    print(f"bank {f.bank}: {m['num_docs']:,} documents, {m['num_tokens']:,} tokens, "
          f"{m['num_chunks']:,} chunks in {len(m['router_layers'])} router layers; K̄R "
          f"{m['kr_dtype']}, K̄/V̄ {m['kv_dtype']}", flush=True)
