"""Greedy generation over a document memory, with Memory Interleave (SPEC §5, paper §3.5).

Stage 1 encodes the memory once per batch (``MSAModel.encode_documents``);
every round then routes with the round's question (stage 2) and decodes
greedily (stage 3; this reference decoder re-runs the active tokens each step
instead of keeping a KV cache, which is exact and cheap for short answers).
Between rounds the named documents' original text is appended to the
question, until the model emits ``<end-of-retrieval>`` and the answer.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax import positions as positions_lib
from msa_jax import routing
from msa_jax.data import interleave
from msa_jax.data.collate import BucketShapes, collate
from msa_jax.data.example import Example
from msa_jax.data.tokenizer import SpecialTokens
from msa_jax.model import ExampleMemory, MSAModel, prefix_context


@dataclasses.dataclass
class Generation:
  """What the model produced for one example over all rounds."""

  answer: Optional[list[int]]          # None when it never reached <end-of-retrieval>
  rounds: list[list[str]]              # document ids named in each retrieval round
  first_doc_scores: np.ndarray         # [R, N] router scores of the first round
  failure: str = ""                    # why no answer (unknown id, too many rounds, ...)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_memory(model: MSAModel, params, doc_tokens, doc_mask, prefix_mask):
  cfg = model.config
  active_dummy = jnp.zeros(prefix_mask.shape[:1] + (1,), bool)
  _, doc_pos, _ = positions_lib.stream_positions(prefix_mask, doc_mask, active_dummy,
                                                 top_k=cfg.top_k, rope_mode=cfg.rope_mode)
  return model.apply({"params": params}, doc_tokens, doc_mask, doc_pos,
                     method=MSAModel.encode_documents)


@functools.partial(jax.jit, static_argnums=(0,))
def _active_logits(model: MSAModel, params, memory, prefix_tokens, prefix_mask, doc_mask,
                   active_tokens, active_mask, route_mask, forced):
  cfg = model.config
  prefix_pos, _, active_pos = positions_lib.stream_positions(
      prefix_mask, doc_mask, active_mask, top_k=cfg.top_k, rope_mode=cfg.rope_mode)
  variables = {"params": params}
  prefix_kv = model.apply(variables, prefix_tokens, prefix_mask, prefix_pos,
                          method=MSAModel.encode_prefix)
  logits, decisions = model.apply(variables, active_tokens, active_pos, active_mask, route_mask,
                                  prefix_context(prefix_kv, prefix_mask),
                                  ExampleMemory(memory, forced), method=MSAModel.decode_active)
  scores = jnp.stack([d.doc_scores_bn for d in decisions], axis=1)
  return logits, scores


def _forced_selection(examples: Sequence[Example], doc_ids_per_row: Sequence[Sequence[str]],
                      batch: int, k: int) -> routing.Selection:
  idx = np.zeros((batch, k), np.int32)
  valid = np.zeros((batch, k), bool)
  for row, (ex, ids) in enumerate(zip(examples, doc_ids_per_row)):
    slots = sorted({i for i, d in enumerate(ex.docs) if d.doc_id in set(ids)})[:k]
    idx[row, :len(slots)] = slots
    valid[row, :len(slots)] = True
  return routing.Selection(jnp.asarray(idx), jnp.asarray(valid))


def generate_with_memory(model: MSAModel, params, examples: Sequence[Example],
                         specials: SpecialTokens, *, batch_size: int, max_rounds: int = 3,
                         max_new_tokens: int = 16, oracle: bool = False,
                         modes: Optional[Sequence[bool]] = None):
  """Answers each example's question from its memory by generative retrieval.

  ``oracle=True`` forces each round's gold documents (``example.rounds``, then
  all gold documents for the answer) in place of the router's choice, which
  separates router errors from reader errors. ``modes=(False, True)`` runs
  routed and oracle generation over one encoding of each batch's memory and
  returns a list of generations per mode.
  """
  mode_list = [oracle] if modes is None else list(modes)
  out: list[list[Generation]] = [[] for _ in mode_list]
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    memory = _encode_batch(model, params, chunk, batch_size, max_rounds)
    for i, mode in enumerate(mode_list):
      out[i].extend(_generate_batch(model, params, chunk, specials, memory, max_rounds,
                                    max_new_tokens, mode))
  return out[0] if modes is None else out


@dataclasses.dataclass
class _BatchMemory:
  """One batch's encoded memory (stage 1) and the padded sizes of its active buffer."""

  memory: dict
  prefix_tokens: jax.Array
  prefix_mask: jax.Array
  doc_mask: jax.Array
  batch_size: int
  question_room: int   # longest question plus every document a full chain could inject


