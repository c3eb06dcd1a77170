"""Synthetic key-value retrieval and multi-hop tasks (deterministic by (seed, index)).

A task is a callable ``task(index) -> Example``. Every random choice comes from
numpy generators keyed by ``(seed, index, stream)`` and consumed document by
document in a fixed order: gold documents first, then distractor j = 0, 1, ...
So the same (seed, index) at a larger ``num_docs`` keeps the question, answer,
gold documents (ids and text) and the first distractors, and only adds
distractors (the memory order is reshuffled per size).

The un-expanded Example's ``target`` is the direct target
``[d1] <id-end> ... <end-of-retrieval> answer <eos>``; ``rounds`` holds the
retrieval chain for ``interleave.expand`` (the training default).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from msa_jax.data.example import Document, Example, answer_target, id_target
from msa_jax.data.tokenizer import WordTokenizer, WordVocabConfig

# Stream codes of the random generators of one example.
CORE, IDS, KEYS, VALUES, FILLER, ORDER = range(6)
GAPS = 7   # KVConfig.fact_gaps (6 is write_task.QUESTIONS)
RESTATE = 8   # KVConfig.restate_facts


def example_rng(seed: int, index: int, stream: int, *extra: int) -> np.random.Generator:
  """The generator of one (seed, index) random stream."""
  return np.random.default_rng([seed, index, stream, *extra])


class UniqueTuples:
  """An endless stream of distinct symbol tuples, drawn in a fixed order.

  The first n tuples are the same whatever is taken afterwards, which is what
  keeps larger memories supersets of smaller ones.
  """

  def __init__(self, rng: np.random.Generator, alphabet: int, length: int,
               what: str, block: int = 256):
    self._rng, self._alphabet, self._length = rng, alphabet, length
    self._what, self._block = what, block
    self._seen: set[tuple[int, ...]] = set()
    self._space = alphabet ** length
    self._pending: list[tuple[int, ...]] = []  # drawn, not yet examined (reversed)

  def take(self, n: int) -> list[tuple[int, ...]]:
    if len(self._seen) + n > self._space:
      raise ValueError(
          f"need {len(self._seen) + n} distinct {self._what} but only "
          f"{self._alphabet}^{self._length} = {self._space} exist; raise the "
          f"{self._what} length or alphabet size, or use fewer documents/facts")
    out: list[tuple[int, ...]] = []
    while len(out) < n:
      if not self._pending:
        draws = self._rng.integers(0, self._alphabet, size=(self._block, self._length))
        self._pending = list(map(tuple, draws.tolist()))[::-1]
      row = self._pending.pop()
      if row not in self._seen:
        self._seen.add(row)
        out.append(row)
    return out


def doc_id_string(symbols: Sequence[int]) -> str:
  """Word-vocabulary id string of id symbols, e.g. ``"i3 i17"``."""
  return " ".join(f"i{s}" for s in symbols)


def make_document(tok: WordTokenizer, id_symbols: Sequence[int], text: Sequence[int]) -> Document:
  """A memory document ``[ id ] text`` with its id tokens marked."""
  doc_id = doc_id_string(id_symbols)
  id_tokens = tok.encode_doc_id(doc_id)
  return Document(doc_id=doc_id, tokens=id_tokens + [int(t) for t in text],
                  id_length=len(id_tokens))


def assemble(tok: WordTokenizer, *, task: str, seed: int, index: int,
             gold: Sequence[Document], distractors: Sequence[Document],
             question: Sequence[int], answer: Sequence[int],
             rounds: Sequence[Sequence[Document]], prefix: Sequence[int]) -> Example:
  """Shuffle gold + distractor docs into memory and build the direct target."""
  docs = list(gold) + list(distractors)
  order = example_rng(seed, index, ORDER, len(docs)).permutation(len(docs))
  docs = [docs[i] for i in order]
  sp = tok.specials
  target: list[int] = []
  for r in rounds:
    target += id_target(r, sp.id_end)
  target += answer_target(answer, sp.end_of_retrieval, sp.eos)
  positives = [d.doc_id for r in rounds for d in r]
  return Example(prefix=list(prefix), docs=docs, question=[int(t) for t in question],
                 target=target, positive_doc_ids=list(dict.fromkeys(positives)),
                 answer=[int(t) for t in answer], task=task,
                 rounds=tuple(tuple(d.doc_id for d in r) for r in rounds))


@dataclasses.dataclass(frozen=True)
class KVConfig:
  """Key-value retrieval (hops=1) or multi-hop chain (hops=2-3) task sizes.

  Each document is ``[ id ]`` then ``facts_per_doc`` facts ``key value`` (with
  ``fact_words``: ``key is value .``); with ``fact_slot_len`` the id and each fact are
  padded with ``-`` to that many tokens (one fact per chunk when it equals P). Keys are
  unique in memory. For hops>1, gold doc h holds ``key_h -> key_{h+1}`` and the last one
  ``key -> value``.
  Alphabet sizes must not exceed the tokenizer's ``WordVocabConfig``.
  """

  num_docs: int = 32
  facts_per_doc: int = 1
  id_len: int = 2
  key_len: int = 2
  value_len: int = 2
  num_id_symbols: int = 128
  num_key_symbols: int = 256
  num_value_symbols: int = 256
  hops: int = 1
  fact_words: bool = False
  question_words: bool = False
  prefix_bos: bool = True
  link_distractor_rate: float = 0.5  # hops>1: distractor facts whose value is a key
  bracket_ids: bool = True  # False: memory docs start with the bare id (2 fewer tokens)
  # > 0: the id and every fact are padded with SLOT_PAD words to this many tokens, so
  # with fact_slot_len = the model's pooling_chunk_size P every chunk holds exactly one
  # fact (or the id) and no fact straddles two chunks. 0: facts packed back to back.
  fact_slot_len: int = 0
  # True: id position j has its own alphabet (id words j·n .. j·n+n-1, n = num_id_symbols),
  # so an id is a set of tokens, one per alphabet, with no order to recover: what a chunk's
  # mean-pooled K̄/V̄ keeps of it is enough to name it. Same id space (n^id_len);
  # id_len × n id words in the vocabulary.
  positional_ids: bool = False
  # True: the answer restates the key it answers, then gives the value (``k k k k v v``,
  # ``key is value`` read back); the last hop's key for hops > 1. The key is the
  # question's, so the model copies it; each value token then follows the key it reads
  # in the injected document (an induction step) instead of a lookup from the far
  # question (WORKSPACE.md, "The answers' lookup"). Exact match needs key and value.
  answer_with_key: bool = False
  # > 0: that many SLOT_PAD words spread at random over a document's facts_per_doc + 1 gaps
  # (after the id, between facts, after the last), a fresh spread per document: the length
  # stays fixed, each fact's offset varies. Why: with packed facts every fact sits at a
  # fixed offset, and a trained tiny reader looked facts up with one layer-0 head per fact
  # slot (each attends to one slot's value, gated by the key token before it) and read
  # only the slots it had heads for (WORKSPACE.md, "The lookup reads fixed slots"); with
  # varying offsets that shortcut is gone and the lookup must match the key's content.
  fact_gaps: int = 0
  # > 0: that many of the document's facts (fewer if it has fewer), in a random order,
  # stated again after its last fact (and last gap): ``[id] f0 .. f5 f3 f0``. With a
  # document LM loss (``loss.doc_lm_weight``) every restated key and value is a lookup
  # inside the document (the value that followed this key above), thousands a step
  # instead of one answer per example: a drill for the content match that the answers'
  # lookup needs (WORKSPACE.md, "Facts at varying offsets": slot heads, not a match).
  restate_facts: int = 0

  def __post_init__(self):
    slot = self.fact_slot_len
    if self.restate_facts < 0:
      raise ValueError(f"KVConfig.restate_facts={self.restate_facts} must be >= 0 (0: no "
                       "fact stated twice)")
    if slot < 0:
      raise ValueError(f"KVConfig.fact_slot_len={slot} must be >= 0 (0: no padding)")
    if self.fact_gaps < 0:
      raise ValueError(f"KVConfig.fact_gaps={self.fact_gaps} must be >= 0 (0: facts at "
                       "fixed offsets)")
    if self.fact_gaps and slot:
      raise ValueError(f"KVConfig.fact_gaps={self.fact_gaps} with fact_slot_len={slot}: "
                       "slots fix each fact's chunk, gaps move it; set one of them to 0")
    if slot and max(self.fact_length, self.id_length) > slot:
      raise ValueError(
          f"KVConfig.fact_slot_len={slot} is shorter than a fact ({self.fact_length} "
          f"tokens) or the id ({self.id_length} tokens); set data.kv.fact_slot_len to "
          f">= {max(self.fact_length, self.id_length)} (the model's pooling_chunk_size "
          "to align facts to chunks) or 0")

  @property
  def id_length(self) -> int:
    """Tokens of a document's id as stored (with brackets), without slot padding."""
    return self.id_len + (2 if self.bracket_ids else 0)

  @property
  def fact_length(self) -> int:
    """Tokens of one fact, without slot padding (the longest kind for hops > 1)."""
    fact = self.key_len + (self.key_len if self.hops > 1 else self.value_len)
    fact = max(fact, self.key_len + self.value_len)
    return fact + (2 if self.fact_words else 0)

  @property
  def doc_length(self) -> int:
    """Tokens of one memory document (id + facts + restated facts, each padded to its
    slot if any, + gap words)."""
    slot = self.fact_slot_len
    facts = self.facts_per_doc + min(self.restate_facts, self.facts_per_doc)
    if slot:
      return slot * (1 + facts)
    return self.id_length + facts * self.fact_length + self.fact_gaps

  @property
  def id_words(self) -> int:
    """Id words in the vocabulary: ``num_id_symbols``, × ``id_len`` with positional ids."""
    return self.num_id_symbols * (self.id_len if self.positional_ids else 1)

  def id_word_symbols(self, symbols):
    """An id's symbols (each < ``num_id_symbols``; a tuple, or an array whose last axis is
    the id position) as id words: position j offset by j·num_id_symbols with positional
    ids, else unchanged."""
    if not self.positional_ids:
      return symbols
    if isinstance(symbols, np.ndarray):
      return symbols + self.num_id_symbols * np.arange(symbols.shape[-1])
    return tuple(int(s) + self.num_id_symbols * j for j, s in enumerate(symbols))

  def vocab(self) -> WordVocabConfig:
    return WordVocabConfig(num_id_symbols=self.id_words,
                           num_key_symbols=self.num_key_symbols,
                           num_value_symbols=self.num_value_symbols,
                           bracket_ids=self.bracket_ids)


