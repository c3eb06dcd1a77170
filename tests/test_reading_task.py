"""The ``tiny`` recipe's reading task (issue 14 item 1) and the pieces of its GPU
reproduction: documents of 6 facts whose question key sits inside exactly one document,
ids and keys for a 100M-token shared corpus, multi-hop and NIAH on the same recipe,
generated banks equal to banks encoded from the corpus file, and the memory-cost
benchmark's full-attention sequence."""
import json
import os

import numpy as np
import pytest

from msa_jax.data import from_config, interleave, write_task
from msa_jax.inference.bank import open_bank
from train_common import get_config

from tests import reference_numpy as R
from tests.test_reference_forward import tiny_config


@pytest.fixture(scope="module")
def tiny():
  return get_config("tiny")


def bare_tiny():
  """The tiny recipe without its drill's restated facts (``data.kv.restate_facts``):
  40-token documents, the id then 6 facts, for the layout checks of other options."""
  cfg = get_config("tiny")
  cfg.data.kv.restate_facts = 0
  return cfg


def test_reading_documents_need_the_key_found_inside(tiny):
  """315 documents of 52 tokens (6 facts after a 4-token id, then 2 of them again:
  ``data.kv.restate_facts``, the recipe's drill) fill the 16K memory; the question key
  occurs in exactly one document, among its 6 facts, and the answer restates that key and
  then the value after it there (``data.kv.answer_with_key``, the recipe's default)."""
  task = from_config.make_task(tiny.data, 0)
  tok = task.tokenizer
  assert tok.vocab_size <= tiny.model.vocab_size
  assert tiny.data.kv.restate_facts == 2 and tiny.loss.doc_lm_weight == 0.1
  for i in range(4):
    ex = task(i)
    assert len(ex.docs) == 315 == tiny.data.memory_tokens // 52
    assert {len(d.tokens) for d in ex.docs} == {52}
    key = ex.question
    holders = []
    for d in ex.docs:
      facts = [d.tokens[4 + 6 * f:4 + 6 * (f + 1)] for f in range(6)]
      assert len(facts) == 6 and all(len(f) == 6 for f in facts)
      assert d.tokens[40:46] in facts and d.tokens[46:52] in facts
      holders += [(d.doc_id, f[4:]) for f in facts if f[:4] == key]
    assert holders == [(ex.positive_doc_ids[0], ex.answer[4:])]
    assert len(key) == 4 and ex.answer[:4] == key and len(ex.answer) == 6


def test_answer_with_key_restates_the_question_key(tiny):
  """``data.kv.answer_with_key``: the answer is the question's key then its value (EM needs
  both); the same example otherwise (documents, question, gold), and the answer round's
  target is ``<end-of-retrieval> key value <eos>``. Multi-hop restates the last hop's key
  (the one whose fact holds the value)."""
  cfg = get_config("tiny")
  assert cfg.data.kv.answer_with_key   # the recipe's default
  keyed = from_config.make_task(cfg.data, 0, memory_tokens=320)
  cfg.data.kv.answer_with_key = False
  plain = from_config.make_task(cfg.data, 0, memory_tokens=320)
  cfg.data.kv.answer_with_key = True
  sp = keyed.tokenizer.specials
  for i in range(3):
    a, b = plain(i), keyed(i)
    assert [d.tokens for d in a.docs] == [d.tokens for d in b.docs]
    assert a.question == b.question and a.positive_doc_ids == b.positive_doc_ids
    assert b.answer == list(b.question) + list(a.answer)
    gold = next(d for d in b.docs if d.doc_id == b.positive_doc_ids[0])
    facts = [gold.tokens[4 + 6 * f:4 + 6 * (f + 1)] for f in range(6)]
    assert b.answer in [list(f) for f in facts]
    answer_sample = interleave.expand(b, sp, answer_positives=False)[-1]
    assert answer_sample.target == [sp.end_of_retrieval] + b.answer + [sp.eos]
  cfg.data.task = "multihop"
  hop = from_config.make_task(cfg.data, 0, memory_tokens=320)(0)
  last = next(d for d in hop.docs if d.doc_id == hop.rounds[-1][0])
  assert hop.answer[:4] != list(hop.question)
  assert any(last.tokens[j:j + 6] == hop.answer for j in range(len(last.tokens) - 5))


