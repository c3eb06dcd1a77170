"""``launch.answer_positions``: the per-position NLL of answer targets adds up to the
training loss's per-row NLL, only answer rows count, and each position is named by its
alphabet with that alphabet's chance."""
import math

import jax
import numpy as np

from launch import answer_positions as ap
from msa_jax import losses
from msa_jax.data import from_config, interleave
from msa_jax.data.collate import collate, fit_bucket
from msa_jax.model import MSAModel, lm_head_weight_vd
from train_common import get_config, small_reading_model

from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()


def test_position_nll_adds_up_to_the_row_loss_of_answer_rows():
  cfg = get_config("tiny")
  task = from_config.make_task(cfg.data, 7, memory_tokens=80)
  sp = task.tokenizer.specials
  samples = [s for i in range(3) for s in interleave.expand(task(i), sp, False)]
  batch = collate(samples, fit_bucket(samples, len(samples)))
  model, params = small_reading_model(task.tokenizer.vocab_size, batch)
  model_cfg = model.config
  nll_bp, has_bp = ap.position_nll(model, params, batch, sp.end_of_retrieval)
  @jax.jit
  def row_nll(params, batch):
    out = model.apply({"params": params}, batch, method=MSAModel.forward_train)
    return losses.lm_nll_rows_chunked(out.hidden_bmd, lm_head_weight_vd(params, model_cfg),
                                      batch.targets, batch.loss_mask)[0]
  row_nll_b = row_nll(params, batch)
  answer_b = np.array([s.target[0] == sp.end_of_retrieval for s in samples])
  assert answer_b.sum() == 3 and (~answer_b).sum() == 3
  np.testing.assert_array_equal(has_bp.any(-1), answer_b)
  np.testing.assert_array_equal(has_bp[answer_b].sum(-1), [len(s.target) for s in samples
                                                           if s.target[0] == sp.end_of_retrieval])
  np.testing.assert_allclose((nll_bp * has_bp).sum(-1)[answer_b], np.asarray(row_nll_b)[answer_b],
                             rtol=2e-5)
  # An untrained model is near chance on every position (vocabulary-wide, not per alphabet).
  assert np.all(np.abs(nll_bp[has_bp] - math.log(model_cfg.vocab_size)) < 2.0)
  # retrieval=True: the other rows (the id targets), adding up to their row loss likewise.
  nll_r, has_r = ap.position_nll(model, params, batch, sp.end_of_retrieval, retrieval=True)
  np.testing.assert_array_equal(has_r.any(-1), ~answer_b)
  np.testing.assert_allclose((nll_r * has_r).sum(-1)[~answer_b], np.asarray(row_nll_b)[~answer_b],
                             rtol=2e-5)
  retrieval = [s for s in samples if s.target[0] != sp.end_of_retrieval]
  assert [ap._kind(task.tokenizer, t) for t in retrieval[0].target][:4] == ["id"] * 4


def test_position_kinds_and_chances():
  cfg = get_config("tiny")
  task = from_config.make_task(cfg.data, 0, memory_tokens=80)
  sp = task.tokenizer.specials
  answer = interleave.expand(task(0), sp, False)[-1]
  kinds = [ap._kind(task.tokenizer, t) for t in answer.target]
  # <end-of-retrieval>, the restated key (data.kv.answer_with_key), the value, <eos>
  assert kinds[1:7] == ["key"] * 4 + ["value"] * 2 and len(kinds) == 8
  assert ap._chance(task, "value") == math.log(64)
  assert ap._chance(task, "key") == math.log(128)
  assert ap._chance(task, kinds[0]) is None and ap._chance(task, kinds[-1]) is None


def test_position_stats_median_and_miss_share_see_past_one_outlier():
  # 31 examples read the id at 0.01 nats, one (a routing miss) at 17: the mean says
  # ~0.54 nats, the median and the miss share say the position is learnt.
  nll_bp = np.full((32, 2), 0.01)
  nll_bp[22] = 17.0
  has_bp = np.ones((32, 2), bool)
  has_bp[5:, 1] = False                      # position 1 only on the first 5 rows
  rows = ap.position_stats(nll_bp, has_bp)
  np.testing.assert_allclose(rows[0]["nll"], (31 * 0.01 + 17.0) / 32)
  assert rows[0]["median_nll"] == 0.01 and rows[0]["miss_share"] == 1 / 32
  assert rows[0]["samples"] == 32
  assert rows[1]["samples"] == 5 and rows[1]["miss_share"] == 0.0   # row 22 absent there
  np.testing.assert_allclose(rows[1]["nll"], 0.01)