SLOT_PAD = "-"   # the word that pads an id or a fact to KVConfig.fact_slot_len


def slot_padding(tok: WordTokenizer, config: KVConfig, length: int) -> list[int]:
  """The SLOT_PAD tokens that fill ``length`` tokens up to ``config.fact_slot_len``
  (none when it is 0)."""
  if not config.fact_slot_len:
    return []
  return tok.encode(SLOT_PAD) * (config.fact_slot_len - length)


def fact_tokens(tok: WordTokenizer, config: KVConfig, key: Sequence[int],
                value: Sequence[int]) -> list[int]:
  """One fact of a kv document: ``key value`` (``key is value .`` with ``fact_words``),
  padded to ``config.fact_slot_len`` tokens when that is set."""
  if not config.fact_words:
    fact = list(key) + list(value)
  else:
    fact = list(key) + tok.encode("is") + list(value) + tok.encode(".")
  return fact + slot_padding(tok, config, len(fact))


def id_padding(tok: WordTokenizer, config: KVConfig) -> list[int]:
  """The text that follows a document's id before its first fact: the id's slot padding
  (``config.fact_slot_len``), so that the first fact starts a chunk."""
  return slot_padding(tok, config, config.id_length)


def gap_counts(rng: np.random.Generator, config: KVConfig, num_facts: int,
               size: int | None = None) -> np.ndarray:
  """Pad words in each of a document's ``num_facts + 1`` gaps: ``config.fact_gaps``
  spread uniformly at random (a multinomial draw; ``size`` documents at once)."""
  return rng.multinomial(config.fact_gaps, [1.0 / (num_facts + 1)] * (num_facts + 1),
                         size=size)