def test_answer_samples_without_routing_positives(tiny):
  """``data.answer_positives=False`` (the tiny recipe): the retrieval sample keeps the gold
  document as its positive, the answer sample has none; both share one active bucket."""
  task = from_config.make_task(tiny.data, 0)
  ex = task(0)
  ident, answer = interleave.expand(ex, task.tokenizer.specials, answer_positives=False)
  assert ident.positive_doc_ids == ex.positive_doc_ids and answer.positive_doc_ids == []
  assert [s.positive_doc_ids for s in interleave.expand(ex, task.tokenizer.specials)] == \
      [ex.positive_doc_ids] * 2
  cfg = get_config("tiny")
  cfg.data.num_docs = 6
  it = from_config.make_train_iterator(cfg.data, seed=0, batch_size=8,
                                       chunk_size=cfg.model.pooling_chunk_size, verbose=False)
  for _ in range(3):
    batch = next(it)
    has_pos = np.asarray(batch.positive_docs).any(axis=1)
    answers = np.asarray(batch.targets == task.tokenizer.specials.eos).any(axis=1)
    assert np.array_equal(has_pos, ~answers & np.asarray(batch.active_mask).any(axis=1))
    assert has_pos.any() and answers.any()   # one bucket: both kinds in every batch


def test_shared_corpus_addresses_100m_tokens(tiny):
  """6104 × the training memory (100M tokens) fits the unique ids and keys."""
  corpus = write_task.SharedCorpus(write_task.kv_config_of(tiny), 0)
  docs = 6104 * 315
  assert docs * corpus.config.doc_length >= 99_800_000
  assert corpus.id_space == 128 ** 4 >= 2_000_000 and corpus.capacity >= docs
  assert corpus.key_space >= 6 * docs
  corpus.check_size(docs)
  # ids and keys unique over a block at the far end of that corpus
  ids, keys, _ = corpus.symbols(docs - 2_000, docs)
  assert len({tuple(r) for r in ids.tolist()}) == 2_000
  assert len({tuple(k) for r in keys.tolist() for k in r}) == 2_000 * 6


@pytest.mark.parametrize("bracket_ids,slot,positional,gaps,again", [
    (False, 0, False, 0, 0), (True, 0, False, 0, 0), (False, 8, False, 0, 0),
    (True, 8, False, 0, 0), (False, 0, True, 0, 0), (False, 0, True, 6, 0),
    (False, 0, True, 0, 2), (True, 8, False, 0, 3), (False, 0, True, 6, 2)])
def test_records_equal_documents(tiny, bracket_ids, slot, positional, gaps, again):
  """The numpy fast path of the shared corpus gives the tokens, ids and id lengths of the
  per-document path, with facts packed, padded to slots or spread by gaps, ids positional
  or not, facts restated or not."""
  cfg = get_config("tiny")
  cfg.data.kv.bracket_ids = bracket_ids
  cfg.data.kv.fact_slot_len = slot
  cfg.data.kv.positional_ids = positional
  cfg.data.kv.fact_gaps = gaps
  cfg.data.kv.restate_facts = again
  corpus = write_task.SharedCorpus(write_task.kv_config_of(cfg), 5)
  for start, stop in ((0, 50), (4_090, 4_100)):   # across a value block
    fast, slow = corpus.records(start, stop), corpus.documents(start, stop)
    assert [d.doc_id for d in fast] == [d.doc_id for d in slow]
    assert {len(d.tokens) for d in slow} == {corpus.config.doc_length}
    assert [list(d.tokens) for d in fast] == [d.tokens for d in slow]
    assert [d.id_length for d in fast] == [d.id_length for d in slow] == \
        [6 if bracket_ids else 4] * (stop - start)
  if gaps:   # the pads are spread per document, the same for a document in any range
    pad = corpus.tokenizer.encode("-")[0]
    docs = corpus.documents(0, 50)
    assert all(d.tokens.count(pad) == gaps for d in docs)
    assert len({tuple(t == pad for t in d.tokens) for d in docs}) > 25
    assert corpus.documents(10, 12)[1].tokens == docs[11].tokens
    packed = get_config("tiny")
    packed.data.kv.positional_ids, packed.data.kv.restate_facts = True, again
    plain = write_task.SharedCorpus(write_task.kv_config_of(packed), 5).documents(0, 50)
    assert [[t for t in d.tokens if t != pad] for d in docs] == [d.tokens for d in plain]


