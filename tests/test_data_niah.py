"""Tests of the RULER-style NIAH suite: needles findable, keys unique, memory scaling."""
import pytest

from msa_jax.data import interleave
from msa_jax.data.niah import SUBTASKS, NIAHConfig, NIAHTask, niah_suite


def _count(seq, sub):
  return sum(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


SUITE = niah_suite(seed=0, num_docs=24, doc_len=48, num_values=3, num_queries=3)


@pytest.mark.parametrize("name", SUBTASKS)
def test_subtask_needles_answer_and_uniqueness(name):
  task = SUITE[name]
  tok = task.tokenizer
  for index in range(3):
    ex = task(index)
    assert len(ex.docs) == 24
    assert {len(d.tokens) for d in ex.docs} == {48 + 4}  # same length everywhere
    gold = [ex.doc_by_id(i) for i in ex.rounds[0]]
    assert ex.positive_doc_ids == [g.doc_id for g in gold]
    words = tok.decode(ex.question).split()
    keys = " ".join(words[8 if "are" in words else 7:-1]).split(" , ")
    values = tok.decode(ex.answer).split(" , ")
    if name == "multivalue":
      keys = keys * 3
    assert len(keys) == len(values) == len(gold)
    for k, v, g in zip(keys, values, gold):
      needle = tok.encode(f"the special magic value for {k} is {v} .")
      assert _count(g.text_tokens, needle) == 1
      # the key appears only in gold documents (unique in memory)
      in_docs = [d.doc_id for d in ex.docs if _count(d.tokens, tok.encode(k))]
      assert set(in_docs) <= set(ex.positive_doc_ids) and g.doc_id in in_docs
    samples = interleave.expand(ex, tok.specials)
    assert len(samples) == 2 and samples[1].question[:len(ex.question)] == ex.question


def test_haystack_kinds_differ():
  tok = SUITE["single_noise"].tokenizer
  ex = {n: SUITE[n](0) for n in SUBTASKS}
  noise = ex["single_noise"]
  plain = [d for d in noise.docs if d.doc_id not in noise.positive_doc_ids]
  assert all(set(d.text_tokens) <= set(tok.filler_ids) for d in plain)
  essay = ex["single_essay"].docs[0].text_tokens
  assert 48 // 15 <= essay.count(tok.word_id(".")) <= 48 // 6 + 2
  mk1 = ex["multikey_1"]
  needles = sum(_count(d.tokens, tok.encode("special magic value")) for d in mk1.docs)
  assert needles == 1 + 4  # the needle + num_distractor_needles
  mk2 = ex["multikey_2"]
  assert SUITE["multikey_2"].needle_length == 11
  assert all(_count(d.tokens, tok.encode("special magic value")) == 48 // 11
             for d in mk2.docs)
  q3 = tok.decode(ex["multikey_3"].question).split()
  assert q3[7:-1][4] == "-" and all(x.startswith("h") for x in q3[7:11])
  assert " : " in tok.decode(ex["single_kv"].docs[0].tokens)


@pytest.mark.parametrize("name", ["multikey_1", "multiquery", "single_kv"])
def test_memory_scaling(name):
  task = SUITE[name]
  small, big = task(4), task.with_num_docs(24 * 16)(4)
  assert len(big.docs) == 384
  assert (small.question, small.answer, small.target) == (big.question, big.answer, big.target)
  assert [small.doc_by_id(i) for i in small.rounds[0]] == [
      big.doc_by_id(i) for i in big.rounds[0]]
  assert {d.doc_id: d for d in small.docs}.items() <= {d.doc_id: d for d in big.docs}.items()


def test_config_errors():
  with pytest.raises(ValueError, match="unknown NIAH subtask"):
    NIAHTask(NIAHConfig(subtask="nope"))
  with pytest.raises(ValueError, match="raise doc_len"):
    NIAHTask(NIAHConfig(doc_len=8))
  with pytest.raises(ValueError, match="raise num_docs"):
    NIAHTask(NIAHConfig(subtask="multiquery", num_docs=2))