def document_text(tok: WordTokenizer, config: KVConfig, facts: Sequence[Sequence[int]],
                  gaps: Sequence[int] | None = None, again: Sequence[int] = ()) -> list[int]:
  """A document's text after its id: the id's slot padding, then the facts; with
  ``config.fact_gaps`` set, ``gaps[i]`` SLOT_PAD words before fact i and ``gaps[-1]``
  after the last (``gap_counts``); then the facts at indices ``again`` stated again
  (``config.restate_facts``, ``restated_order``)."""
  if not config.fact_gaps:
    out = id_padding(tok, config) + [t for f in facts for t in f]
  else:
    pad = tok.encode(SLOT_PAD)
    out = pad * int(gaps[0])
    for fact, gap in zip(facts, gaps[1:]):
      out += list(fact) + pad * int(gap)
  return out + [t for i in again for t in facts[int(i)]]


def restated_order(rng: np.random.Generator, config: KVConfig, num_facts: int) -> list[int]:
  """Which of a document's ``num_facts`` facts it states again after its last one, in
  order: ``config.restate_facts`` of them (all if fewer) in a random order (none, and
  nothing drawn, when it is 0)."""
  count = min(config.restate_facts, num_facts)
  if not count:
    return []
  return [int(i) for i in rng.permutation(num_facts)[:count]]