def _encode_batch(model, params, examples, batch_size, max_rounds) -> _BatchMemory:
  cfg = model.config
  longest_doc = max(ex.max_doc_length for ex in examples)
  mem_shapes = BucketShapes(batch_size, max(1, max(len(e.prefix) for e in examples)),
                            max(len(e.docs) for e in examples),
                            _round_up(longest_doc, cfg.pooling_chunk_size), 2)
  bare = [dataclasses.replace(ex, question=ex.question[:1], target=[ex.question[0]])
          for ex in examples]
  mem_batch = collate(bare, mem_shapes)
  prefix_tokens = jnp.asarray(mem_batch.prefix_tokens)
  prefix_mask = jnp.asarray(mem_batch.prefix_mask)
  doc_mask = jnp.asarray(mem_batch.doc_mask)
  memory = _encode_memory(model, params, jnp.asarray(mem_batch.doc_tokens), doc_mask, prefix_mask)
  room = max(len(ex.question) for ex in examples) + max_rounds * cfg.top_k * longest_doc
  return _BatchMemory(memory, prefix_tokens, prefix_mask, doc_mask, batch_size, room)


def _generate_batch(model, params, examples, specials, mem: _BatchMemory, max_rounds,
                    max_new_tokens, oracle):
  cfg = model.config
  batch_size = mem.batch_size
  memory, prefix_tokens, prefix_mask, doc_mask = (mem.memory, mem.prefix_tokens,
                                                  mem.prefix_mask, mem.doc_mask)
  m = _round_up(mem.question_room + max_new_tokens, 8)

  questions = [list(ex.question) for ex in examples]
  rounds: list[list[list[str]]] = [[] for _ in examples]
  answers: list[Optional[list[int]]] = [None] * len(examples)
  failures = [""] * len(examples)
  done = [False] * len(examples)
  first_scores = None
  stop_tokens = {specials.id_end, specials.eos}
  for r in range(max_rounds + 1):
    live = [i for i in range(len(examples)) if not done[i]]
    if not live:
      break
    tokens = np.zeros((batch_size, m), np.int32)
    q_len = np.zeros((batch_size,), np.int32)
    for i in live:
      if len(questions[i]) + max_new_tokens > m:
        done[i], failures[i] = True, "question outgrew the active buffer"
        continue
      tokens[i, :len(questions[i])] = questions[i]
      q_len[i] = len(questions[i])
    route_mask = np.arange(m)[None, :] < q_len[:, None]
    forced = None
    if oracle:
      gold = [ex.rounds[r] if ex.rounds and r < len(ex.rounds) else ex.positive_doc_ids
              for ex in examples]
      forced = _forced_selection(examples, gold, batch_size, cfg.top_k)
    generated = [[] for _ in examples]
    cur = q_len.copy()
    finished_row = np.array([done[i] if i < len(examples) else True for i in range(batch_size)])
    for _ in range(max_new_tokens):
      active_mask = np.arange(m)[None, :] < cur[:, None]
      logits, scores = _active_logits(model, params, memory, prefix_tokens, prefix_mask,
                                      doc_mask, jnp.asarray(tokens), jnp.asarray(active_mask),
                                      jnp.asarray(route_mask), forced)
      if r == 0 and first_scores is None:
        first_scores = np.asarray(scores)
      next_tok = np.asarray(jnp.argmax(logits[jnp.arange(batch_size), jnp.maximum(cur - 1, 0)],
                                       axis=-1))
      for i in live:
        if finished_row[i]:
          continue
        tok = int(next_tok[i])
        generated[i].append(tok)
        tokens[i, cur[i]] = tok
        cur[i] += 1
        if tok in stop_tokens:
          finished_row[i] = True
      if all(finished_row[i] for i in live):
        break
    for i in live:
      if done[i]:
        continue
      parsed = interleave.parse_round(generated[i], examples[i].docs, specials)
      if parsed.finished:
        answers[i], done[i] = parsed.answer, True
      elif parsed.doc_ids and parsed.all_found:
        rounds[i].append(parsed.doc_ids)
        questions[i] = interleave.next_question(questions[i], examples[i].docs, parsed.doc_ids)
        if r == max_rounds:
          done[i], failures[i] = True, f"no answer after {max_rounds} retrieval rounds"
      else:
        done[i] = True
        failures[i] = ("named a document not in memory" if parsed.unknown
                       else "generated neither an id nor an answer")
  return [Generation(answers[i], rounds[i], first_scores[i], failures[i] or
                     ("" if answers[i] is not None else "unfinished"))
          for i in range(len(examples))]
