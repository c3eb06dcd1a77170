"""Tokenizers for MSA data: a built-in word-level one and a local Hugging Face wrapper.

Both expose the same small interface (``Tokenizer``): ``encode(str)``,
``decode(ids)``, ``vocab_size``, ``specials`` (the control token ids the data
layout needs) and ``encode_doc_id(doc_id)`` (the bracketed id ``[<id>]`` as it
is stored at the head of a memory document and generated in a target).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Protocol, Sequence

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
ID_END, END_OF_RETRIEVAL = "<id-end>", "<end-of-retrieval>"
OPEN_ID, CLOSE_ID = "[", "]"
SPECIAL_WORDS = (PAD, BOS, EOS, ID_END, END_OF_RETRIEVAL, OPEN_ID, CLOSE_ID)

# Filler words for haystacks and the fixed words of question/needle templates.
# Written here (no downloads); the order is part of the vocabulary, never reorder.
TEMPLATE_WORDS = (
    ".", ",", ":", "?", "-", "is", "what", "are", "all", "the", "one", "of",
    "special", "magic", "value", "values", "for", "key", "mentioned", "in",
    "memory", "and",
)
FILLER_WORDS = (
    "a", "an", "that", "this", "it", "was", "were", "be", "been", "has",
    "have", "had", "do", "does", "did", "will", "would", "can", "could", "may",
    "might", "not", "no", "yes", "so", "but", "or", "if", "then", "when",
    "where", "why", "how", "who", "which", "there", "here", "to", "from", "with",
    "without", "by", "on", "at", "as", "about", "into", "over", "under", "after",
    "before", "between", "through", "during", "people", "time", "year", "day",
    "way", "thing", "man", "woman", "child", "world", "life", "hand", "part",
    "place", "case", "week", "company", "system", "program", "question", "work",
    "government", "number", "night", "point", "home", "water", "room", "mother",
    "area", "money", "story", "fact", "month", "lot", "right", "study", "book",
    "eye", "job", "word", "business", "issue", "side", "kind", "head", "house",
    "service", "friend", "father", "power", "hour", "game", "line", "end",
    "member", "law", "car", "city", "community", "name", "president", "team",
    "minute", "idea", "kid", "body", "information", "back", "parent", "face",
    "others", "level", "office", "door", "health", "person", "art", "war",
    "history", "party", "result", "change", "morning", "reason", "research",
    "girl", "guy", "moment", "air", "teacher", "force", "education", "grass",
    "sky", "sun", "green", "blue", "yellow", "go", "again", "good", "new",
    "first", "last", "long", "great", "little", "own", "other", "old", "big",
    "high", "different", "small", "large", "next", "early", "young", "important",
    "few", "public", "bad", "same", "able", "make", "know", "think", "take",
    "see", "come", "want", "look", "use", "find", "give", "tell", "startup",
    "startups", "founders", "investors", "users", "product", "build", "grow",
)
HEX_DIGITS = "0123456789abcdef"
# Hugging Face export: an unknown token absent from the vocabulary (unknown words raise).
_NO_UNK = "<unk>"
_MODEL_MAX_LENGTH = 1 << 30


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids of the control tokens used by the MSA data layout (SPEC §4)."""

  pad: int
  eos: int
  id_end: int
  end_of_retrieval: int
  bos: int | None = None