def question_tokens(tok: WordTokenizer, config: KVConfig, key: Sequence[int]) -> list[int]:
  """The question asking for ``key``'s value (``what is the value for key ?`` with
  ``question_words``)."""
  if not config.question_words:
    return list(key)
  return tok.encode("what is the value for") + list(key) + tok.encode("?")


def answer_tokens(config: KVConfig, key: Sequence[int], value: Sequence[int]) -> list[int]:
  """The answer a question is trained and scored on: ``value``, or ``key value`` with
  ``answer_with_key`` (the training samples and the shared corpus's questions alike)."""
  return list(key) + list(value) if config.answer_with_key else list(value)


class KVRetrievalTask:
  """``task(index) -> Example`` for key-value retrieval / multi-hop chains."""

  def __init__(self, config: KVConfig, tokenizer: WordTokenizer | None = None,
               seed: int = 0):
    self.config = config
    self.tokenizer = tokenizer or WordTokenizer(config.vocab())
    self.seed = seed
    c, v = config, self.tokenizer.config
    needed = {"num_id_symbols": c.id_words, "num_key_symbols": c.num_key_symbols,
              "num_value_symbols": c.num_value_symbols}
    for name, n in needed.items():
      if n > getattr(v, name):
        raise ValueError(f"KVConfig needs {n} {name.split('_')[1]} words, more than the "
                         f"tokenizer's {getattr(v, name)}; enlarge WordVocabConfig")
    if not 1 <= c.hops <= 3:
      raise ValueError(f"hops={c.hops}; use 1 (kv retrieval) or 2-3 (multi-hop)")
    if c.num_docs < c.hops:
      raise ValueError(f"num_docs={c.num_docs} < hops={c.hops}; the chain needs "
                       "one document per hop")
    if c.facts_per_doc < 1:
      raise ValueError("facts_per_doc must be >= 1")
    self.name = "kv" if c.hops == 1 else f"multihop{c.hops}"

  def with_num_docs(self, num_docs: int) -> "KVRetrievalTask":
    """Same task and seed with a different memory size (more/fewer distractors)."""
    return KVRetrievalTask(dataclasses.replace(self.config, num_docs=num_docs),
                           self.tokenizer, self.seed)

  def with_memory_tokens(self, budget: int) -> "KVRetrievalTask":
    """Same task with as many documents as fit ``budget`` memory tokens."""
    n = budget // self.config.doc_length
    if n < self.config.hops:
      raise ValueError(f"memory budget {budget} holds {n} documents of "
                       f"{self.config.doc_length} tokens; too few for the chain")
    return self.with_num_docs(n)

  def __call__(self, index: int) -> Example:
    c, tok = self.config, self.tokenizer
    core = example_rng(self.seed, index, CORE)
    ids = UniqueTuples(example_rng(self.seed, index, IDS), c.num_id_symbols,
                       c.id_len, "document ids")
    keys = UniqueTuples(example_rng(self.seed, index, KEYS), c.num_key_symbols,
                        c.key_len, "keys")
    values = example_rng(self.seed, index, VALUES)
    key_tok = lambda k: [tok.key_symbol(s) for s in k]
    value_tok = lambda: [tok.value_symbol(int(s)) for s in
                         values.integers(0, c.num_value_symbols, c.value_len)]
    fact = lambda k, v: fact_tokens(tok, c, key_tok(k), v)
    # Its own stream: with fact_gaps 0 nothing is drawn and every other draw is unchanged.
    gaps = example_rng(self.seed, index, GAPS) if c.fact_gaps else None
    again = example_rng(self.seed, index, RESTATE) if c.restate_facts else None
    text = lambda facts: document_text(
        tok, c, facts, gap_counts(gaps, c, len(facts)) if gaps else None,
        restated_order(again, c, len(facts)) if again else ())

    # Gold chain: doc h holds chain_keys[h] -> chain_keys[h+1] (or the answer).
    chain_keys = keys.take(c.hops)
    answer = value_tok()
    gold = []
    for h in range(c.hops):
      link = key_tok(chain_keys[h + 1]) if h + 1 < c.hops else answer
      facts = [fact(chain_keys[h], link)]
      facts += [fact(k, value_tok()) for k in keys.take(c.facts_per_doc - 1)]
      pos = int(core.integers(0, c.facts_per_doc))
      facts.insert(pos, facts.pop(0))
      gold.append(make_document(tok, c.id_word_symbols(ids.take(1)[0]), text(facts)))

    distractors = []
    for _ in range(c.num_docs - c.hops):
      facts = []
      for k in keys.take(c.facts_per_doc):
        if c.hops > 1 and values.random() < c.link_distractor_rate:
          facts.append(fact(k, key_tok(keys.take(1)[0])))
        else:
          facts.append(fact(k, value_tok()))
      distractors.append(make_document(tok, c.id_word_symbols(ids.take(1)[0]), text(facts)))

    question = question_tokens(tok, c, key_tok(chain_keys[0]))
    answer = answer_tokens(c, key_tok(chain_keys[c.hops - 1]), answer)
    prefix = [tok.specials.bos] if c.prefix_bos else []
    return assemble(tok, task=self.name, seed=self.seed, index=index, gold=gold,
                    distractors=distractors, question=question, answer=answer,
                    rounds=[[g] for g in gold], prefix=prefix)