@pytest.mark.parametrize("task", ["multihop", "niah"])
def test_multihop_and_niah_on_the_tiny_recipe(tiny, task):
  """The other data options of the recipe build batches within the model's vocabulary."""
  cfg = get_config("tiny")
  cfg.data.task = task
  cfg.data.num_docs = 6
  assert from_config.vocab_size_of(cfg.data) <= cfg.model.vocab_size
  source = from_config.make_task(cfg.data, 0)
  ex = source(0)
  if task == "multihop":
    assert len(ex.rounds) == 2
  else:
    assert {len(d.tokens) for d in ex.docs} == {40}   # [ 4-token id ] + 34
  it = from_config.make_train_iterator(cfg.data, seed=0, batch_size=4,
                                       chunk_size=cfg.model.pooling_chunk_size, verbose=False)
  batch = next(it)
  assert int(np.max(batch.doc_tokens)) < cfg.model.vocab_size
  assert batch.doc_tokens.shape[2] % cfg.model.pooling_chunk_size == 0


@pytest.mark.parametrize("slot", [0, 8])
def test_generated_bank_equals_the_corpus_file_bank(slot, tmp_path):
  """``encode_documents`` (no JSON) writes the same bank arrays as ``encode_corpus`` over
  the written corpus file, with facts packed or padded to chunk slots; a resume with
  another source is refused."""
  tiny = get_config("tiny")
  tiny.data.kv.fact_slot_len = slot
  from msa_jax.data.collate import BucketShapes, collate
  from msa_jax.data.example import Document, Example
  from msa_jax.inference.encode import CorpusError, encode_corpus, encode_documents
  corpus = write_task.SharedCorpus(write_task.kv_config_of(tiny), 0)
  cfg = tiny_config(vocab_size=1024, pooling_chunk_size=8)
  docs = corpus.documents(0, 3)
  ex = Example(prefix=[1], docs=[Document(d.doc_id, d.tokens) for d in docs], question=[3],
               target=[4], positive_doc_ids=[])
  doc_len = corpus.config.doc_length   # 52 (6 facts, 2 restated), or 72 with slots
  model, variables = R.init_model(cfg, collate([ex], BucketShapes(1, 1, 3, doc_len, 2)), 2)
  params = variables["params"]
  path = tmp_path / "corpus.jsonl"
  write_task.write_jsonl(write_task.corpus_rows(tiny, 70, 0), str(path), 70, "corpus")
  quiet = dict(tokenizer=corpus.tokenizer, prefix_tokens=[1], log=lambda *_: None)
  a = encode_corpus(model, params, str(path), str(tmp_path / "a"), window_tokens=500, **quiet)
  # generated: stopped after one window, refused for another source, resumed to the end
  b = str(tmp_path / "b")
  part = encode_documents(model, params, corpus.records, 70, b, source="s", window_tokens=500,
                          batch_tokens=16_384, max_windows=1, **quiet)   # a's batches
  assert not part["complete"] and 0 < part["num_docs"] < 70
  assert slot or part["num_docs"] == 500 // doc_len + 1   # the window's last document whole
  with pytest.raises(CorpusError, match="changed since the bank"):
    encode_documents(model, params, corpus.records, 70, b, source="other", **quiet)
  done = encode_documents(model, params, corpus.records, 70, b, source="s", window_tokens=500,
                          batch_tokens=16_384, **quiet)
  assert a["complete"] and done["complete"]
  assert a["num_tokens"] == done["num_tokens"] == 70 * doc_len
  for name in a["arrays"]:
    fa, fb = (open(os.path.join(tmp_path, x, name), "rb").read() for x in "ab")
    assert fa == fb, name
  ids = [json.loads(line)["id"] for line in open(tmp_path / "b" / "docs.jsonl")]
  assert ids == [d.doc_id for d in corpus.documents(0, 70)]
  bank = open_bank(str(tmp_path / "b"))     # what Memory Interleave injects per document
  for j, d in enumerate(corpus.documents(0, 5)):
    assert bank.doc_tokens(j) == d.tokens
    assert bank.doc_id_tokens(j) == d.tokens[:4] == list(d.id_tokens)


def test_encode_time_prediction_uses_the_marginal_rate():
  from launch.reproduce_reading import predict_encode_seconds
  # 10 s to compile, then 1M tokens/s: sizes 16K and 262K took 10.016 and 10.262 s
  done = [(16_384, 10.016384), (262_144, 10.262144)]
  assert predict_encode_seconds(done, 100_000_000) == pytest.approx(110.0, rel=1e-3)