class Tokenizer(Protocol):
  """What the data package needs from a tokenizer."""

  specials: SpecialTokens

  @property
  def vocab_size(self) -> int: ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def encode_doc_id(self, doc_id: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class WordVocabConfig:
  """Sizes of the symbol families of the built-in word vocabulary.

  Symbols are words ``i<n>`` (document-id symbols), ``k<n>`` (keys), ``v<n>``
  (values) and ``h<hex>`` (uuid-like key digits).
  """

  num_id_symbols: int = 128
  num_key_symbols: int = 256
  num_value_symbols: int = 256
  bracket_ids: bool = True  # False: ids stored/generated as bare symbols (shorter docs)


class WordTokenizer:
  """Deterministic whitespace word tokenizer for the synthetic tasks.

  Vocabulary order: specials (``<pad>`` = 0, ``<bos>``, ``<eos>``, ``<id-end>``,
  ``<end-of-retrieval>``, ``[``, ``]``), id symbols, key symbols, value symbols,
  hex digits, template words, filler words. Unknown words raise.
  """

  def __init__(self, config: WordVocabConfig = WordVocabConfig()):
    self.config = config
    words = list(SPECIAL_WORDS)
    words += [f"i{n}" for n in range(config.num_id_symbols)]
    words += [f"k{n}" for n in range(config.num_key_symbols)]
    words += [f"v{n}" for n in range(config.num_value_symbols)]
    words += [f"h{c}" for c in HEX_DIGITS]
    words += list(TEMPLATE_WORDS) + list(FILLER_WORDS)
    if len(set(words)) != len(words):
      raise AssertionError("built-in vocabulary has duplicate words")
    self.words: tuple[str, ...] = tuple(words)
    self._index = {w: n for n, w in enumerate(words)}
    self._id0 = len(SPECIAL_WORDS)
    self._key0 = self._id0 + config.num_id_symbols
    self._value0 = self._key0 + config.num_key_symbols
    self._hex0 = self._value0 + config.num_value_symbols
    self.filler_ids: tuple[int, ...] = tuple(self._index[w] for w in FILLER_WORDS)
    self.specials = SpecialTokens(
        pad=self._index[PAD], bos=self._index[BOS], eos=self._index[EOS],
        id_end=self._index[ID_END],
        end_of_retrieval=self._index[END_OF_RETRIEVAL])
    self.open_id = self._index[OPEN_ID]
    self.close_id = self._index[CLOSE_ID]

  @property
  def vocab_size(self) -> int:
    return len(self.words)

  def encode(self, text: str) -> list[int]:
    """Split on whitespace and map each word to its id (unknown words raise)."""
    return self.encode_words(text.split())

  def encode_words(self, words: Sequence[str]) -> list[int]:
    """Map words to ids; raises ``KeyError`` naming the first unknown word."""
    try:
      return [self._index[w] for w in words]
    except KeyError as e:
      raise KeyError(
          f"word {e.args[0]!r} is not in the built-in vocabulary; use symbols "
          "i<n>/k<n>/v<n>/h<hex>, specials, template or filler words") from None

  def decode(self, ids: Sequence[int]) -> str:
    """Join the words of ``ids`` with spaces (ids out of range raise)."""
    return " ".join(self.words[int(i)] for i in ids)

  def encode_doc_id(self, doc_id: str) -> list[int]:
    """``[`` + id words + ``]`` (or the bare id words when ``bracket_ids`` is
    False): how a document id is stored and generated."""
    if not self.config.bracket_ids:
      return self.encode(doc_id)
    return [self.open_id] + self.encode(doc_id) + [self.close_id]

  def to_hf_tokenizer(self):
    """The same vocabulary as a Hugging Face ``tokenizers.Tokenizer``.

    A ``WordLevel`` model over ``self.words`` (same ids) behind a whitespace
    split, no normaliser, no added bos/eos, so ``encode(text).ids`` equals
    :meth:`encode` and ``decode(ids)`` (words joined by spaces) equals
    :meth:`decode`. The control words are special tokens. An unknown word is an
    error in both (``WordLevel`` has no unknown token here).
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    hf = Tokenizer(models.WordLevel(dict(self._index), unk_token=_NO_UNK))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens([AddedToken(w, special=True, normalized=False)
                           for w in (PAD, BOS, EOS, ID_END, END_OF_RETRIEVAL)])
    return hf

  def save_pretrained(self, directory: str) -> list[str]:
    """Writes the vocabulary as a Hugging Face tokenizer dir; returns the files written.

    ``tokenizer.json`` (:meth:`to_hf_tokenizer`), ``tokenizer_config.json`` and
    ``special_tokens_map.json``: ``transformers.AutoTokenizer.from_pretrained(directory)``
    loads it (a ``PreTrainedTokenizerFast``) and encodes/decodes task text as this
    tokenizer does (``clean_up_tokenization_spaces`` is off, so ``" ."`` stays).
    """
    import json
    import os
    os.makedirs(directory, exist_ok=True)
    specials = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS}
    extra = [ID_END, END_OF_RETRIEVAL]
    paths = [os.path.join(directory, name) for name in
             ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    self.to_hf_tokenizer().save(paths[0])
    config = dict(specials, tokenizer_class="PreTrainedTokenizerFast",
                  additional_special_tokens=extra, clean_up_tokenization_spaces=False,
                  model_max_length=_MODEL_MAX_LENGTH, add_bos_token=False, add_eos_token=False)
    with open(paths[1], "w") as f:
      json.dump(config, f, indent=2)
    with open(paths[2], "w") as f:
      json.dump(dict(specials, additional_special_tokens=extra), f, indent=2)
    return paths

  # Symbol families, addressed by their index inside the family.
  def id_symbol(self, n: int) -> int:
    self._check(n, self.config.num_id_symbols, "num_id_symbols")
    return self._id0 + n

  def key_symbol(self, n: int) -> int:
    self._check(n, self.config.num_key_symbols, "num_key_symbols")
    return self._key0 + n

  def value_symbol(self, n: int) -> int:
    self._check(n, self.config.num_value_symbols, "num_value_symbols")
    return self._value0 + n

  def hex_symbol(self, n: int) -> int:
    self._check(n, 16, "hex digits")
    return self._hex0 + n

  def word_id(self, word: str) -> int:
    return self.encode_words([word])[0]

  @staticmethod
  def _check(n: int, size: int, name: str):
    if not 0 <= n < size:
      raise ValueError(f"symbol {n} out of range [0, {size}); raise {name}")


# Files of which a Hugging Face tokenizer directory holds at least one.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                      "vocab.json", "vocab.txt", "spiece.model")


def _load_hf_tokenizer(path: str):
  """``AutoTokenizer.from_pretrained(path)`` offline; a directory that is not a tokenizer
  (or an unreadable one) is a ``ValueError`` naming the path, not transformers' guess."""
  import transformers  # heavy import, only when used
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path} does not exist or is not a directory")
  if not any(os.path.isfile(os.path.join(path, f)) for f in HF_TOKENIZER_FILES):
    found = sorted(os.listdir(path))[:8]
    raise ValueError(f"{path} is not a Hugging Face tokenizer directory: it has none of "
                     f"{list(HF_TOKENIZER_FILES)} (found {found}); point data.tokenizer_dir at "
                     "the directory holding tokenizer.json / tokenizer_config.json")
  try:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # noqa: BLE001 - re-raised naming the directory
    first = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(f"could not load the Hugging Face tokenizer in {path}: "
                     f"{type(e).__name__}: {first[:300]}") from e