def smoke_kv_config(num_docs: int = 32) -> KVConfig:
  """The SPEC §8 smoke sizes, used by the data tests: each document is ONE chunk of P=8
  tokens. (The ``smoke`` recipe of configs/16k_to_100m.py has moved on: bare 3-token ids
  and keys, P 2; see README "Smoke run".)

  Document = ``[ i i ] k k v v`` (8 tokens), 32 documents, question = the key
  (2 tokens). Interleave samples: ``k k -> [ i i ] <id-end>`` (active 7) and
  ``k k [ i i ] k k v v -> <end-of-retrieval> v v <eos>`` (active 14).
  Id and key alphabets of 128 symbols give 16384 distinct 2-token ids/keys, so
  the same questions scale to 256x memory (8192 documents); vocab ~530 words.
  """
  return KVConfig(num_docs=num_docs, facts_per_doc=1, id_len=2, key_len=2,
                  value_len=2, num_id_symbols=128, num_key_symbols=128,
                  num_value_symbols=32, hops=1, prefix_bos=True)


def smoke_kv_task(seed: int = 0, num_docs: int = 32) -> KVRetrievalTask:
  """The smoke kv task (see ``smoke_kv_config``) with its own word tokenizer."""
  return KVRetrievalTask(smoke_kv_config(num_docs), seed=seed)


def multihop_task(hops: int = 2, seed: int = 0, **sizes) -> KVRetrievalTask:
  """Multi-hop chain task (2-3 linked gold documents); ``sizes`` override KVConfig."""
  return KVRetrievalTask(KVConfig(hops=hops, **sizes), seed=seed)


class TaskMixture:
  """``index -> Example`` drawing each index's task by ``weights`` (deterministic).

  Example ``index`` of the mixture is example ``index`` of the chosen task, so
  memory scaling keeps its guarantees: ``with_memory_factor(f)`` scales every
  task's ``num_docs`` by ``f``.
  """

  def __init__(self, tasks: Sequence, weights: Sequence[float] | None = None,
               seed: int = 0):
    if not tasks:
      raise ValueError("TaskMixture needs at least one task")
    w = np.ones(len(tasks)) if weights is None else np.asarray(weights, float)
    if len(w) != len(tasks) or (w < 0).any() or w.sum() <= 0:
      raise ValueError(f"weights {weights} must be {len(tasks)} non-negative numbers "
                       "with a positive sum")
    self.tasks, self.weights, self.seed = list(tasks), w / w.sum(), seed
    self._cdf = np.cumsum(self.weights)
    tok = {id(t.tokenizer) for t in self.tasks}
    if len(tok) != 1:
      vocab = {t.tokenizer.words for t in self.tasks}
      if len(vocab) != 1:
        raise ValueError("tasks of a mixture must share one vocabulary; build them "
                         "with the same WordTokenizer")
    self.tokenizer = self.tasks[0].tokenizer
    self.name = "mixture"

  def task_of(self, index: int) -> int:
    u = example_rng(self.seed, index, CORE, 7).random()
    return int(min(np.searchsorted(self._cdf, u, side="right"), len(self.tasks) - 1))

  def __call__(self, index: int) -> Example:
    return self.tasks[self.task_of(index)](index)

  def with_memory_factor(self, factor: int) -> "TaskMixture":
    """The same mixture with every task's memory ``factor`` times larger."""
    return TaskMixture([t.with_num_docs(t.config.num_docs * factor) for t in self.tasks],
                       self.weights, self.seed)