def test_value_choice_tells_a_copy_of_any_value_from_the_lookup():
  cfg = get_config("tiny")
  task = from_config.make_task(cfg.data, 0, memory_tokens=80)
  tok = task.tokenizer
  ex = task(0)
  gold = next(d for d in ex.docs if d.doc_id in ex.positive_doc_ids)
  answer = interleave.expand(ex, tok.specials, False)[-1]
  kinds = lambda t: ap._kind(tok, t)
  target = list(answer.target)
  v_at = [i for i, t in enumerate(target) if kinds(t) == "value"][0]
  key, right = [t for t in target[:v_at] if kinds(t) == "key"], target[v_at]
  doc = list(gold.tokens)
  firsts = [doc[j] for j in range(1, len(doc)) if kinds(doc[j]) == "value"
            and kinds(doc[j - 1]) == "key"]
  fact = next(i for i, j in enumerate(j for j in range(1, len(doc)) if kinds(doc[j]) == "value"
                                      and kinds(doc[j - 1]) == "key")
              if doc[j - len(key):j] == key)
  assert len(set(firsts)) >= 2 and firsts[fact] == right
  wrong = next(v for v in firsts if v != right)
  # 90 % spread evenly over the document's values, the top-1 on a wrong one of them.
  p = np.full(tok.vocab_size, 0.1 / (tok.vocab_size - len(set(firsts))))
  p[sorted(set(firsts))] = 0.9 / len(set(firsts))
  p[wrong] += 1e-3
  p /= p.sum()
  c = ap.value_choice(np.log(p), right, doc, key, kinds)
  assert c["fact"] == fact and not c["right"] and c["in_document"]
  np.testing.assert_allclose(c["mass_on_document"], (0.9 + 1e-3) / (1 + 1e-3), rtol=1e-6)
  # The lookup learnt: the top-1 on the key's own value.
  p2 = np.full(tok.vocab_size, 1e-4)
  p2[right] = 1.0
  c2 = ap.value_choice(np.log(p2 / p2.sum()), right, doc, key, kinds)
  assert c2["right"] and c2["in_document"] and c2["fact"] == fact


def test_ablations_remove_one_copy_of_the_gold_document():
  cfg = get_config("tiny")
  task = from_config.make_task(cfg.data, 3, memory_tokens=200)
  sp = task.tokenizer.specials
  example = task(0)
  answer = interleave.expand(example, sp, False)[-1]
  gold = next(d for d in example.docs if d.doc_id in example.positive_doc_ids)
  assert answer.question == list(example.question) + gold.tokens
  assert ap.ablate_answer_round(answer, example, "none") is answer
  cut = ap.ablate_answer_round(answer, example, "no_injection")
  assert cut.question == list(example.question) and cut.docs == answer.docs
  assert cut.target == answer.target
  gone = ap.ablate_answer_round(answer, example, "no_gold_memory")
  assert [d.doc_id for d in gone.docs] == [d.doc_id for d in answer.docs if d is not gold]
  assert len(gone.docs) == len(answer.docs) - 1 and gone.question == answer.question
  import pytest
  with pytest.raises(ValueError, match="choose one of"):
    ap.ablate_answer_round(answer, example, "both")


def test_global_position_span_spreads_the_documents_as_in_training():
  """A run trained with ``data.global_position_span`` is probed with its documents spread
  over that many positions (the training pipeline's gaps), not packed at the start."""
  cfg = get_config("tiny")
  task = from_config.make_task(cfg.data, 3, memory_tokens=80)
  sp = task.tokenizer.specials
  samples = [interleave.expand(task(i), sp, False)[-1] for i in range(4)]
  seen = []

  def log_probs(params, batch):
    seen.append(batch.doc_position_gaps)
    b, length = batch.active_tokens.shape
    return np.zeros((b, length, task.tokenizer.vocab_size), np.float32)

  ap._round_tables(None, task, samples, log_probs, 2, False, global_position_span=0)
  assert all(g is None for g in seen)
  seen.clear()
  ap._round_tables(None, task, samples, log_probs, 2, False, global_position_span=4096, seed=5)
  assert len(seen) == 2
  for start, gaps in zip((0, 2), seen):
    batch = collate(samples[start:start + 2], fit_bucket(samples, 2))
    doc_tokens_b = np.asarray(batch.doc_mask).reshape(2, -1).sum(-1)
    # Gaps and document tokens fill the span exactly: the question starts at position 4096.
    np.testing.assert_array_equal(np.asarray(gaps).sum(-1) + doc_tokens_b, [4096, 4096])
