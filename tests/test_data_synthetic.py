"""Tests of the kv / multi-hop synthetic tasks, memory scaling and Memory Interleave."""
import dataclasses

import pytest

from msa_jax.data import interleave
from msa_jax.data.collate import BucketShapes, collate
from msa_jax.data.synthetic import (KVConfig, KVRetrievalTask, multihop_task,
                                    smoke_kv_task)


def _gold_docs(ex):
  return [ex.doc_by_id(i) for r in ex.rounds for i in r]


def test_smoke_kv_is_solvable_and_one_chunk():
  task = smoke_kv_task(seed=3)
  tok = task.tokenizer
  for index in range(20):
    ex = task(index)
    assert len(ex.docs) == 32
    assert all(len(d.tokens) == 8 for d in ex.docs)  # one chunk at P=8
    (gold,) = _gold_docs(ex)
    assert ex.positive_doc_ids == [gold.doc_id]
    # the key is the question, it is in the gold doc, followed by the answer
    assert gold.text_tokens == ex.question + ex.answer
    assert sum(d.text_tokens[:2] == ex.question for d in ex.docs) == 1  # unique key
    assert tok.decode(gold.id_tokens).startswith("[ i")
    assert ex.target == gold.id_tokens + [tok.specials.id_end,
                                          tok.specials.end_of_retrieval,
                                          *ex.answer, tok.specials.eos]
  assert task(5) == task(5)
  assert task(5) != task(6)
  assert smoke_kv_task(seed=4)(5) != task(5)


def test_memory_scaling_keeps_question_answer_gold():
  task = smoke_kv_task(seed=1)
  for index in range(5):
    small = task(index)
    for factor in (2, 8, 256):
      big = task.with_num_docs(32 * factor)(index)
      assert len(big.docs) == 32 * factor
      assert (big.question, big.answer, big.rounds, big.target) == (
          small.question, small.answer, small.rounds, small.target)
      assert _gold_docs(big) == _gold_docs(small)
      # only more distractors: the small memory is a subset of the big one
      assert {d.doc_id: d for d in small.docs}.items() <= {
          d.doc_id: d for d in big.docs}.items()
      ids = [d.doc_id for d in big.docs]
      assert len(set(ids)) == len(ids)
      keys = [tuple(d.text_tokens[:2]) for d in big.docs]
      assert len(set(keys)) == len(keys)


def test_large_memory_8192_docs_unique_ids():
  task = KVRetrievalTask(KVConfig(num_docs=8192, facts_per_doc=2), seed=0)
  ex = task(0)
  assert len({d.doc_id for d in ex.docs}) == 8192
  keys = [tuple(d.text_tokens[i:i + 2]) for d in ex.docs for i in (0, 4)]
  assert len(set(keys)) == 2 * 8192
  assert task.with_memory_tokens(8192 * task.config.doc_length).config.num_docs == 8192


def test_id_space_too_small_is_a_clear_error():
  task = KVRetrievalTask(dataclasses.replace(KVConfig(), num_id_symbols=4, id_len=1))
  with pytest.raises(ValueError, match="distinct document ids"):
    task(0)


@pytest.mark.parametrize("hops", [2, 3])
def test_multihop_chain_links(hops):
  task = multihop_task(hops, seed=2, num_docs=16, facts_per_doc=2)
  ex = task(7)
  gold = _gold_docs(ex)
  assert len(gold) == hops and ex.positive_doc_ids == [g.doc_id for g in gold]
  # follow the chain by key lookup over ALL memory docs: it must reach the answer
  facts = {}
  for d in ex.docs:
    t = d.text_tokens
    for i in range(0, len(t), 4):
      facts[tuple(t[i:i + 2])] = (t[i + 2:i + 4], d.doc_id)
  key, path = tuple(ex.question), []
  for _ in range(hops):
    value, doc_id = facts[key]
    path.append(doc_id)
    key = tuple(value)
  assert path == [g.doc_id for g in gold]
  assert list(key) == ex.answer


def test_interleave_expand_single_hop():
  task = smoke_kv_task()
  sp = task.tokenizer.specials
  ex = task(0)
  (gold,) = _gold_docs(ex)
  s0, s1 = interleave.expand(ex, sp)
  assert (s0.question, s0.target) == (ex.question, gold.id_tokens + [sp.id_end])
  assert s1.question == ex.question + gold.tokens  # "[d1]" + text(d1) injected
  assert s1.target == [sp.end_of_retrieval, *ex.answer, sp.eos]
  assert s0.positive_doc_ids == s1.positive_doc_ids == [gold.doc_id]
  assert (s0.step, s1.step) == (0, 1) and s0.docs == s1.docs == ex.docs
  assert len(s1.question) + len(s1.target) == 14 and s0.active_length == 7
  b = collate([s0, s1], BucketShapes(2, 1, 32, 8, 16))
  assert b.targets[1][b.loss_mask[1]].tolist() == s1.target