class HFTokenizer:
  """Thin wrapper around a local Hugging Face tokenizer directory (offline).

  The directory must define an eos token and the control tokens ``<id-end>``
  and ``<end-of-retrieval>`` (pass ``add_missing_control_tokens=True`` to add
  them as special tokens; ``vocab_size`` then grows and the model's embedding
  must be at least that large). Padding uses the tokenizer's pad token, else
  ``pad_id`` (masked out everywhere, so any id is safe).
  """

  def __init__(self, path: str, *, add_missing_control_tokens: bool = False,
               pad_id: int = 0, id_end_token: str = ID_END,
               end_of_retrieval_token: str = END_OF_RETRIEVAL):
    self.path = str(path)
    self.hf = _load_hf_tokenizer(self.path)
    control = [id_end_token, end_of_retrieval_token]
    missing = [t for t in control if t not in self.hf.get_vocab()]
    if missing and not add_missing_control_tokens:
      raise ValueError(
          f"tokenizer at {self.path} lacks control tokens {missing}; add them "
          "to the tokenizer or pass add_missing_control_tokens=True")
    if missing:
      self.hf.add_special_tokens({"additional_special_tokens": missing})
    if self.hf.eos_token_id is None:
      raise ValueError(f"tokenizer at {self.path} has no eos token; set one "
                       "in its tokenizer_config.json (eos_token)")
    vocab = self.hf.get_vocab()
    pad = self.hf.pad_token_id
    self.specials = SpecialTokens(
        pad=pad_id if pad is None else int(pad), eos=int(self.hf.eos_token_id),
        id_end=vocab[id_end_token], end_of_retrieval=vocab[end_of_retrieval_token],
        bos=self.hf.bos_token_id)

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` without added bos/eos."""
    return list(self.hf.encode(text, add_special_tokens=False))

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode([int(i) for i in ids])

  def encode_doc_id(self, doc_id: str) -> list[int]:
    """Tokens of ``[<doc_id>]`` (stored at a document's head and generated)."""
    return self.encode(f"[{doc_id}]")
