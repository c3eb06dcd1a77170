r"""Writes a synthetic kv task as ONE shared corpus plus questions (JSONL), streaming.

  python -m msa_jax.data.write_task --config=configs/16k_to_100m.py:smoke \
      --num_docs=600000 --corpus=CORPUS.jsonl --questions=QUESTIONS.jsonl \
      [--num_questions=Q] [--question_pool=M] [--seed=S] [--overwrite]

Corpus rows ``{"id", "tokens", "text"}``: ``tokens`` are what a bank encodes (the id
tokens, then the facts, each padded to ``data.kv.fact_slot_len`` if set, or with
``data.kv.fact_gaps`` pad words spread between them, then ``data.kv.restate_facts`` of
them again, drawn per document: exactly a training memory document of the config's
``data.kv`` task), ``text`` their decoding
with the task's word tokenizer. Question rows ``{"question_tokens", "question",
"answer_tokens", "answer", "doc_id", "rounds"}``: the key asked, its value, the gold
document and the retrieval chain.

Every document has a corpus-unique id and corpus-unique keys, so each question has
exactly one gold document: document ``n`` takes id number ``P_id(n)`` and key numbers
``P_key(n·F + f)`` of keyed permutations of the id and key spaces (``IndexPermutation``),
computed per index, so nothing grows with the corpus. Everything is deterministic by
``seed``, and document ``n`` is the same whatever ``num_docs`` is: a corpus of N
documents is the first N rows of every larger one. Questions ask about the first
``question_pool`` documents (default: all), so one questions file serves every corpus
of at least that many documents (same config and seed) — growing banks, same questions.

Python: ``corpus_rows(cfg, num_docs, seed)`` and ``question_rows(cfg, num_docs, seed,
num_questions)`` yield the rows; ``msa_jax.data.from_config.tokenizer_of(cfg.data)``
and ``prefix_of(cfg.data)`` give the tokenizer and the shared prefix of a run's
``config.json`` (``load_run_config``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Iterator

import numpy as np

from msa_jax.data.example import Document
from msa_jax.data.synthetic import (GAPS, IDS, KEYS, RESTATE, SLOT_PAD, VALUES, KVConfig,
                                    answer_tokens, doc_id_string, document_text, fact_tokens,
                                    gap_counts, make_document, question_tokens)
from msa_jax.data.tokenizer import WordTokenizer

QUESTIONS = 6          # random stream of the question draw (after synthetic's six)
VALUE_BLOCK = 4_096    # documents per value draw: values of doc n never depend on num_docs
_FEISTEL_ROUNDS = 6


class IndexPermutation:
  """A keyed bijection of ``[0, size)``, evaluated per index in O(1) memory.

  A Feistel network on the smallest even bit width covering ``size`` (a permutation
  of ``[0, 2^bits)``, ``2^bits < 4·size``), walked along its cycle until the value
  falls back into ``[0, size)``: that restriction is again a bijection.
  """

  def __init__(self, size: int, seed: int, stream: int):
    if size < 1:
      raise ValueError(f"permutation of an empty range (size {size})")
    bits = max(2, (size - 1).bit_length())
    bits += bits % 2
    self.size, self._half = int(size), bits // 2
    self._mask = np.uint64((1 << self._half) - 1)
    self._keys = np.random.default_rng([seed, stream, size]).integers(
        0, 2**63, size=_FEISTEL_ROUNDS, dtype=np.uint64)

  def _round(self, r: np.ndarray, key: np.uint64) -> np.ndarray:
    x = (r ^ key) * np.uint64(0x9E3779B97F4A7C15)   # splitmix64-style mixing
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    return x & self._mask

  def _feistel(self, x: np.ndarray) -> np.ndarray:
    half = np.uint64(self._half)
    left, right = x >> half, x & self._mask
    for key in self._keys:
      left, right = right, left ^ self._round(right, key)
    return (left << half) | right

  def __call__(self, index: np.ndarray) -> np.ndarray:
    """The images of ``index`` (integers in ``[0, size)``), as int64."""
    index = np.asarray(index, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= self.size):
      raise ValueError(f"indices outside [0, {self.size}) given to the permutation")
    with np.errstate(over="ignore"):
      y = self._feistel(index.astype(np.uint64))
      out = y >= self.size
      while out.any():
        y[out] = self._feistel(y[out])
        out = y >= self.size
    return y.astype(np.int64)


def _digits(numbers: np.ndarray, base: int, length: int) -> np.ndarray:
  """``numbers`` written with ``length`` base-``base`` digits, most significant first."""
  powers = base ** np.arange(length - 1, -1, -1, dtype=np.int64)
  return (numbers[..., None] // powers) % base


def _data_config(cfg):
  """``cfg.data`` of a full config, or ``cfg`` itself when it is the data block."""
  return cfg.data if "data" in cfg else cfg


def task_fingerprint(cfg) -> str:
  """A short hash of a config's kv task and seed: the same for the same documents."""
  kv = dataclasses.asdict(kv_config_of(cfg))
  return hashlib.sha256(json.dumps([kv, int(cfg.seed)], sort_keys=True,
                                   default=str).encode()).hexdigest()[:10]


