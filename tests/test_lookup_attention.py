"""``launch.lookup_attention``: the recorded attention is the model's (one entry per layer,
rows summing to 1 over what each query may see, the forward unchanged), and the head table
finds each fact's value in the injected document."""
import numpy as np
import pytest

from launch import lookup_attention as la
from launch.answer_positions import _kind
from msa_jax.data import from_config, interleave
from msa_jax.data.collate import collate, fit_bucket
from train_common import get_config, small_reading_model

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()


# facts with gaps between them only move the lookup's target: slow-marked
@pytest.mark.parametrize("gaps", [0, pytest.param(5, marks=pytest.mark.slow)])
def test_recorded_attention_and_head_table(gaps):
  cfg = get_config("tiny")
  cfg.data.kv.fact_gaps = gaps
  task = from_config.make_task(cfg.data, 7, memory_tokens=200)
  examples = [task(i) for i in range(4)]
  answers = [interleave.expand(ex, task.tokenizer.specials, False)[-1] for ex in examples]
  batch = collate(answers, fit_bucket(answers, len(answers)))
  model, params = small_reading_model(task.tokenizer.vocab_size, batch)
  store = la.record_attention(model, params, batch, 0.0, False)
  assert len(store) == 2                             # both layers' active tokens, in order
  (p0, s0), (p1, s1) = store
  b, m = np.asarray(batch.targets).shape
  assert p0.shape[0] == b and p0.shape[3] == m and p0.shape[-1] == s0 + m
  assert s1 > s0                                     # layer 1 routes: memory chunks added
  valid = np.asarray(batch.active_mask, bool)
  for probs, slots in store:
    sums = probs.sum(-1)                             # [B, Hkv, r, M]
    np.testing.assert_allclose(sums[np.broadcast_to(valid[:, None, None], sums.shape)], 1.0,
                               rtol=1e-5)
    own = probs[..., slots:]
    assert np.all(np.triu(np.ones((m, m), bool), 1)[None, None, None] <= (own == 0))  # causal
  kinds = lambda t: _kind(task.tokenizer, t)
  rows = la.head_table(store, batch, examples, kinds)
  heads = 2
  assert {(r["layer"], r["head"]) for r in rows} == {(l, h) for l in (0, 1) for h in range(heads)}
  for layer in (0, 1):
    assert sum(r["questions"] for r in rows if r["layer"] == layer and r["head"] == 0) == 4
  for r in rows:
    assert 0 <= r["gold"] <= 1 and 0 <= r["others"] <= 1 and 0 <= r["memory"] <= 1
    assert 0 < r["mode_share"] <= 1


def test_fact_values_finds_each_first_value_and_the_asked_fact():
  cfg = get_config("tiny")
  cfg.data.kv.fact_gaps, cfg.data.kv.restate_facts = 4, 0   # restated: test_reading_task
  task = from_config.make_task(cfg.data, 1, memory_tokens=200)
  tok = task.tokenizer
  kinds = lambda t: _kind(tok, t)
  ex = task(0)
  gold = next(d for d in ex.docs if d.doc_id in ex.positive_doc_ids)
  key = list(ex.question)
  firsts, fact = la.fact_values(gold.tokens, key, kinds)
  assert len(firsts) == 6 and all(kinds(gold.tokens[f]) == "value" for f in firsts)
  assert gold.tokens[firsts[fact] - 4:firsts[fact]] == key
  assert la.fact_values(gold.tokens, [tok.key_symbol(0)] * 4, kinds)[1] in (-1, fact)
