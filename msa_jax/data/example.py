"""One unpadded MSA example (SPEC §2): plain Python lists, validated on creation."""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Document:
  """A memory document.

  ``tokens`` is what memory stores: the document's id tokens (its bracketed id,
  ``tokens[:id_length]``) followed by its text tokens, so the model can
  generate an id it read from memory. ``id_length`` 0 means the document has
  no id tokens (it can be routed to but not named by a generated id).
  """

  doc_id: str
  tokens: list[int]
  id_length: int = 0

  def __post_init__(self):
    if not isinstance(self.doc_id, str) or not self.doc_id:
      raise ValueError(f"document id must be a non-empty string, got {self.doc_id!r}")
    if len(self.tokens) == 0:
      raise ValueError(f"document {self.doc_id!r} is empty; drop it or give it text")
    if not 0 <= self.id_length <= len(self.tokens):
      raise ValueError(
          f"document {self.doc_id!r}: id_length {self.id_length} outside "
          f"[0, {len(self.tokens)}] (its token count)")

  @property
  def id_tokens(self) -> list[int]:
    """The id tokens at the head of the document (generated in targets)."""
    return list(self.tokens[:self.id_length])

  @property
  def text_tokens(self) -> list[int]:
    return list(self.tokens[self.id_length:])


Rounds = tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class Example:
  """One unpadded training/eval sample.

  Fields:
    prefix: shared template prefix tokens (may be empty).
    docs: the memory documents (ids unique).
    question: routing query tokens (non-empty).
    target: tokens trained/generated after the question (non-empty).
    positive_doc_ids: gold documents of this sample (aux loss, router recall).
    answer: answer tokens, without control tokens (optional metadata).
    task: task name (metadata).
    rounds: the Memory Interleave retrieval chain: the doc ids generated in
      each round, in order (optional; ``interleave.expand`` needs it).
    step: which interleave step this sample is (None for an unexpanded example).
  """

  prefix: list[int]
  docs: list[Document]
  question: list[int]
  target: list[int]
  positive_doc_ids: list[str]
  answer: list[int] | None = None
  task: str = ""
  rounds: Rounds | None = None
  step: int | None = None

  def __post_init__(self):
    where = f"example of task {self.task!r}" if self.task else "example"
    if len(self.question) == 0:
      raise ValueError(f"{where}: empty question; the first target token is "
                       "predicted from the last question token, give >= 1 token")
    if len(self.target) == 0:
      raise ValueError(f"{where}: empty target; nothing would be trained")
    if len(self.docs) == 0:
      raise ValueError(f"{where}: no memory documents; add at least one")
    seen: set[str] = set()
    for d in self.docs:
      if d.doc_id in seen:
        raise ValueError(f"{where}: duplicate document id {d.doc_id!r}; ids must "
                         "be unique within one example's memory")
      seen.add(d.doc_id)
    for p in self.positive_doc_ids:
      if p not in seen:
        raise ValueError(f"{where}: positive document id {p!r} is not among its "
                         "docs; add the document or fix the id")
    if len(set(self.positive_doc_ids)) != len(self.positive_doc_ids):
      raise ValueError(f"{where}: positive_doc_ids {self.positive_doc_ids} "
                       "repeats an id; list each gold document once")
    for r in self.rounds or ():
      for doc_id in r:
        if doc_id not in seen:
          raise ValueError(f"{where}: retrieval round names document {doc_id!r} "
                           "which is not in memory")

  def doc_by_id(self, doc_id: str) -> Document:
    """The document with id ``doc_id`` (KeyError naming it if absent)."""
    for d in self.docs:
      if d.doc_id == doc_id:
        return d
    raise KeyError(f"document {doc_id!r} not in this example's memory")

  @property
  def active_length(self) -> int:
    return len(self.question) + len(self.target)

  @functools.cached_property
  def max_doc_length(self) -> int:
    return max(len(d.tokens) for d in self.docs)

  @property
  def memory_tokens(self) -> int:
    return sum(len(d.tokens) for d in self.docs)


def id_target(docs: Sequence[Document], id_end: int) -> list[int]:
  """Target of a retrieval round: each document's id tokens, then ``<id-end>``."""
  out: list[int] = []
  for d in docs:
    if d.id_length == 0:
      raise ValueError(f"document {d.doc_id!r} has no id tokens (id_length 0) "
                       "and cannot be generated as a retrieval target")
    out += d.id_tokens
  return out + [id_end]


def answer_target(answer: Sequence[int], end_of_retrieval: int, eos: int) -> list[int]:
  """Final-round target: ``<end-of-retrieval>`` answer ``<eos>``."""
  return [end_of_retrieval] + list(answer) + [eos]