def test_relative_degradation():
  from launch.reproduce_reading import relative_degradation
  rows = [{"multiplier": 1, "answer_exact_match": 0.8}, {"multiplier": 16, "skipped": "t"},
          {"multiplier": 256, "answer_exact_match": 0.6}]
  relative_degradation(rows, "answer_exact_match")
  assert rows[0]["answer_exact_match_rel_degradation"] == 0.0
  assert rows[2]["answer_exact_match_rel_degradation"] == pytest.approx(0.25)
  assert "answer_exact_match_rel_degradation" not in rows[1]


def test_memory_cost_full_attention_sees_the_same_tokens(tiny):
  """The full-attention baseline's sequence is the MSA sample's prefix, every document in
  memory order, the question and the target: the same tokens the MSA step processes."""
  from benchmarks.memory_cost import concatenated, msa_sample
  from msa_jax import trainer
  cfg = get_config("tiny")
  cfg.data.memory_tokens = 400   # 10 documents
  model_cfg = trainer.resolve_model_config(cfg)
  batch = msa_sample(cfg, model_cfg, 400)
  seq = concatenated(batch)
  task = from_config.make_task(cfg.data, cfg.seed, 400)
  ex = task(0)
  answer_round = max(interleave.expand(ex, task.tokenizer.specials),
                     key=lambda e: e.active_length)
  expected = list(ex.prefix) + [t for d in ex.docs for t in d.tokens] + \
      list(answer_round.question) + list(answer_round.target)
  assert seq.shape == (1, trainer.count_tokens(batch)) and seq[0].tolist() == expected


@pytest.mark.slow
def test_memory_cost_runs_on_cpu(tmp_path):
  """Both methods at two toy lengths: rows with step times and the ratio (~40-80 s)."""
  from benchmarks import memory_cost
  res = memory_cost.main(["--tokens=256,512", "--steps=1", "--budget_s=300", "--out",
                          str(tmp_path), "--model=hidden_size=32,intermediate_size=64,"
                          "num_layers=2,head_dim=8"])
  fit = [r for r in res["rows"] if r.get("fits")]
  assert {(r["method"], r["memory_tokens"]) for r in fit} == {
      (m, t) for m in ("msa", "full") for t in (256, 512)}
  for r in fit:
    assert r["step_s"] > 0 and r["tokens"] > r["memory_tokens"]
  assert "full_step_ratio_longest_to_shortest" in res
  assert os.path.exists(tmp_path / "memory_cost_cpu.png")


@pytest.mark.slow
def test_reproduce_reading_end_to_end_on_cpu(tmp_path):
  """The GPU command's Python part on the smoke recipe: a 4-step training under its time
  limit, banks at 1× and 4× through the engine, a size skipped for time (~1.5 min)."""
  from launch import reproduce_reading
  out = tmp_path / "out"
  reproduce_reading.main([
      "--config=configs/16k_to_100m.py:smoke", f"--out={out}", f"--root={tmp_path / 'root'}",
      "--budget_s=600", "--train_s=400", "--multipliers=1,4,2000000", "--num_questions=8",
      "--batch_size=8", "--train_args=--config.num_steps=4 --config.log_every_steps=2 "
      "--config.checkpoint.every_steps=4 --config.batch_size=8 "
      "--config.optim.warmup_phase_steps=2 --config.optim.lr_ramp_steps=1"])
  result = json.load(open(out / "reading.json"))
  run = result["runs"]["document"]
  assert run["train"]["returncode"] == 0 and run["train"]["final"]["step"] == 4
  rows = run["eval"]
  assert [r["multiplier"] for r in rows] == [1, 4, 2_000_000]
  assert [r["num_docs"] for r in rows[:2]] == [32, 128]
  for r in rows[:2]:
    assert 0 <= r["answer_exact_match"] <= 1 and "router_recall@1" in r
    assert r["memory_tokens"] == r["num_docs"] * 8
  assert "skipped" in rows[2]    # 64M documents exceed the task's unique ids
  assert os.path.exists(out / "reading.png") and os.path.exists(out / "router_health_document.png")


