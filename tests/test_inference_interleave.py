"""Memory Interleave's control flow (SPEC §5, paper §3.5), with a scripted engine.

The engine is replaced by one that "generates" a fixed script per round and records the
question it was asked, so the test pins what the loop does with the output: ids named in
a round inject those documents' original tokens into the next round's question, the
end-of-retrieval marker ends retrieval and the rest up to <eos> is the answer, an unknown
id ends that question with a stated failure, and the round budget is enforced.
"""
import types

import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.data.example import Document, Example
from msa_jax.data.tokenizer import SpecialTokens
from msa_jax.inference import interleave
from msa_jax.model import Routing

SP = SpecialTokens(pad=0, eos=2, id_end=3, end_of_retrieval=4, bos=1)
VOCAB = 32
DOC_A = Document("A", [10, 11, 20, 21], id_length=2)
DOC_B = Document("B", [12, 13, 22, 23, 24], id_length=2)
DOC_C = Document("C", [14, 15, 25], id_length=2)


class ScriptedEngine:
  """Emits ``script[row][round]`` token by token; records each round's question."""

  def __init__(self, script):
    self.script = script
    self.model = types.SimpleNamespace(config=types.SimpleNamespace(top_k=2))
    self.questions = []
    self.round = -1

  def _logits(self):
    out = np.full((len(self.script), VOCAB), -1.0, np.float32)
    for i, rounds in enumerate(self.script):
      seq = rounds[min(self.round, len(rounds) - 1)]
      out[i, seq[min(self.pos, len(seq) - 1)]] = 1.0
    return jnp.asarray(out)

  def prefill(self, mem_args, prefix, tokens, q_len, start, forced=None, route_rows=None):
    assert route_rows is None or max(q_len) <= route_rows <= tokens.shape[1]
    self.round += 1
    self.pos = 0
    self.questions.append([list(tokens[i, :q_len[i]]) for i in range(len(q_len))])
    n = 3
    decision = Routing(jnp.zeros((len(q_len), n)), jnp.zeros((len(q_len), 2), jnp.int32),
                       jnp.ones((len(q_len), 2), bool))
    return self._logits(), [decision], None

  def sample(self, logits, key, temperature, top_p):
    return jnp.argmax(logits, axis=-1)

  def decode(self, cache, tok, cur, start):
    self.pos += 1
    return self._logits(), cache

  def decode_tokens(self, cache, logits, key, cur, start, finished, *, max_new_tokens,
                    temperature=0.0, top_p=1.0, stop_ids=()):
    """``Engine.decode_tokens``' contract on the script (its equality with the host loop is
    tested in test_inference_engine): a row's tokens until its stop id, -1 after."""
    finished = np.array(finished)
    out = np.full((len(self.script), max_new_tokens), -1, np.int32)
    for step in range(max_new_tokens):
      tok = np.asarray(self.sample(logits, key, temperature, top_p))
      out[:, step] = np.where(finished, -1, tok)
      finished |= np.isin(tok, list(stop_ids))
      if finished.all() or step == max_new_tokens - 1:
        break
      logits, cache = self.decode(cache, tok, cur, start)
    return jnp.asarray(out), key


def _memory(n_rows):
  ex = Example(prefix=[], docs=[DOC_A, DOC_B, DOC_C], question=[5, 6], target=[7],
               positive_doc_ids=["A"])
  return interleave.ExampleBatch([ex] * n_rows, None, None, np.zeros(n_rows, np.int32), n_rows)


def test_two_hop_follows_the_named_documents_and_stops_at_the_marker():
  script = [[[10, 11, 3], [12, 13, 3], [4, 8, 9, 2]]]
  eng = ScriptedEngine(script)
  gen, = interleave.generate(eng, _memory(1), [[5, 6]], SP, max_rounds=3, max_new_tokens=6)
  assert gen.rounds == [["A"], ["B"]]
  assert gen.answer == [8, 9] and gen.failure == ""
  assert [q[0] for q in eng.questions] == [[5, 6], [5, 6] + DOC_A.tokens,
                                           [5, 6] + DOC_A.tokens + DOC_B.tokens]


def test_ids_only_injection_appends_the_named_ids_not_the_text():
  """The paper's "w/o original text" ablation: each round appends only the ids it named."""
  script = [[[10, 11, 3], [12, 13, 3], [4, 8, 9, 2]]]
  eng = ScriptedEngine(script)
  gen, = interleave.generate(eng, _memory(1), [[5, 6]], SP, max_rounds=3, max_new_tokens=6,
                             injection="ids")
  assert gen.rounds == [["A"], ["B"]] and gen.answer == [8, 9]
  assert [q[0] for q in eng.questions] == [[5, 6], [5, 6, 10, 11], [5, 6, 10, 11, 12, 13]]


def test_one_retrieval_round_then_the_answer():
  """``max_rounds=1`` (the "w/o multi-round" ablation): a second round of ids fails."""
  script = [[[10, 11, 3], [12, 13, 3], [4, 8, 9, 2]]]
  gen, = interleave.generate(ScriptedEngine(script), _memory(1), [[5, 6]], SP, max_rounds=1,
                             max_new_tokens=6)
  assert gen.answer is None and gen.failure == "no answer after 1 retrieval rounds"


def test_bank_batch_injects_text_or_ids():
  bank = types.SimpleNamespace(doc_tokens=lambda j: [100 + j, 7, 8],
                               doc_id_tokens=lambda j: [100 + j])
  batch = object.__new__(interleave.BankBatch)
  batch.bank = bank
  assert batch.inject(0, [5], [2, 3]) == [5, 102, 7, 8, 103, 7, 8]
  assert batch.inject(0, [5], [2, 3], "ids") == [5, 102, 103]
  with pytest.raises(ValueError, match="injection must be one of"):
    batch.inject(0, [5], [2], "summary")


def test_unknown_id_ends_with_a_failure_and_others_go_on():
  script = [[[30, 31, 3]], [[14, 15, 3], [4, 7, 2]]]
  gen_bad, gen_ok = interleave.generate(ScriptedEngine(script), _memory(2), [[5], [6]], SP,
                                        max_rounds=3, max_new_tokens=4)
  assert gen_bad.answer is None and gen_bad.failure == "named a document that is not in memory"
  assert gen_bad.failed_tokens == [30, 31, 3]     # what it wrote, to read the failure by
  assert gen_ok.rounds == [["C"]] and gen_ok.answer == [7] and gen_ok.failed_tokens is None


def test_round_budget_is_enforced():
  script = [[[10, 11, 3]]]          # names A forever
  gen, = interleave.generate(ScriptedEngine(script), _memory(1), [[5]], SP, max_rounds=2,
                             max_new_tokens=4)
  assert gen.rounds == [["A"], ["A"], ["A"]]
  assert gen.answer is None and gen.failure == "no answer after 2 retrieval rounds"
  assert gen.failed_tokens == [10, 11, 3]
