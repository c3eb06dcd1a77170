"""RULER-style needle-in-a-haystack suite over MSA memory (8 subtasks, no downloads).

The haystack is cut into ``num_docs`` documents of ``doc_len`` text tokens,
each stored as ``[ id ] text``. A needle is ``the special magic value for K is
V .``; it overwrites haystack tokens inside a gold document, so every document
has the same length (length does not give the gold document away). The target
retrieves the gold document(s) in one round, then answers through Memory
Interleave (``rounds``/``answer`` are set, like the kv task).

Subtasks (RULER names in parentheses):
  single_noise   one needle, haystack of random filler words (niah_single_1)
  single_essay   one needle, repeated essay-like sentences (niah_single_2)
  single_kv      one needle, haystack of plain ``K : V ,`` pairs (distractor kv)
  multikey_1     one needle among ``num_distractor_needles`` needles of other keys
  multikey_2     the haystack is all needles (other keys)
  multikey_3     like multikey_2 with uuid-like keys ``hx hx hx hx - hx ...``
  multivalue     ``num_values`` needles with one key; all values are answered
  multiquery     ``num_queries`` needles, all keys asked, all values answered
Keys are unique in memory (except the multivalue key, by design).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from msa_jax.data.example import Example
from msa_jax.data.synthetic import (CORE, FILLER, IDS, KEYS, VALUES, UniqueTuples,
                                    assemble, example_rng, make_document)
from msa_jax.data.tokenizer import WordTokenizer, WordVocabConfig

SUBTASKS = ("single_noise", "single_essay", "single_kv", "multikey_1", "multikey_2",
            "multikey_3", "multivalue", "multiquery")
_HAYSTACK = dict(single_noise="noise", single_essay="essay", single_kv="kv",
                 multikey_1="essay", multikey_2="needles", multikey_3="needles",
                 multivalue="essay", multiquery="essay")


@dataclasses.dataclass(frozen=True)
class NIAHConfig:
  """Sizes of one NIAH subtask (alphabets must fit the tokenizer's)."""

  subtask: str = "single_essay"
  num_docs: int = 64
  doc_len: int = 48            # text tokens per document (after the id)
  id_len: int = 2
  key_len: int = 2
  value_len: int = 2
  num_id_symbols: int = 128
  num_key_symbols: int = 256
  num_value_symbols: int = 256
  num_distractor_needles: int = 4   # multikey_1
  num_values: int = 4               # multivalue
  num_queries: int = 4              # multiquery
  uuid_groups: tuple[int, ...] = (4, 4)  # multikey_3 key: hex groups joined by '-'
  prefix_bos: bool = True

  @property
  def num_gold(self) -> int:
    return dict(multivalue=self.num_values, multiquery=self.num_queries).get(self.subtask, 1)

  def vocab(self) -> WordVocabConfig:
    return WordVocabConfig(self.num_id_symbols, self.num_key_symbols,
                           self.num_value_symbols)


def _essay(tok: WordTokenizer, sentences: int = 256) -> list[int]:
  """A fixed essay-like text: sentences of 6-14 filler words, each ending in '.'."""
  rng = np.random.default_rng(20240601)
  out: list[int] = []
  for _ in range(sentences):
    out += [tok.filler_ids[i] for i in rng.integers(0, len(tok.filler_ids),
                                                     rng.integers(6, 15))]
    out.append(tok.word_id("."))
  return out


class NIAHTask:
  """``task(index) -> Example`` for one NIAH subtask (deterministic by seed, index)."""

  def __init__(self, config: NIAHConfig, tokenizer: WordTokenizer | None = None,
               seed: int = 0):
    if config.subtask not in SUBTASKS:
      raise ValueError(f"unknown NIAH subtask {config.subtask!r}; use one of {SUBTASKS}")
    self.config, self.seed = config, seed
    # Each subtask draws from its own streams (same seed, different needles).
    self._stream_seed = seed * 1009 + 101 + SUBTASKS.index(config.subtask)
    self.tokenizer = tokenizer or WordTokenizer(config.vocab())
    v = self.tokenizer.config
    for name in ("num_id_symbols", "num_key_symbols", "num_value_symbols"):
      if getattr(config, name) > getattr(v, name):
        raise ValueError(f"NIAHConfig.{name} exceeds the tokenizer's; enlarge "
                         "WordVocabConfig")
    if config.num_docs < config.num_gold:
      raise ValueError(f"num_docs={config.num_docs} < {config.num_gold} gold "
                       "documents; raise num_docs")
    if config.doc_len < self.needle_length:
      raise ValueError(f"doc_len={config.doc_len} < needle length "
                       f"{self.needle_length}; raise doc_len")
    self.name = f"niah_{config.subtask}"
    self._essay = _essay(self.tokenizer)
    self._words = {w: self.tokenizer.word_id(w) for w in
                   ("the", "special", "magic", "value", "values", "for", "is", ".",
                    ",", ":", "?", "-", "what", "are", "all")}

  @property
  def needle_length(self) -> int:
    c = self.config
    key = (sum(c.uuid_groups) + len(c.uuid_groups) - 1 if c.subtask == "multikey_3"
           else c.key_len)
    return 7 + key + c.value_len

  def with_num_docs(self, num_docs: int) -> "NIAHTask":
    """Same task and seed with a different memory size (more/fewer distractors)."""
    return NIAHTask(dataclasses.replace(self.config, num_docs=num_docs),
                    self.tokenizer, self.seed)

  def with_memory_tokens(self, budget: int) -> "NIAHTask":
    """Same task with as many documents as fit ``budget`` memory tokens."""
    per_doc = self.config.doc_len + self.config.id_len + 2
    return self.with_num_docs(max(self.config.num_gold, budget // per_doc))

  def __call__(self, index: int) -> Example:
    c, tok, w = self.config, self.tokenizer, self._words
    core = example_rng(self._stream_seed, index, CORE)
    filler = example_rng(self._stream_seed, index, FILLER)
    values = example_rng(self._stream_seed, index, VALUES)
    ids = UniqueTuples(example_rng(self._stream_seed, index, IDS), c.num_id_symbols,
                       c.id_len, "document ids")
    if c.subtask == "multikey_3":
      keys = UniqueTuples(example_rng(self._stream_seed, index, KEYS), 16,
                          sum(c.uuid_groups), "uuid keys")
    else:
      keys = UniqueTuples(example_rng(self._stream_seed, index, KEYS), c.num_key_symbols,
                          c.key_len, "keys")

    def key_tok(k):
      if c.subtask != "multikey_3":
        return [tok.key_symbol(s) for s in k]
      out, at = [], 0
      for n, g in enumerate(c.uuid_groups):
        out += ([w["-"]] if n else []) + [tok.hex_symbol(s) for s in k[at:at + g]]
        at += g
      return out

    def value_tok(v=None):
      v = values.integers(0, c.num_value_symbols, c.value_len) if v is None else v
      return [tok.value_symbol(int(s)) for s in v]

    def needle(k, v):
      return ([w["the"], w["special"], w["magic"], w["value"], w["for"]] + key_tok(k)
              + [w["is"]] + v + [w["."]])

    kind = _HAYSTACK[c.subtask]

    def haystack() -> list:
      """doc_len tokens of haystack; for 'needles', a list of needles (+ tail)."""
      if kind == "noise":
        return [tok.filler_ids[i] for i in filler.integers(0, len(tok.filler_ids), c.doc_len)]
      if kind == "essay":
        start = int(filler.integers(0, len(self._essay)))
        return [self._essay[(start + i) % len(self._essay)] for i in range(c.doc_len)]
      if kind == "kv":
        out = []
        while len(out) < c.doc_len:
          out += key_tok(keys.take(1)[0]) + [w[":"]] + value_tok() + [w[","]]
        return out[:c.doc_len]
      n = c.doc_len // self.needle_length
      return [needle(k, value_tok()) for k in keys.take(n)]

    def place(hay: list, ndl: list[int]) -> list[int]:
      """Put needle ``ndl`` into a haystack without changing its length."""
      if kind == "needles":
        hay[int(core.integers(0, len(hay)))] = ndl
        return _flatten_needles(hay, c.doc_len, self._essay)
      pos = int(core.integers(0, c.doc_len - len(ndl) + 1))
      return hay[:pos] + ndl + hay[pos + len(ndl):]

    # Gold documents (fixed for every memory size), then distractors in order.
    g = c.num_gold
    if c.subtask == "multivalue":
      gold_keys = keys.take(1) * g
      vals = UniqueTuples(values, c.num_value_symbols, c.value_len, "values").take(g)
      gold_values = [value_tok(v) for v in vals]
    else:
      gold_keys = keys.take(g)
      gold_values = [value_tok() for _ in range(g)]
    gold = [make_document(tok, ids.take(1)[0],
                          place(haystack(), needle(gold_keys[n], gold_values[n])))
            for n in range(g)]
    distractors = []
    for j in range(c.num_docs - g):
      hay = haystack()
      if c.subtask == "multikey_1" and j < c.num_distractor_needles:
        text = place(hay, needle(keys.take(1)[0], value_tok()))
      else:
        text = _flatten_needles(hay, c.doc_len, self._essay) if kind == "needles" else hay
      distractors.append(make_document(tok, ids.take(1)[0], text))

    if c.subtask == "multiquery":
      asked = []
      for n, k in enumerate(gold_keys):
        asked += ([w[","]] if n else []) + key_tok(k)
      question = [w["what"], w["are"], w["all"], w["the"], w["special"], w["magic"],
                  w["values"], w["for"]] + asked + [w["?"]]
    elif c.subtask == "multivalue":
      question = [w["what"], w["are"], w["all"], w["the"], w["special"], w["magic"],
                  w["values"], w["for"]] + key_tok(gold_keys[0]) + [w["?"]]
    else:
      question = [w["what"], w["is"], w["the"], w["special"], w["magic"], w["value"],
                  w["for"]] + key_tok(gold_keys[0]) + [w["?"]]
    answer = []
    for n, v in enumerate(gold_values):
      answer += ([w[","]] if n else []) + v
    prefix = [tok.specials.bos] if c.prefix_bos else []
    return assemble(tok, task=self.name, seed=self._stream_seed, index=index, gold=gold,
                    distractors=distractors, question=question, answer=answer,
                    rounds=[gold], prefix=prefix)


def _flatten_needles(needles: list[list[int]], doc_len: int, essay: list[int]) -> list[int]:
  """Needles back to back, topped up to ``doc_len`` with essay tokens."""
  out = [t for n in needles for t in n]
  return out + essay[:doc_len - len(out)]


def niah_suite(seed: int = 0, tokenizer: WordTokenizer | None = None,
               **sizes) -> dict[str, NIAHTask]:
  """All 8 subtasks with shared sizes (``sizes`` override NIAHConfig fields)."""
  tokenizer = tokenizer or WordTokenizer(NIAHConfig(**sizes).vocab())
  return {s: NIAHTask(NIAHConfig(subtask=s, **sizes), tokenizer, seed) for s in SUBTASKS}