@pytest.mark.slow
def test_training_and_evaluation_in_two_calls(tmp_path):
  """``--train_only`` then ``--reuse_training`` (the recipe's two GPU calls): the second
  run does not train again, evaluates the first one's checkpoint and keeps its curve;
  evaluating again in the same root works; training again resumes the run; a run of the
  other RoPE mode is refused (~2 min)."""
  from launch import reproduce_reading
  out, root = tmp_path / "out", tmp_path / "root"
  common = ["--config=configs/16k_to_100m.py:smoke", f"--root={root}", "--budget_s=600",
            "--num_questions=8", "--batch_size=8"]
  reproduce_reading.main(common + [
      f"--out={out}/train", "--train_only", "--train_s=400", "--train_args=--config.num_steps=4 "
      "--config.log_every_steps=2 --config.checkpoint.every_steps=4 --config.batch_size=8 "
      "--config.optim.warmup_phase_steps=2 --config.optim.lr_ramp_steps=1"])
  trained = json.load(open(out / "train" / "reading.json"))["runs"]["document"]
  assert trained["train"]["final"]["step"] == 4 and "eval" not in trained
  reproduce_reading.main(common + [f"--out={out}/eval", "--reuse_training", "--multipliers=1"])
  run = json.load(open(out / "eval" / "reading.json"))["runs"]["document"]
  assert run["train"]["reused"] == str(root / "train_document") and "command" not in run["train"]
  assert run["train"]["curve"] == trained["train"]["curve"]
  assert [r["multiplier"] for r in run["eval"]] == [1] and "answer_exact_match" in run["eval"][0]
  # A second evaluation in the same root rewrites its questions file (session 15's second
  # call on a warm machine failed on the file the first had left) and scores the same.
  reproduce_reading.main(common + [f"--out={out}/eval2", "--reuse_training", "--multipliers=1"])
  again = json.load(open(out / "eval2" / "reading.json"))["runs"]["document"]["eval"]
  assert again[0]["answer_exact_match"] == run["eval"][0]["answer_exact_match"]
  # Training again in the same root resumes the run (reproduce_reading.sh RESUME_FROM):
  # the trainer continues from step 4 to the longer schedule's end, the curve keeps step 2.
  reproduce_reading.main(common + [
      f"--out={out}/resume", "--train_only", "--train_s=400", "--train_args=--config.num_steps=6 "
      "--config.log_every_steps=2 --config.checkpoint.every_steps=4 --config.batch_size=8 "
      "--config.optim.warmup_phase_steps=2 --config.optim.lr_ramp_steps=1"])
  resumed = json.load(open(out / "resume" / "reading.json"))["runs"]["document"]["train"]
  assert [r["step"] for r in resumed["curve"]] == [2, 4, 6]
  assert resumed["curve"][:2] == trained["train"]["curve"]
  os.rename(root / "train_document", root / "train_global")
  with pytest.raises(SystemExit, match="trained with rope_mode='document', not 'global'"):
    reproduce_reading.main(common + [f"--out={out}/g", "--reuse_training", "--rope=global"])


def test_fact_slots_must_tile_the_chunks():
  """A fact slot that does not tile the model's chunks is refused before training."""
  cfg = get_config("tiny")
  cfg.data.kv.fact_slot_len = 12
  with pytest.raises(ValueError, match="fact_slot_len=12 does not tile"):
    from_config.validate_data_config(cfg)
  for ok in (0, 8, 16):
    cfg.data.kv.fact_slot_len = ok
    from_config.validate_data_config(cfg)


def _one_then_six_facts(cfg, switch: int):
  """The training stream of ``cfg`` (tiny) at 6 documents a memory and batch 4: 1-fact
  documents until batch ``switch``, then the configured 6."""
  cfg.data.num_docs = 6
  cfg.data.facts_curriculum = ((0, 1), (switch, 6))
  cfg.data.batch_curriculum = ()
  return from_config.make_train_iterator(cfg.data, seed=0, batch_size=4,
                                         chunk_size=cfg.model.pooling_chunk_size, verbose=False)


