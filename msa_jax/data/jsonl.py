"""JSONL readers for real corpora, tokenised with a local tokenizer (e.g. ``HFTokenizer``).

Per-example files, one example per line::

  {"docs": [{"id": "d1", "text": "..."}, ...], "question": "...",
   "answer": "...", "positive_doc_ids": ["d1"]}

Shared-corpus files: a corpus with one ``{"id", "text"}`` per line, and query
rows ``{"question", "answer", "positive_doc_ids", "doc_ids"?}`` whose memory is
the whole corpus or only ``doc_ids``. Documents are tokenised once and shared
between the queries' memories.

Every document is stored as ``tokenizer.encode_doc_id(id) + encode(text)``; the
target is ``[id]... <id-end> <end-of-retrieval> answer <eos>`` with one retrieval
round over the positives (``rounds``), ready for ``interleave.expand``.
Malformed rows raise ``JSONLError`` naming the file, line and reason.
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

from msa_jax.data.example import Document, Example, answer_target, id_target
from msa_jax.data.tokenizer import Tokenizer


class JSONLError(ValueError):
  """A malformed JSONL row: ``<path>:<line>: <reason>``."""

  def __init__(self, path: str, line: int, reason: str):
    super().__init__(f"{path}:{line}: {reason}")
    self.path, self.line, self.reason = path, line, reason


def _rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, parsed object) of each non-blank line."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise JSONLError(path, n, f"not UTF-8 text: byte {raw[e.start:e.start + 1]!r} at column "
                         f"{e.start + 1} of the line; re-encode the file as UTF-8 (e.g. "
                         "`iconv -f latin1 -t utf-8`)") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line.rstrip("\r\n"))
      except json.JSONDecodeError as e:
        raise JSONLError(path, n, f"bad JSON: {e.msg} (column {e.colno})") from None
      if not isinstance(row, dict):
        raise JSONLError(path, n, f"expected a JSON object, got {type(row).__name__}")
      yield n, row


def _field(row: dict, key: str, kind: type | tuple, path: str, line: int):
  if key not in row:
    raise JSONLError(path, line, f"missing key {key!r}")
  value = row[key]
  if not isinstance(value, kind):
    raise JSONLError(path, line, f"key {key!r} should be {kind}, got {type(value).__name__}")
  return value


def _doc_id(value: Any, path: str, line: int) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
    raise JSONLError(path, line, f"document id {value!r} must be a non-empty string or int")
  return str(value)


def _document(obj: Any, tok: Tokenizer, path: str, line: int,
              max_doc_len: int = 0) -> Document:
  if not isinstance(obj, dict):
    raise JSONLError(path, line, f"document should be an object, got {obj!r}")
  doc_id = _doc_id(_field(obj, "id", (str, int), path, line), path, line)
  text = _field(obj, "text", str, path, line)
  if not text.strip():
    raise JSONLError(path, line, f"document {doc_id!r} has empty text; drop it or fill it")
  id_tokens = tok.encode_doc_id(doc_id)
  tokens = id_tokens + tok.encode(text)
  if max_doc_len and len(tokens) > max_doc_len:
    raise JSONLError(path, line, f"document {doc_id!r} has {len(tokens)} tokens (with its id), "
                     f"over data.max_doc_len={max_doc_len}: split it into shorter documents, "
                     "or raise --config.data.max_doc_len if memory allows (documents are "
                     "never truncated)")
  return Document(doc_id=doc_id, tokens=tokens, id_length=len(id_tokens))


def _example(row: dict, docs: list[Document], tok: Tokenizer, prefix: list[int],
             task: str, path: str, line: int) -> Example:
  question = _field(row, "question", str, path, line)
  answer = _field(row, "answer", str, path, line)
  positives = [_doc_id(p, path, line)
               for p in _field(row, "positive_doc_ids", list, path, line)]
  known = {d.doc_id for d in docs}
  unknown = [p for p in positives if p not in known]
  if unknown:
    raise JSONLError(path, line, f"positive doc ids {unknown} are not in this "
                     "row's memory; fix the ids or add the documents")
  if not question.strip():
    raise JSONLError(path, line, "empty question")
  by_id = {d.doc_id: d for d in docs}
  answer_tokens = tok.encode(answer)
  sp = tok.specials
  target = (id_target([by_id[p] for p in positives], sp.id_end) if positives else []) + \
      answer_target(answer_tokens, sp.end_of_retrieval, sp.eos)
  try:
    return Example(prefix=list(prefix), docs=docs, question=tok.encode(question),
                   target=target, positive_doc_ids=positives, answer=answer_tokens,
                   task=task, rounds=(tuple(positives),) if positives else ())
  except ValueError as e:
    raise JSONLError(path, line, str(e)) from None


def _unique(docs: Sequence[Document], path: str, line_of: Sequence[int]) -> None:
  seen: dict[str, int] = {}
  for d, line in zip(docs, line_of):
    if d.doc_id in seen:
      raise JSONLError(path, line, f"duplicate document id {d.doc_id!r} (first at "
                       f"line {seen[d.doc_id]}); ids must be unique")
    seen[d.doc_id] = line


def read_examples(path: str, tokenizer: Tokenizer, *, prefix: Sequence[int] = (),
                  task: str = "jsonl", max_doc_len: int = 0) -> list[Example]:
  """Examples of a per-example JSONL file (each row carries its own ``docs``).

  ``max_doc_len`` (0: none): a longer document is an error naming its line.
  """
  out = []
  for line, row in _rows(path):
    raw_docs = _field(row, "docs", list, path, line)
    if not raw_docs:
      raise JSONLError(path, line, "'docs' is empty; give at least one document")
    docs = [_document(d, tokenizer, path, line, max_doc_len) for d in raw_docs]
    _unique(docs, path, [line] * len(docs))
    out.append(_example(row, docs, tokenizer, list(prefix), task, path, line))
  return out


def read_corpus(path: str, tokenizer: Tokenizer, *, max_doc_len: int = 0) -> list[Document]:
  """Documents of a corpus JSONL file (``{"id", "text"}`` per line), in file order;
  ``max_doc_len`` as in ``read_examples``."""
  docs, lines = [], []
  for line, row in _rows(path):
    docs.append(_document(row, tokenizer, path, line, max_doc_len))
    lines.append(line)
  if not docs:
    raise JSONLError(path, 0, "corpus has no documents")
  _unique(docs, path, lines)
  return docs


def read_queries(path: str, corpus: Sequence[Document], tokenizer: Tokenizer, *,
                 prefix: Sequence[int] = (), task: str = "jsonl") -> list[Example]:
  """Examples of a query JSONL file over a shared ``corpus`` (see ``read_corpus``).

  A row's memory is the whole corpus (one shared list) or, with ``doc_ids``,
  those documents in the given order.
  """
  corpus = list(corpus)
  by_id = {d.doc_id: d for d in corpus}
  out = []
  for line, row in _rows(path):
    docs = corpus
    if "doc_ids" in row:
      ids = [_doc_id(i, path, line) for i in _field(row, "doc_ids", list, path, line)]
      missing = [i for i in ids if i not in by_id]
      if missing:
        raise JSONLError(path, line, f"doc_ids {missing[:5]} are not in the corpus")
      if len(set(ids)) != len(ids):
        raise JSONLError(path, line, "doc_ids repeats an id; list each document once")
      if not ids:
        raise JSONLError(path, line, "'doc_ids' is empty; omit it to use the corpus")
      docs = [by_id[i] for i in ids]
    out.append(_example(row, docs, tokenizer, list(prefix), task, path, line))
  return out
