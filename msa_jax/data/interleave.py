"""Memory Interleave (SPEC §4, §5): one sample per retrieval step, and the inference helpers.

A chain q -> d1 -> d2 -> answer over one memory becomes
  (q)                          -> [d1] <id-end>
  (q, [d1] text(d1))           -> [d2] <id-end>
  (q, [d1] text(d1), [d2] ...) -> <end-of-retrieval> answer <eos>
The injected ``[d] text(d)`` is exactly the document's memory tokens, appended to
the question (ordinary active context, part of the routing query).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from msa_jax.data.example import Document, Example, answer_target, id_target
from msa_jax.data.tokenizer import SpecialTokens


# What a Memory Interleave round appends to the question for the named documents: their
# original text (the paper's design, and training's) or only their id tokens (the paper's
# "w/o original text" ablation, Table 4: an evaluation mode, never trained on).
INJECTIONS = ("text", "ids")


def check_injection(injection: str) -> None:
  if injection not in INJECTIONS:
    raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")


def inject_documents(question: Sequence[int], docs: Sequence[Document],
                     injection: str = "text") -> list[int]:
  """The next round's question: ``question`` followed by each document's tokens (``text``)
  or by each document's id tokens only (``ids``)."""
  check_injection(injection)
  out = list(question)
  for d in docs:
    out += d.tokens if injection == "text" else list(d.id_tokens)
  return out


def expand(example: Example, specials: SpecialTokens,
           answer_positives: bool = True) -> list[Example]:
  """Cut an example with ``rounds`` into its Memory Interleave samples.

  Sample s < R (R rounds) has the question with rounds < s injected and the
  target ``ids of round s <id-end>``; its positives are round s's documents.
  The last sample answers: ``<end-of-retrieval> answer <eos>``, positives = all
  chain documents, or none with ``answer_positives=False`` (its routing then takes
  no part in the aux loss and the router metrics; ``data.answer_positives``).
  Single-hop retrieval gives 2 samples.
  """
  if example.rounds is None or example.answer is None:
    raise ValueError(f"example of task {example.task!r} has no rounds/answer; "
                     "Memory Interleave needs the retrieval chain and the answer")
  by_id = {d.doc_id: d for d in example.docs}
  rounds = [[by_id[i] for i in r] for r in example.rounds]
  samples = []
  question = list(example.question)
  for s, r in enumerate(rounds):
    samples.append(dataclasses.replace(
        example, question=question, target=id_target(r, specials.id_end),
        positive_doc_ids=[d.doc_id for d in r], step=s))
    question = inject_documents(question, r)
  all_gold = list(dict.fromkeys(i for r in example.rounds for i in r))
  samples.append(dataclasses.replace(
      example, question=question,
      target=answer_target(example.answer, specials.end_of_retrieval, specials.eos),
      positive_doc_ids=all_gold if answer_positives else [], step=len(rounds)))
  return samples


@dataclasses.dataclass(frozen=True)
class ParsedRound:
  """What the model generated in one round.

  doc_ids: the memory documents it named, in order.
  unknown: token runs that name no document in memory (empty when all found).
  finished: True when it emitted ``<end-of-retrieval>`` (then ``answer`` holds
    the tokens after it, up to ``<eos>`` if present).
  """

  doc_ids: list[str]
  unknown: list[list[int]]
  finished: bool
  answer: list[int] | None = None

  @property
  def all_found(self) -> bool:
    return not self.unknown


def id_table(docs: Sequence[Document]) -> dict[tuple[int, ...], str]:
  """``{id tokens: document id}`` of the documents that have id tokens."""
  return {tuple(d.id_tokens): d.doc_id for d in docs if d.id_length}


def parse_round(generated: Sequence[int], docs: Sequence[Document] | Mapping,
                specials: SpecialTokens) -> ParsedRound:
  """Parse generated tokens into document ids (or the final answer).

  ``generated`` is one round's output: id tokens up to ``<id-end>``, or
  ``<end-of-retrieval>`` then the answer. Ids are matched greedily (longest
  first) against the documents' id tokens; runs matching nothing are reported
  in ``unknown`` (the "not found" signal), never guessed.
  """
  gen = [int(t) for t in generated]
  if gen and gen[0] == specials.end_of_retrieval:
    ans = gen[1:]
    if specials.eos in ans:
      ans = ans[:ans.index(specials.eos)]
    return ParsedRound(doc_ids=[], unknown=[], finished=True, answer=ans)
  if specials.id_end in gen:
    gen = gen[:gen.index(specials.id_end)]
  # ``docs`` may be a prebuilt {id tokens: id} table (a large bank builds it once).
  table = docs if isinstance(docs, Mapping) else id_table(docs)
  lengths = sorted({len(k) for k in table}, reverse=True)
  found, unknown, junk, i = [], [], [], 0
  while i < len(gen):
    for n in lengths:
      key = tuple(gen[i:i + n])
      if key in table:
        if junk:
          unknown.append(junk)
          junk = []
        found.append(table[key])
        i += n
        break
    else:
      junk.append(gen[i])
      i += 1
  if junk:
    unknown.append(junk)
  return ParsedRound(doc_ids=found, unknown=unknown, finished=False)


def next_question(question: Sequence[int], docs: Sequence[Document],
                  doc_ids: Sequence[str], injection: str = "text") -> list[int]:
  """The question of the next round: ``question`` + the named documents' tokens (or, with
  ``injection="ids"``, their id tokens).

  Raises KeyError naming an id that is not in memory (check
  ``ParsedRound.unknown`` first).
  """
  by_id = {d.doc_id: d for d in docs}
  missing = [i for i in doc_ids if i not in by_id]
  if missing:
    raise KeyError(f"document ids {missing} are not in memory; the model named "
                   "a document that does not exist (count it as a retrieval miss)")
  return inject_documents(question, [by_id[i] for i in doc_ids], injection)