def test_facts_curriculum_trains_fewer_facts_first():
  """``data.facts_curriculum`` (the tiny recipe's graded facts): batches of a stage hold
  documents of its facts, as many a memory as the 6-fact task's; from the last stage on,
  the configured 6-fact documents; evaluation always asks the configured task."""
  cfg = get_config("tiny")
  assert [f for _, f in cfg.data.facts_curriculum] == [1, 2, 4, 6]
  stages = from_config.training_stages(cfg.data, cfg.batch_size)
  # The recipe: 1, 2, 4, then 6 facts from steps 0, 500, 1,500, 3,000, a reader stage of
  # 8-document memories at batch 128 until step 5,800, then the 16K-token training
  # memory (None) at batch 16.
  assert stages == [(0, 416, 1, 128), (500, 416, 2, 128), (1500, 416, 4, 128),
                    (3000, 416, 6, 128), (5800, None, 6, 16)]
  cfg.data.kv.restate_facts = 0   # the layout below without the drill's restated facts
  first = from_config.make_source(cfg.data, 0, facts_per_doc=1)(0)
  assert len(first.docs) == 409 and {len(d.tokens) for d in first.docs} == {10}
  gold = [d for d in first.docs if d.doc_id == first.positive_doc_ids[0]][0]
  # id, key, value; the answer restates the key (data.kv.answer_with_key)
  assert gold.tokens[4:] == first.question + first.answer[4:] and first.answer[:4] == first.question
  assert {len(d.tokens) for d in from_config.eval_task(cfg.data, 0, 1)(0).docs} == {40}

  it = _one_then_six_facts(cfg, switch=2)
  doc_lens = []
  for _ in range(4):
    doc_mask = np.asarray(next(it).doc_mask)
    assert doc_mask.shape[1] == 6
    doc_lens.append(set(doc_mask.sum(-1).ravel().tolist()))
  assert doc_lens == [{10}, {10}, {40}, {40}]


def test_each_curriculum_stage_draws_fresh_examples():
  """Every stage's stream starts at example 0, and example n of one seed asks the same key
  with the same gold id and answer at any facts per document: a stage must not reuse the
  seed of another, or it replays the same pairs.
  Stage 0 keeps the run's seed."""
  cfg = get_config("tiny")
  one, six = (from_config.make_source(cfg.data, 0, 320, f)(0) for f in (1, 6))
  assert one.question == six.question and one.answer == six.answer   # why seeds must differ
  assert from_config.stage_seed(5, 0) == 5
  seeds = {from_config.stage_seed(5, k) for k in range(6)}
  assert len(seeds) == 6 and 5 + from_config.EVAL_SEED_OFFSET not in seeds

  it = _one_then_six_facts(cfg, switch=3)
  questions = []
  for _ in range(6):
    batch = next(it)
    q_mask = np.asarray(batch.question_mask) & np.asarray(batch.active_mask)
    questions.append({tuple(np.asarray(batch.active_tokens)[r][q_mask[r]].tolist())
                      for r in range(q_mask.shape[0]) if q_mask[r].any()})
  first_stage, second_stage = set().union(*questions[:3]), set().union(*questions[3:])
  assert first_stage and second_stage and not first_stage & second_stage


@pytest.mark.parametrize("pairs, match", [
    (((0, 1), (300, 4)), "the last must be data.kv.facts_per_doc=6"),
    (((10, 1), (300, 6)), "must start at 0"),
    (((0, 1), (300, 2), (300, 6)), "must start at 0 and increase"),
    (((0, 0), (300, 6)), "facts must be >= 1"),
    (((0, 1, 2),), "must hold \\(batch, facts\\) pairs")])
def test_facts_curriculum_is_checked_before_training(pairs, match):
  cfg = get_config("tiny")
  cfg.data.facts_curriculum = pairs
  with pytest.raises(ValueError, match=match):
    from_config.validate_data_config(cfg)


def test_batch_curriculum_serves_each_stage_its_batch_size():
  """``data.batch_curriculum``: batches before the switch have the stage's size, with the
  stage's memory (small memories and a large batch first); then ``batch_size``."""
  cfg = get_config("tiny")
  cfg.data.num_docs = 0
  cfg.data.memory_tokens = 520                         # 10 documents of 52 tokens
  cfg.data.memory_curriculum = ((0, 104), (3, 520))    # 2 documents first
  cfg.data.facts_curriculum = ()
  cfg.data.batch_curriculum = ((0, 8), (2, None))      # None: batch_size
  assert from_config.training_stages(cfg.data, 4) == [(0, 104, None, 8), (2, 104, None, 4),
                                                      (3, 520, None, 4)]
  it = from_config.make_train_iterator(cfg.data, seed=0, batch_size=4,
                                       chunk_size=cfg.model.pooling_chunk_size, verbose=False)
  shapes = [np.asarray(next(it).doc_mask).shape[:2] for _ in range(4)]
  assert shapes == [(8, 2), (8, 2), (4, 2), (4, 10)]