def test_interleave_expand_three_hops_and_inference_loop():
  task = multihop_task(3, seed=5, num_docs=12)
  sp = task.tokenizer.specials
  ex = task(1)
  gold = _gold_docs(ex)
  samples = interleave.expand(ex, sp)
  assert len(samples) == 4
  assert samples[2].question == ex.question + gold[0].tokens + gold[1].tokens
  assert samples[2].positive_doc_ids == [gold[2].doc_id]
  assert samples[3].positive_doc_ids == [g.doc_id for g in gold]
  # an oracle "model" that emits each sample's target drives the inference loop
  question = ex.question
  for s in samples:
    assert question == s.question
    parsed = interleave.parse_round(s.target, ex.docs, sp)
    if parsed.finished:
      assert parsed.answer == ex.answer
      break
    assert parsed.all_found
    question = interleave.next_question(question, ex.docs, parsed.doc_ids)


def test_parse_round_unknown_ids():
  task = smoke_kv_task()
  tok, ex = task.tokenizer, task(0)
  good = ex.docs[3].id_tokens
  bogus = [d for d in (f"i{a} i{b}" for a in range(128) for b in range(128))
           if d not in {x.doc_id for x in ex.docs}][0]
  gen = good + tok.encode_doc_id(bogus) + [tok.specials.id_end, 99]
  parsed = interleave.parse_round(gen, ex.docs, tok.specials)
  assert parsed.doc_ids == [ex.docs[3].doc_id]
  assert parsed.unknown == [tok.encode_doc_id(bogus)] and not parsed.all_found
  with pytest.raises(KeyError, match="not in memory"):
    interleave.next_question(ex.question, ex.docs, [bogus])


def test_task_mixture():
  from msa_jax.data.niah import NIAHConfig, NIAHTask
  from msa_jax.data.synthetic import TaskMixture
  kv = KVRetrievalTask(KVConfig(num_docs=8), seed=0)
  niah = NIAHTask(NIAHConfig(num_docs=8, doc_len=24), kv.tokenizer, seed=0)
  mix = TaskMixture([kv, niah], [3, 1], seed=2)
  names = [mix(i).task for i in range(200)]
  assert 120 < names.count("kv") < 180 and set(names) == {"kv", "niah_single_essay"}
  assert mix(5) == mix(5)
  big = mix.with_memory_factor(4)
  assert all(len(big(i).docs) == 32 and big(i).question == mix(i).question
             for i in range(6))
  with pytest.raises(ValueError, match="share one vocabulary"):
    TaskMixture([kv, smoke_kv_task()])  # different alphabets, different vocabularies


def test_bare_ids_give_one_four_token_chunk():
  cfg = dataclasses.replace(KVConfig(), id_len=2, key_len=1, value_len=1, bracket_ids=False)
  task = KVRetrievalTask(cfg, seed=0)
  ex = task(0)
  assert cfg.doc_length == 4 and {len(d.tokens) for d in ex.docs} == {4}
  sp = task.tokenizer.specials
  s0, s1 = interleave.expand(ex, sp)
  parsed = interleave.parse_round(s0.target, ex.docs, sp)
  assert parsed.doc_ids == ex.positive_doc_ids and parsed.all_found
  assert s1.question == ex.question + ex.doc_by_id(parsed.doc_ids[0]).tokens


@pytest.mark.parametrize("hops", [1, 2])
def test_fact_slots_put_every_fact_inside_one_chunk(hops):
  """``fact_slot_len = P``: the id fills chunk 0 and fact f fills chunk f + 1 (then ``-``
  padding), so no fact straddles two chunks; the question key heads exactly one chunk
  of the memory (in the gold document) and, for one hop, the answer follows it there."""
  p = 8
  cfg = KVConfig(num_docs=12, facts_per_doc=6, id_len=4, key_len=4, value_len=2,
                 num_id_symbols=128, num_key_symbols=128, num_value_symbols=64, hops=hops,
                 bracket_ids=False, fact_slot_len=p)
  task = KVRetrievalTask(cfg, seed=2)
  tok = task.tokenizer
  pad = tok.encode("-")[0]
  key_ids = {tok.key_symbol(s) for s in range(128)}
  fact_lens = (6, 8) if hops > 1 else (6,)
  assert cfg.doc_length == 7 * p
  for index in range(3):
    ex = task(index)
    holders = []
    for d in ex.docs:
      assert len(d.tokens) == cfg.doc_length and d.id_length == 4
      chunks = [d.tokens[c:c + p] for c in range(0, len(d.tokens), p)]
      assert chunks[0][4:] == [pad] * 4 and pad not in chunks[0][:4]
      for chunk in chunks[1:]:   # a fact (key value, or key key for a link), then padding
        fact = [t for t in chunk if t != pad]
        assert len(fact) in fact_lens and chunk == fact + [pad] * (p - len(fact))
        assert set(fact[:4]) <= key_ids
      holders += [(d.doc_id, c[4:6]) for c in chunks if c[:4] == ex.question]
    gold = ex.rounds[0][0]
    assert [h[0] for h in holders] == [gold]
    if hops == 1:
      assert holders[0][1] == ex.answer
    # without slots the same facts are packed back to back
    packed = KVRetrievalTask(dataclasses.replace(cfg, fact_slot_len=0), seed=2)(index)
    assert [[t for t in d.tokens if t != pad] for d in ex.docs] == \
        [d.tokens for d in packed.docs]


def test_fact_slot_shorter_than_a_fact_is_a_clear_error():
  with pytest.raises(ValueError, match="fact_slot_len=5 is shorter than a fact"):
    KVConfig(key_len=4, value_len=2, fact_slot_len=5)
  with pytest.raises(ValueError, match="must be >= 0"):
    KVConfig(fact_slot_len=-1)
