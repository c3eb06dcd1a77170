"""Generation with Memory Interleave (SPEC §5, paper §3.5) over an ``Engine``.

Each round prefills the current questions (routing in every router layer), decodes with
the KV cache until ``<id-end>``, ``<eos>`` or the token budget, and parses what came out:
document ids (their original text is appended to the question and the next round routes
again) or ``<end-of-retrieval>`` and the answer. An id that names no document ends that
question with a stated failure. The memory of a batch is one of:

  ``BankBatch``      a shared bank placed on the devices (``memory.DeviceBank``);
  ``ExampleBatch``   each question's own documents (the training layout; evaluation).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax import routing
from msa_jax.data import interleave as data_interleave
from msa_jax.data.tokenizer import SpecialTokens
from msa_jax.inference.engine import Engine, PrefixContext, active_start, bank_prefix


@dataclasses.dataclass
class Generation:
  """What the model produced for one question over all rounds."""

  answer: Optional[list[int]]        # None when it never reached <end-of-retrieval>
  rounds: list[list[str]]            # document ids named in each retrieval round
  first_selected: list[list[str]]    # per router layer: documents selected in round 1
  first_ranked: list[list[str]]      # the same, best score first
  first_scores: Optional[np.ndarray]  # [R, N] router scores of round 1 (per-example memory)
  failure: str = ""
  # The tokens of the round that failed (an unknown id, neither id nor answer, or the
  # round budget spent), so a failure can be read token by token; None otherwise.
  failed_tokens: Optional[list[int]] = None
  timings_ms: dict = dataclasses.field(default_factory=dict)


class BankBatch:
  """A batch of questions over one shared bank; documents are bank indices."""

  kind = "bank"

  def __init__(self, device_bank, batch: int, model_config, question_at: int = 0):
    """``question_at`` > 0 numbers each question (global RoPE) as if the bank held that many
    tokens (a probe of the question's position, ``launch.question_position_probe``); 0:
    after the bank's own tokens."""
    self.device_bank, self.bank = device_bank, device_bank.bank
    self.batch = batch
    self.mem_args = device_bank.arrays()
    self.prefix = bank_prefix(self.bank, batch)
    start = active_start(model_config, len(self.bank.prefix_tokens),
                         question_at or self.bank.num_tokens)
    self.active_start_b = np.full((batch,), start, np.int32)
    self._ids: Optional[dict[str, int]] = None

  def parse(self, row: int, generated, specials):
    return data_interleave.parse_round(generated, self.bank.id_table(), specials)

  def inject(self, row: int, question: list[int], docs: Sequence[int],
             injection: str = "text") -> list[int]:
    data_interleave.check_injection(injection)
    out = list(question)
    for j in docs:
      out += self.bank.doc_tokens(j) if injection == "text" else self.bank.doc_id_tokens(j)
    return out

  def name(self, row: int, doc: int) -> str:
    """The id of a parsed document (a bank index)."""
    return self.bank.doc_ids[int(doc)]

  def slot_name(self, row: int, slot: int) -> str:
    """The id of a routed document (a bank index, as routing returns it)."""
    return self.name(row, slot)

  def index_of(self, doc_id: str) -> int:
    if self._ids is None:
      self._ids = {d: j for j, d in enumerate(self.bank.doc_ids)}
    if doc_id not in self._ids:
      raise KeyError(f"document {doc_id!r} is not in the bank {self.bank.path}")
    return self._ids[doc_id]

  def forced(self, gold: Sequence[Sequence[str]], k: int) -> routing.Selection:
    return _selection([[self.index_of(d) for d in ids] for ids in gold], self.batch, k)


class ExampleBatch:
  """A batch of examples, each routed over its own documents (training layout)."""

  kind = "examples"

  def __init__(self, examples, mem_args, prefix: PrefixContext, active_start_b, batch: int):
    self.examples, self.mem_args, self.prefix = list(examples), mem_args, prefix
    self.active_start_b = np.asarray(active_start_b, np.int32)
    self.batch = batch

  def parse(self, row: int, generated, specials):
    return data_interleave.parse_round(generated, self.examples[row].docs, specials)

  def inject(self, row: int, question: list[int], docs: Sequence[str],
             injection: str = "text") -> list[int]:
    return data_interleave.next_question(question, self.examples[row].docs, docs, injection)

  def name(self, row: int, doc) -> str:
    """The id of a parsed document (``parse_round`` returns ids here)."""
    return str(doc)

  def slot_name(self, row: int, slot: int) -> str:
    """The id of a routed document (a slot of the row's own memory)."""
    return self.examples[row].docs[int(slot)].doc_id

  def forced(self, gold: Sequence[Sequence[str]], k: int) -> routing.Selection:
    slots = []
    for ex, ids in zip(self.examples, gold):
      want = set(ids)
      slots.append([i for i, d in enumerate(ex.docs) if d.doc_id in want])
    return _selection(slots, self.batch, k)


def _selection(docs_per_row: Sequence[Sequence[int]], batch: int, k: int) -> routing.Selection:
  idx = np.zeros((batch, k), np.int32)
  valid = np.zeros((batch, k), bool)
  for row, docs in enumerate(docs_per_row):
    docs = sorted(set(docs))[:k]
    idx[row, :len(docs)] = docs
    valid[row, :len(docs)] = True
  return routing.Selection(jnp.asarray(idx), jnp.asarray(valid))


def _bucket(n: int, minimum: int = 16) -> int:
  """Buffer lengths are powers of two (few compiles)."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def generate(engine: Engine, memory, questions: Sequence[Sequence[int]],
             specials: SpecialTokens, *, max_rounds: int = 3, max_new_tokens: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             oracle_rounds: Optional[Sequence[Sequence[Sequence[str]]]] = None,
             injection: str = "text") -> list[Generation]:
  """Answers ``questions`` (token lists, at most ``memory.batch``) by generative retrieval.

  ``oracle_rounds[row][r]`` (gold document ids of round r; the last entry also serves the
  answer round) forces routing to the gold documents: it separates router errors from
  reader errors. ``injection``: what a round appends for the documents it named, their
  text or only their ids (``data.interleave.INJECTIONS``); ``max_rounds=1`` allows one
  retrieval round before the answer (the paper's "w/o multi-round" ablation).
  """
  data_interleave.check_injection(injection)
  n, b = len(questions), memory.batch
  if n > b:
    raise ValueError(f"{n} questions for a batch of {b}")
  k = engine.model.config.top_k
  qs = [list(q) for q in questions] + [[specials.eos]] * (b - n)
  done = [False] * n + [True] * (b - n)
  gens = [Generation(None, [], [], [], None, timings_ms={"prefill": 0.0, "decode": 0.0})
          for _ in range(n)]
  stops = {specials.id_end, specials.eos}
  key = jax.random.PRNGKey(seed)
  for r in range(max_rounds + 1):
    live = [i for i in range(n) if not done[i]]
    if not live:
      break
    longest = max(len(qs[i]) for i in live)
    m = _bucket(longest + max_new_tokens)
    tokens = np.zeros((b, m), np.int32)
    q_len = np.ones((b,), np.int32)
    for i in range(b):
      if not done[i]:
        tokens[i, :len(qs[i])] = qs[i]
        q_len[i] = len(qs[i])
    forced = None
    if oracle_rounds is not None:
      gold = [(oracle_rounds[i][min(r, len(oracle_rounds[i]) - 1)] if i < n else [])
              for i in range(b)]
      forced = memory.forced(gold, k)
    t0 = time.perf_counter()
    # Only the question slots route: a power-of-two bucket of the longest (few compiles).
    logits, decisions, cache = engine.prefill(memory.mem_args, memory.prefix, tokens, q_len,
                                              memory.active_start_b, forced,
                                              route_rows=min(m, _bucket(longest)))
    logits.block_until_ready()
    t1 = time.perf_counter()
    if r == 0:
      _record_first_round(gens, decisions, memory)
    # the round's tokens in one device loop (sample, decode; no host round trip per token)
    toks, key = engine.decode_tokens(cache, logits, key, q_len, memory.active_start_b,
                                     np.array(done), max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, stop_ids=stops)
    toks = np.asarray(toks)
    generated = [[int(t) for t in toks[i] if t >= 0] for i in range(b)]
    t2 = time.perf_counter()
    for i in live:
      gens[i].timings_ms["prefill"] += 1e3 * (t1 - t0)
      gens[i].timings_ms["decode"] += 1e3 * (t2 - t1)
      _finish_round(gens[i], memory, i, generated[i], qs, done, r, max_rounds, specials,
                    injection)
  return gens


def _record_first_round(gens, decisions, memory) -> None:
  docs = np.stack([np.asarray(d.doc_idx_bk) for d in decisions], 1)      # [B, R, k]
  valid = np.stack([np.asarray(d.valid_bk) for d in decisions], 1)
  if hasattr(decisions[0], "doc_scores_bn"):                              # per-example memory
    scores = np.stack([np.asarray(d.doc_scores_bn) for d in decisions], 1)   # [B, R, N]
    chosen = np.take_along_axis(scores, docs, 2)
  else:                                                                    # a shared bank
    scores = None
    chosen = np.stack([np.asarray(d.top_scores_bk) for d in decisions], 1)
  for i, g in enumerate(gens):
    name = lambda j: memory.slot_name(i, int(j))
    g.first_selected, g.first_ranked = [], []
    for l in range(docs.shape[1]):
      ok = valid[i, l]
      g.first_selected.append([name(j) for j in docs[i, l][ok]])
      order = np.lexsort((docs[i, l][ok], -chosen[i, l][ok]))
      g.first_ranked.append([name(j) for j in docs[i, l][ok][order]])
    g.first_scores = None if scores is None else scores[i]


def _finish_round(gen: Generation, memory, i: int, generated, qs, done, r: int,
                  max_rounds: int, specials, injection: str = "text") -> None:
  parsed = memory.parse(i, generated, specials)
  if parsed.finished:
    gen.answer, done[i] = parsed.answer, True
  elif parsed.doc_ids and parsed.all_found:
    gen.rounds.append([memory.name(i, d) for d in parsed.doc_ids])
    qs[i] = memory.inject(i, qs[i], parsed.doc_ids, injection)
    if r == max_rounds:
      done[i], gen.failure = True, f"no answer after {max_rounds} retrieval rounds"
      gen.failed_tokens = list(generated)
  else:
    done[i] = True
    gen.failure = ("named a document that is not in memory" if parsed.unknown
                   else "generated neither an id nor an answer")
    gen.failed_tokens = list(generated)
  if done[i] and gen.answer is None and not gen.failure:
    gen.failure = "unfinished"


@functools.lru_cache(maxsize=8)
def _example_encoders(model):
  from msa_jax import positions as positions_lib
  from msa_jax.model import MSAModel
  cfg = model.config

  def encode(params, prefix_tokens, prefix_mask, doc_tokens, doc_mask):
    one = jnp.zeros(prefix_mask.shape[:1] + (1,), bool)
    prefix_pos, doc_pos, active_pos = positions_lib.stream_positions(
        prefix_mask, doc_mask, one, top_k=cfg.top_k, rope_mode=cfg.rope_mode)
    memory = model.apply({"params": params}, doc_tokens, doc_mask, doc_pos,
                         method=MSAModel.encode_documents)
    kv = model.apply({"params": params}, prefix_tokens, prefix_mask, prefix_pos,
                     method=MSAModel.encode_prefix)
    prefix = PrefixContext([k for k, _ in kv], [v for _, v in kv], prefix_mask)
    return memory, prefix, active_pos[:, 0]

  return jax.jit(encode)


def example_batch(model, params, examples, batch: int) -> ExampleBatch:
  """Stage 1 for a batch of examples' own documents (as the training forward lays them out)."""
  from msa_jax.data.collate import BucketShapes, collate
  from msa_jax.pooling import num_chunks
  cfg = model.config
  shapes = BucketShapes(batch, max(1, max(len(e.prefix) for e in examples)),
                        max(len(e.docs) for e in examples),
                        num_chunks(max(e.max_doc_length for e in examples),
                                   cfg.pooling_chunk_size) * cfg.pooling_chunk_size,
                        2)
  bare = [dataclasses.replace(ex, question=ex.question[:1], target=[ex.question[0]])
          for ex in examples]
  mb = collate(bare, shapes)
  memory, prefix, start = _example_encoders(model)(
      params, jnp.asarray(mb.prefix_tokens), jnp.asarray(mb.prefix_mask),
      jnp.asarray(mb.doc_tokens), jnp.asarray(mb.doc_mask))
  return ExampleBatch(examples, memory, prefix, np.asarray(start), batch)