def kv_config_of(cfg) -> KVConfig:
  """The ``KVConfig`` of a config's single-hop ``data.kv`` task (clear errors otherwise)."""
  data = _data_config(cfg)
  if data.task != "kv":
    raise ValueError(f"write_task writes the synthetic kv task; this config has "
                     f"data.task={data.task!r} (use a kv recipe, e.g. "
                     "configs/16k_to_100m.py:smoke or :tiny)")
  kv = KVConfig(**dict(data.kv))
  if kv.hops != 1:
    raise ValueError(f"data.kv.hops={kv.hops}: write_task writes single-hop questions only "
                     "(multi-hop shared corpora are not implemented); set "
                     "--config.data.kv.hops=1")
  return kv


class SharedCorpus:
  """Document ``n`` of the shared kv corpus of ``(config, seed)``, and its questions.

  Ids and keys are unique over the whole corpus (see the module docstring); values
  are drawn per block of ``VALUE_BLOCK`` documents.
  """

  def __init__(self, config: KVConfig, seed: int, tokenizer: WordTokenizer | None = None):
    self.config, self.seed = config, int(seed)
    self.tokenizer = tokenizer or WordTokenizer(config.vocab())
    c = config
    self.id_space = c.num_id_symbols ** c.id_len
    self.key_space = c.num_key_symbols ** c.key_len
    self.capacity = min(self.id_space, self.key_space // c.facts_per_doc)
    self._ids = IndexPermutation(self.id_space, self.seed, IDS)
    self._keys = IndexPermutation(self.key_space, self.seed, KEYS)

  def check_size(self, num_docs: int) -> None:
    """Raises when ``num_docs`` documents cannot all have unique ids and keys."""
    c = self.config
    if not 1 <= num_docs <= self.capacity:
      raise ValueError(
          f"num_docs={num_docs}: this task addresses 1..{self.capacity:,} documents "
          f"({c.num_id_symbols}^{c.id_len} = {self.id_space:,} ids, "
          f"{c.num_key_symbols}^{c.key_len} = {self.key_space:,} keys for "
          f"{c.facts_per_doc} fact(s) per document); lower --num_docs or raise "
          "data.kv.id_len / key_len / num_id_symbols / num_key_symbols")

  def _per_block(self, start: int, stop: int, stream: int, draw) -> np.ndarray:
    """Rows ``[start, stop)`` of per-document draws made per block of ``VALUE_BLOCK``
    documents (``draw(rng)`` gives a block's rows), so document n's never depend on the
    range asked."""
    parts = []
    for block in range(start // VALUE_BLOCK, (stop - 1) // VALUE_BLOCK + 1):
      rows = draw(np.random.default_rng([self.seed, stream, block]))
      lo = max(start, block * VALUE_BLOCK) - block * VALUE_BLOCK
      hi = min(stop, (block + 1) * VALUE_BLOCK) - block * VALUE_BLOCK
      parts.append(rows[lo:hi])
    return np.concatenate(parts)

  def _values(self, start: int, stop: int) -> np.ndarray:
    """Value symbols of documents ``[start, stop)``: (docs, facts, value_len)."""
    c = self.config
    return self._per_block(start, stop, VALUES, lambda rng: rng.integers(
        0, c.num_value_symbols, size=(VALUE_BLOCK, c.facts_per_doc, c.value_len)))

  def _gaps(self, start: int, stop: int) -> np.ndarray:
    """Pad words in each gap of documents ``[start, stop)`` (``KVConfig.fact_gaps``):
    (docs, facts + 1), drawn per block like the values."""
    c = self.config
    return self._per_block(start, stop, GAPS, lambda rng: gap_counts(
        rng, c, c.facts_per_doc, size=VALUE_BLOCK))

  def _restated(self, start: int, stop: int) -> np.ndarray:
    """Which facts documents ``[start, stop)`` state again after their last one
    (``KVConfig.restate_facts``), in order: (docs, R) fact indices, the first R of a
    random permutation of each document's facts, drawn per block like the values."""
    c = self.config
    count = min(c.restate_facts, c.facts_per_doc)
    return self._per_block(start, stop, RESTATE, lambda rng: rng.permuted(
        np.tile(np.arange(c.facts_per_doc), (VALUE_BLOCK, 1)), axis=1)[:, :count])

  def symbols(self, start: int, stop: int):
    """(ids (B, id_len), keys (B, F, key_len), values (B, F, value_len)) of documents
    ``[start, stop)`` as symbol indices of their alphabets (ids as id words:
    ``KVConfig.id_word_symbols``)."""
    c = self.config
    docs = np.arange(start, stop, dtype=np.int64)
    ids = c.id_word_symbols(_digits(self._ids(docs), c.num_id_symbols, c.id_len))
    key_numbers = self._keys(docs[:, None] * c.facts_per_doc + np.arange(c.facts_per_doc))
    keys = _digits(key_numbers, c.num_key_symbols, c.key_len)
    return ids, keys, self._values(start, stop)

  def documents(self, start: int, stop: int) -> list[Document]:
    """Documents ``[start, stop)``: ``id`` then the facts ``key value`` in key order
    (each padded to ``fact_slot_len`` if set, or with ``fact_gaps`` pad words spread
    between them), then ``restate_facts`` of them again in a random order."""
    tok, c = self.tokenizer, self.config
    ids, keys, values = self.symbols(start, stop)
    gaps = self._gaps(start, stop).tolist() if c.fact_gaps else [None] * len(ids)
    again = self._restated(start, stop).tolist() if c.restate_facts else [()] * len(ids)
    key0, value0 = tok.key_symbol(0), tok.value_symbol(0)
    out = []
    for doc_ids, doc_keys, doc_values, doc_gaps, doc_again in zip(
        ids.tolist(), (keys + key0).tolist(), (values + value0).tolist(), gaps, again):
      facts = [fact_tokens(tok, c, k, v) for k, v in zip(doc_keys, doc_values)]
      out.append(make_document(tok, doc_ids, document_text(tok, c, facts, doc_gaps, doc_again)))
    return out

  def records(self, start: int, stop: int) -> list:
    """Documents ``[start, stop)`` as the bank stores them (``inference.bank.DocRecord``,
    tokens an int32 array, no text): the same tokens as ``documents``, built with numpy
    when facts are bare ``key value`` (one array op per block instead of one list per
    fact), for ``inference.encode.encode_documents``."""
    from msa_jax.inference.bank import DocRecord
    c, tok = self.config, self.tokenizer
    if c.fact_words or c.fact_gaps:   # facts at varying offsets: one list per document
      return [DocRecord(d.doc_id, d.tokens, d.id_length)
              for d in self.documents(start, stop)]
    ids, keys, values = self.symbols(start, stop)
    n = len(ids)
    id_tokens = ids + tok.id_symbol(0)
    if c.bracket_ids:
      id_tokens = np.concatenate([np.full((n, 1), tok.open_id), id_tokens,
                                  np.full((n, 1), tok.close_id)], axis=1)
    id_len = id_tokens.shape[1]
    facts = np.concatenate([keys + tok.key_symbol(0), values + tok.value_symbol(0)], axis=2)
    if c.fact_slot_len:   # the same SLOT_PAD padding as id_padding / fact_tokens
      pad = tok.encode(SLOT_PAD)[0]
      id_tokens = np.concatenate(
          [id_tokens, np.full((n, c.fact_slot_len - id_len), pad)], axis=1)
      facts = np.concatenate(
          [facts, np.full(facts.shape[:2] + (c.fact_slot_len - facts.shape[2],), pad)], axis=2)
    if c.restate_facts:   # the restated facts after the last one, as in documents()
      again = np.take_along_axis(facts, self._restated(start, stop)[:, :, None], axis=1)
      facts = np.concatenate([facts, again], axis=1)
    tokens = np.concatenate([id_tokens, facts.reshape(n, -1)], axis=1).astype(np.int32)
    names = [f"i{n}" for n in range(c.id_words)]   # doc_id_string, without a format per symbol
    return [DocRecord(" ".join(map(names.__getitem__, i)), t, id_len)
            for i, t in zip(ids.tolist(), tokens)]

  def question(self, doc: int, fact: int) -> dict:
    """The question row asking fact ``fact`` of document ``doc``."""
    tok, c = self.tokenizer, self.config
    ids, keys, values = self.symbols(doc, doc + 1)
    key = [tok.key_symbol(int(s)) for s in keys[0, fact]]
    answer = answer_tokens(c, key, [tok.value_symbol(int(s)) for s in values[0, fact]])
    question = question_tokens(tok, c, key)
    doc_id = doc_id_string(ids[0].tolist())
    return {"question_tokens": question, "question": tok.decode(question),
            "answer_tokens": answer, "answer": tok.decode(answer), "doc_id": doc_id,
            "rounds": [[doc_id]]}


def corpus_rows(cfg, num_docs: int, seed: int = 0, *, block: int = 8_192) -> Iterator[dict]:
  """Corpus rows ``{"id", "tokens", "text"}`` of documents ``0 .. num_docs-1``, generated
  ``block`` documents at a time (``cfg``: a recipe config or its ``data`` block)."""
  corpus = SharedCorpus(kv_config_of(cfg), seed)
  corpus.check_size(num_docs)
  tok = corpus.tokenizer
  for start in range(0, num_docs, block):
    for d in corpus.documents(start, min(num_docs, start + block)):
      yield {"id": d.doc_id, "tokens": d.tokens, "text": tok.decode(d.tokens)}


def question_rows(cfg, num_docs: int, seed: int = 0, num_questions: int = 64,
                  question_pool: int | None = None) -> Iterator[dict]:
  """``num_questions`` question rows whose gold documents are distinct documents among
  the first ``question_pool`` (default ``num_docs``) of the corpus of ``num_docs``.

  The rows depend on (config, seed, num_questions, question_pool) only, so the same
  file is valid for every corpus of at least ``question_pool`` documents.
  """
  corpus = SharedCorpus(kv_config_of(cfg), seed)
  corpus.check_size(num_docs)
  pool = int(question_pool or num_docs)
  if not 1 <= pool <= num_docs:
    raise ValueError(f"question_pool={pool} must be in [1, num_docs={num_docs}]: gold "
                     "documents come from the first question_pool documents of the corpus")
  if not 1 <= num_questions <= pool:
    raise ValueError(f"num_questions={num_questions} must be in [1, {pool}]: each question "
                     "has its own gold document; raise question_pool or ask fewer")
  rng = np.random.default_rng([seed, QUESTIONS, pool])
  gold = rng.choice(pool, size=num_questions, replace=False)
  facts = rng.integers(0, corpus.config.facts_per_doc, size=num_questions)
  for doc, fact in zip(gold.tolist(), facts.tolist()):
    yield corpus.question(doc, fact)


class _Progress:
  """Prints ``what: n/total (pct) | rate/s | ETA`` at most every ``every_s`` seconds."""

  def __init__(self, what: str, total: int, every_s: float = 5.0):
    self.what, self.total, self.every_s = what, total, every_s
    self.t0 = self.last = time.perf_counter()

  def update(self, n: int, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    rate = n / max(now - self.t0, 1e-9)
    eta = (self.total - n) / max(rate, 1e-9)
    print(f"{self.what}: {n:,}/{self.total:,} ({n / self.total:.0%}) | {rate:,.0f}/s | "
          f"elapsed {now - self.t0:.0f}s | ETA {eta:.0f}s", flush=True)


def write_jsonl(rows: Iterator[dict], path: str, total: int, what: str,
                overwrite: bool = False) -> int:
  """Writes ``rows`` to ``path`` one JSON line each, through ``path.partial`` renamed
  at the end (an interrupted write never leaves a short file under ``path``)."""
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass --overwrite to replace it or choose "
                          "another path")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  progress, n = _Progress(what, total), 0
  partial = path + ".partial"
  with open(partial, "w") as f:
    for row in rows:
      f.write(json.dumps(row, separators=(",", ":")) + "\n")
      n += 1
      if n % 1024 == 0:
        progress.update(n)
  progress.update(n, force=True)
  os.replace(partial, path)
  return n


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  cfg = f.config
  corpus = SharedCorpus(kv_config_of(cfg), f.seed)
  corpus.check_size(f.num_docs)   # fail before writing anything
  num_questions = f.num_questions or int(cfg.eval.num_examples)
  doc_len = corpus.config.doc_length
  print(f"task: {f.num_docs:,} documents of {doc_len} tokens = "
        f"{f.num_docs * doc_len:,} memory tokens (capacity {corpus.capacity:,} documents); "
        f"vocabulary {corpus.tokenizer.vocab_size} words; seed {f.seed}", flush=True)
  n = write_jsonl(corpus_rows(cfg, f.num_docs, f.seed), f.corpus, f.num_docs, "corpus",
                  f.overwrite)
  q = write_jsonl(question_rows(cfg, f.num_docs, f.seed, num_questions, f.question_pool),
                  f.questions, num_questions, "questions", f.overwrite)
  print(f"wrote {n:,} documents to {f.corpus} and {q:,} questions to {f.questions}",
        flush=True)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Recipe whose data.kv task to write, "
                                  "e.g. configs/16k_to_100m.py:smoke.", lock_config=True)
  flags.DEFINE_integer("num_docs", None, "Documents in the corpus.", required=True)
  flags.DEFINE_string("corpus", None, "Output corpus JSONL.", required=True)
  flags.DEFINE_string("questions", None, "Output questions JSONL.", required=True)
  flags.DEFINE_integer("num_questions", 0, "Questions (0: the config's eval.num_examples).")
  flags.DEFINE_integer("question_pool", 0, "Gold documents come from the first "
                       "question_pool documents (0: all), so one questions file serves "
                       "every corpus of at least that many documents.")
  flags.DEFINE_integer("seed", 0, "Seed of the corpus and the questions.")
  flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
  flags.mark_flag_as_required("config")
  app.run(main)