@pytest.mark.parametrize("pairs, message", [
    (((1, 8), (5, 4)), "must start at 0"),
    (((0, 8), (0, 4)), "must start at 0 and increase"),
    (((0, 8), (5, 16)), "the last must be None or batch_size=4"),
    (((0, 0), (5, 4)), "sizes must be >= 1"),
    (((0, 8, 1),), "must hold .batch, batch size. pairs"),
])
def test_bad_batch_curriculum_is_refused_naming_the_fix(pairs, message):
  from msa_jax.trainer import validate_config
  cfg = get_config("tiny")
  cfg.batch_size = 4
  cfg.data.batch_curriculum = pairs
  with pytest.raises(ValueError, match=message) as err:
    validate_config(cfg)
  assert "data.batch_curriculum" in str(err.value)


def test_batch_curriculum_sizes_must_split_over_the_mesh(tmp_path):
  from msa_jax.trainer import train_and_evaluate
  cfg = get_config("smoke")
  cfg.batch_size, cfg.mesh_shape = 8, (8, 1, 1)
  cfg.data.batch_curriculum = ((0, 12), (2, 8))
  with pytest.raises(ValueError, match=r"data.batch_curriculum \(from batch 0\) 12 must be a "
                                       r"multiple of 8"):
    train_and_evaluate(cfg, str(tmp_path / "run"))


def test_positional_ids_use_one_alphabet_per_position(tiny):
  """With ``positional_ids`` id position j draws only from id words j·n .. j·n+n-1 (train
  task and shared corpus alike), and ids stay unique."""
  cfg = get_config("tiny")
  cfg.data.kv.positional_ids = True
  n, length = cfg.data.kv.num_id_symbols, cfg.data.kv.id_len
  task = from_config.make_task(cfg.data, 0)
  tok = task.tokenizer
  corpus = write_task.SharedCorpus(write_task.kv_config_of(cfg), 0)
  docs = [d for i in range(3) for d in task(i).docs] + corpus.documents(0, 500)
  ids = [d.tokens[:d.id_length] for d in docs]
  assert len({tuple(i) for i in ids[-500:]}) == 500
  for i in ids:
    words = [int(t) - tok.id_symbol(0) for t in i]
    assert [w // n for w in words] == list(range(length)), words


def test_merge_results_joins_the_sizes_of_one_run(tmp_path):
  """The 6104× size evaluated in a call of its own joins the other sizes' rows; the
  degradation is recomputed against 1×; another run's rows are refused."""
  from launch import reproduce_reading

  def result(step, rows):
    return {"argv": ["x"], "runs": {"document": {
        "train": {"final": {"step": step}}, "eval": [
            {"multiplier": m, "memory_tokens": 16_000 * m, "answer_exact_match": em,
             "router_recall@1": r1} for m, em, r1 in rows]}}}

  first = result(5700, [(1, 0.8, 1.0), (16, 0.6, 0.5)])
  second = result(5700, [(6104, 0.4, 0.25)])
  for i, res in enumerate((first, second)):
    with open(tmp_path / f"r{i}.json", "w") as f:
      json.dump(res, f)
  reproduce_reading.main([f"--out={tmp_path}/m",
                          f"--merge={tmp_path}/r0.json,{tmp_path}/r1.json"])
  rows = json.load(open(tmp_path / "m" / "reading.json"))["runs"]["document"]["eval"]
  assert [r["multiplier"] for r in rows] == [1, 16, 6104]
  assert rows[2]["answer_exact_match_rel_degradation"] == pytest.approx(0.5)
  assert rows[2]["router_recall@1_rel_degradation"] == pytest.approx(0.75)
  assert os.path.exists(tmp_path / "m" / "reading.png")
  with pytest.raises(SystemExit, match="ends at step 5700, another's at 300"):
    reproduce_reading.merge_results([first, result(300, [(1, 0.1, 0.1)])])


def test_fact_gaps_move_facts_and_keep_the_length(tiny):
  """``data.kv.fact_gaps``: the same keys, values and ids as without gaps, each document
  ``fact_gaps`` tokens longer, its facts at offsets that vary between documents; the
  default (0) draws nothing, so packed documents are unchanged."""
  cfg = bare_tiny()
  cfg.data.kv.fact_gaps = 6
  gapped = from_config.make_task(cfg.data, 0, memory_tokens=460)
  packed = from_config.make_task(bare_tiny().data, 0, memory_tokens=400)
  tok = gapped.tokenizer
  pad = tok.encode("-")[0]
  assert gapped.config.doc_length == 46 and len(gapped(0).docs) == 10 == len(packed(0).docs)
  offsets = set()
  for i in range(3):
    g, p = gapped(i), packed(i)
    assert g.question == p.question and g.target == p.target and g.rounds == p.rounds
    for dg, dp in zip(g.docs, p.docs):
      assert len(dg.tokens) == 46 and dg.tokens.count(pad) == 6 and pad not in dp.tokens
      assert dg.doc_id == dp.doc_id
      assert [t for t in dg.tokens if t != pad] == dp.tokens   # same id, facts, order
      starts, j = [], 4
      text = dg.tokens
      for f in range(6):
        while text[j] == pad:
          j += 1
        starts.append(j)
        j += 6
      offsets.add(tuple(starts))
  assert len(offsets) > 20          # 30 documents, offsets drawn per document
  assert gapped(1).docs[0].tokens == from_config.make_task(cfg.data, 0, memory_tokens=460)(1).docs[0].tokens
  cfg.data.kv.fact_slot_len = 8
  with pytest.raises(ValueError, match="set one of them to 0"):
    from_config.make_task(cfg.data, 0)
  cfg.data.kv.fact_slot_len, cfg.data.kv.fact_gaps = 0, -1
  with pytest.raises(ValueError, match="fact_gaps=-1 must be >= 0"):
    from_config.make_task(cfg.data, 0)


def test_restate_facts_repeats_the_documents_own_facts(tiny):
  """``data.kv.restate_facts``: R of a document's own facts stated again, in a random
  order, after its last fact; everything before is the unrestated document; the default
  (0) draws nothing; the shared corpus writes the same layout; fact_values counts a
  restated fact at its first statement."""
  import dataclasses
  from launch.answer_positions import _kind, fact_values
  cfg = get_config("tiny")
  assert cfg.data.kv.restate_facts == 2   # the recipe's drill
  bare = bare_tiny()
  again = from_config.make_task(cfg.data, 0, memory_tokens=520)
  plain = from_config.make_task(bare.data, 0, memory_tokens=400)
  assert again.config.doc_length == 52 and len(again(0).docs) == 10 == len(plain(0).docs)
  orders = set()
  for i in range(3):
    a, p = again(i), plain(i)
    assert a.question == p.question and a.target == p.target
    for da, dp in zip(a.docs, p.docs):
      assert da.tokens[:40] == dp.tokens and da.doc_id == dp.doc_id
      facts = [tuple(dp.tokens[4 + 6 * f:10 + 6 * f]) for f in range(6)]
      tail = [tuple(da.tokens[40:46]), tuple(da.tokens[46:52])]
      assert tail[0] != tail[1] and all(t in facts for t in tail)
      orders.add(tuple(facts.index(t) for t in tail))
  assert len(orders) > 10           # 30 documents, the restated facts drawn per document
  doc = again(0).docs[0].tokens
  restated_key = doc[40:44]   # the first restated fact's key, also stated above
  firsts, fact = fact_values(doc, restated_key, lambda t: _kind(again.tokenizer, t))
  assert len(firsts) == 8 and firsts[:6] == [8 + 6 * f for f in range(6)]
  assert doc[4 + 6 * fact:8 + 6 * fact] == restated_key and fact < 6
  one = dataclasses.replace(again.config, facts_per_doc=1)
  assert one.doc_length == 4 + 2 * 6   # at most the document's own facts, once each
  # The shared corpus: the same layout (its documents' own facts after the last one,
  # drawn per document and the same in any range), and its questions unchanged.
  corpus = write_task.SharedCorpus(write_task.kv_config_of(cfg), 3)
  docs = corpus.documents(0, 40)
  assert {len(d.tokens) for d in docs} == {52}
  tails = set()
  for d, p in zip(docs, write_task.SharedCorpus(write_task.kv_config_of(bare), 3).documents(0, 40)):
    assert d.tokens[:40] == p.tokens
    facts = [tuple(p.tokens[4 + 6 * f:10 + 6 * f]) for f in range(6)]
    tail = [tuple(d.tokens[40:46]), tuple(d.tokens[46:52])]
    assert tail[0] != tail[1] and all(t in facts for t in tail)
    tails.add(tuple(facts.index(t) for t in tail))
  assert len(tails) > 15 and [d.tokens for d in corpus.documents(7, 9)] == \
      [d.tokens for d in docs[7:9]]
  assert list(write_task.question_rows(cfg, 40, 3, 5)) == \
      list(write_task.question_rows(bare, 40, 3, 5))
  cfg.data.kv.restate_facts = -1
  with pytest.raises(ValueError, match="restate_facts=-1 must be >= 0"):
    from_config.make_task(cfg.data, 0)
