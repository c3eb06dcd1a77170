"""``config.data`` -> training iterator and eval tasks for every data source: kv, multihop,
the NIAH suite, and JSONL (per-example rows or a shared corpus, local HF tokenizer)."""
import json
import os

import numpy as np
import pytest

from msa_jax.data import buckets as bucket_lib
from msa_jax.data import from_config as ip
from msa_jax.batch import MSABatch
from msa_jax.data.collate import BucketShapes
from msa_jax.data.niah import SUBTASKS
from train_common import shared_train_setups, get_config, small_cfg  # noqa: F401

NUM_KEYS = 24
WORDS = ([f"d{i}" for i in range(32)] + [f"k{i}" for i in range(NUM_KEYS)]
         + [f"v{i}" for i in range(NUM_KEYS)] + "[ ] the key is what ? . and".split())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny word-level HF tokenizer with the MSA control tokens (no network)."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<id-end>", "<end-of-retrieval>"]
  vocab = {w: n for n, w in enumerate(specials + WORDS)}
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tk.add_special_tokens(specials)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
      eos_token="<eos>")
  path = tmp_path_factory.mktemp("hf_tok")
  fast.save_pretrained(path)
  return str(path)


def _kv_rows(n, seed, docs_range=(3, 6), long_docs=True):
  """Per-example rows: memory of kX-is-vY facts, the question asks one key."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    nd = int(rng.integers(*docs_range))
    ids = rng.choice(32, nd, replace=False)
    keys = rng.choice(NUM_KEYS, nd, replace=False)
    vals = rng.integers(0, NUM_KEYS, nd)
    extra = rng.integers(0, 2 if long_docs else 1, nd)   # some documents are longer
    docs = [{"id": f"d{i}", "text": f"the key k{k} is v{v} ." + " and" * int(3 * e)}
            for i, k, v, e in zip(ids, keys, vals, extra)]
    g = int(rng.integers(nd))
    rows.append({"docs": docs, "question": f"what is k{keys[g]} ?", "answer": f"v{vals[g]}",
                 "positive_doc_ids": [f"d{ids[g]}"]})
  return rows


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def jsonl_files(tmp_path_factory, hf_dir):
  d = tmp_path_factory.mktemp("jsonl")
  corpus = [{"id": f"d{i}", "text": f"the key k{i} is v{(7 * i) % NUM_KEYS} ."}
            for i in range(12)]
  queries = [{"question": f"what is k{i} ?", "answer": f"v{(7 * i) % NUM_KEYS}",
              "positive_doc_ids": [f"d{i}"]} for i in range(12)]
  queries[3]["doc_ids"] = ["d5", "d3", "d1"]   # a row with its own memory subset
  return dict(train=_write(d / "train.jsonl", _kv_rows(40, 0)),
              eval=_write(d / "eval.jsonl", _kv_rows(6, 1)),
              # one memory shape: the end-to-end run compiles few train steps
              uniform=_write(d / "uniform.jsonl", _kv_rows(16, 2, (4, 5), False)),
              corpus=_write(d / "corpus.jsonl", corpus),
              queries=_write(d / "queries.jsonl", queries))


def _jsonl_cfg(hf_dir, files, corpus=False, variant="smoke"):
  cfg = get_config(variant)
  cfg.data.task = "jsonl"
  cfg.data.tokenizer_dir = hf_dir
  cfg.data.jsonl_path = files["queries" if corpus else "train"]
  cfg.data.corpus_path = files["corpus"] if corpus else ""
  cfg.data.eval_jsonl_path = "" if corpus else files["eval"]
  cfg.eval.memory_multipliers = (1,)
  return cfg


def _check_batch(b, buckets):
  assert isinstance(b, MSABatch)
  B, N, L = b.doc_tokens.shape
  M, T = b.active_tokens.shape[1], b.prefix_tokens.shape[1]
  assert BucketShapes(B, T, N, L, M) in buckets
  for name in ("prefix_mask", "doc_mask", "active_mask", "question_mask", "loss_mask",
               "targets", "positive_docs"):
    assert getattr(b, name).shape[0] == B
  assert b.doc_mask.shape == (B, N, L) and b.positive_docs.shape == (B, N)
  rows = b.active_mask.any(-1)
  assert rows.any()
  assert not (b.question_mask & ~b.active_mask).any()
  assert not (b.loss_mask & ~b.active_mask).any()
  assert not (b.loss_mask & b.question_mask & np.roll(b.question_mask, -1, 1)).any()
  assert not (b.positive_docs & ~b.doc_mask.any(-1)).any()
  assert (b.positive_docs.any(-1) == rows).all()      # every real row has gold docs
  assert (b.loss_mask.any(-1) == rows).all()
  assert (b.doc_mask[:, :, 0] | ~b.doc_mask.any(-1)).all()   # docs start at slot 0
  assert (b.doc_tokens[~b.doc_mask] == 0).all() and (b.active_tokens[~b.active_mask] == 0).all()


@pytest.mark.parametrize("task, subtask", [("kv", ""), ("multihop", ""), ("niah", ""),
                                           ("niah", "multiquery")])
def test_synthetic_iterators(task, subtask, capsys):
  cfg = get_config("smoke")
  cfg.data.task = task
  cfg.data.niah.subtask = subtask
  if task == "niah":
    cfg.data.niah.doc_len = 24
    cfg.data.num_docs = 16
  it = ip.make_train_iterator(cfg.data, seed=0, batch_size=8, chunk_size=2)
  assert "padding waste" in capsys.readouterr().out
  source = ip.make_source(cfg.data, 0)
  buckets = bucket_lib.buckets_for(source, 8, 2)
  tasks = set()
  for _ in range(6):
    b = next(it)
    _check_batch(b, buckets)
    assert b.doc_tokens.shape[1] == cfg.data.num_docs
  if task == "niah":
    tasks = {source(i).task for i in range(40)}
    assert tasks == ({f"niah_{s}" for s in SUBTASKS} if not subtask else {f"niah_{subtask}"})
  assert ip.vocab_size_of(cfg.data) == source.tokenizer.vocab_size


def test_niah_memory_tokens_and_eval_scaling():
  cfg = get_config("tiny")
  cfg.data.task = "niah"
  cfg.data.niah.doc_len = 24
  cfg.data.memory_tokens = 24 * 30   # 30 tokens a document ([ 4-token id ] + 24) -> 24
  task = ip.make_task(cfg.data, 0)
  assert {len(task(i).docs) for i in range(8)} == {24}
  base, big = ip.eval_task(cfg.data, 0, 1), ip.eval_task(cfg.data, 0, 4)
  names = set()
  for i in range(16):
    a, b = base(i), big(i)
    names.add(a.task)
    assert a.task == b.task and a.question == b.question and a.answer == b.answer
    assert a.positive_doc_ids == b.positive_doc_ids
    assert [a.doc_by_id(p).tokens for p in a.positive_doc_ids] == \
        [b.doc_by_id(p).tokens for p in b.positive_doc_ids]
    assert len(b.docs) == 4 * len(a.docs)
    assert a.question != task(i).question or a.answer != task(i).answer  # held-out seed
  assert len(names) >= 5


def test_niah_config_errors():
  cfg = get_config("smoke")
  cfg.data.task = "niah"
  cfg.data.niah.subtask = "nope"
  with pytest.raises(ValueError, match="data.niah.subtask='nope'"):
    ip.make_task(cfg.data, 0)
  cfg.data.niah.subtask = ""
  cfg.data.niah.weights = (1.0, 2.0)
  with pytest.raises(ValueError, match="one weight per subtask"):
    ip.make_task(cfg.data, 0)
  cfg.data.task = "wiki"
  with pytest.raises(ValueError, match="unknown data.task='wiki'"):
    ip.make_train_iterator(cfg.data, seed=0, batch_size=8, chunk_size=2)


@pytest.mark.parametrize("corpus", [False, True])
def test_jsonl_iterator(hf_dir, jsonl_files, corpus, capsys):
  cfg = _jsonl_cfg(hf_dir, jsonl_files, corpus)
  source = ip.make_source(cfg.data, 0)
  assert isinstance(source, ip.ExampleList) and len(source) == (12 if corpus else 40)
  buckets = bucket_lib.buckets_for(source, 4, 2)
  for ex in source:          # every sample of the data fits (nothing is truncated)
    from msa_jax.data import interleave
    for s in interleave.expand(ex, source.tokenizer.specials):
      assert any(bk.fits(s) for bk in buckets)
  it = ip.make_train_iterator(cfg.data, seed=3, batch_size=4, chunk_size=2)
  out = capsys.readouterr().out
  assert "padding waste" in out and f"({len(source)} examples)" in out
  seen = set()
  # 2 samples per example (id, answer): 3 epochs' worth of batches repeat the list
  for _ in range(3 * 2 * len(source) // 4):
    b = next(it)
    _check_batch(b, buckets)
    for row in range(4):
      if b.active_mask[row].any():
        seen.add(tuple(b.active_tokens[row, b.question_mask[row]][:8].tolist()))
  assert len(seen) >= len(source)     # every question reached training
  # The same seed gives the same stream; another seed a different order.
  a = next(ip.make_train_iterator(cfg.data, seed=3, batch_size=4, chunk_size=2, verbose=False))
  c = next(ip.make_train_iterator(cfg.data, seed=4, batch_size=4, chunk_size=2, verbose=False))
  b0 = next(ip.make_train_iterator(cfg.data, seed=3, batch_size=4, chunk_size=2, verbose=False))
  assert np.array_equal(a.active_tokens, b0.active_tokens)
  assert not (a.active_tokens.shape == c.active_tokens.shape
              and np.array_equal(a.active_tokens, c.active_tokens))


def test_jsonl_buckets_follow_the_data(hf_dir, jsonl_files):
  cfg = _jsonl_cfg(hf_dir, jsonl_files)
  source = ip.make_source(cfg.data, 0)
  buckets = bucket_lib.buckets_for(source, 4, 2)
  assert max(b.docs for b in buckets) == max(len(ex.docs) for ex in source)
  assert min(b.docs for b in buckets) < max(b.docs for b in buckets)   # several memory sizes
  waste = bucket_lib.padding_waste_of(source, buckets, num_examples=40)
  one = [BucketShapes(4, max(b.prefix for b in buckets), max(b.docs for b in buckets),
                      max(b.doc_len for b in buckets), max(b.active for b in buckets))]
  assert waste["total"] < bucket_lib.padding_waste_of(source, one, num_examples=40)["total"]
  cfg.data.max_doc_len = 8     # JSONL documents are checked as they are read: file:line
  with pytest.raises(ValueError, match=r"train.jsonl:1: document 'd\d+' has \d+ tokens "
                     r"\(with its id\), over data.max_doc_len=8"):
    ip.make_train_iterator(cfg.data, seed=0, batch_size=4, chunk_size=2)
  cfg.data.max_doc_len = 0
  cfg.data.max_docs = 4        # the bucket caps still name the example
  with pytest.raises(ValueError, match=r"example \d+ of .*train.jsonl has 5 documents, over "
                     "data.max_docs=4"):
    ip.make_train_iterator(cfg.data, seed=0, batch_size=4, chunk_size=2)


def test_jsonl_eval(hf_dir, jsonl_files, capsys):
  cfg = _jsonl_cfg(hf_dir, jsonl_files)
  ev = ip.eval_task(cfg.data, 0, 1)
  assert len(ev) == 6 and ev(0).question == ev[0].question and ev.tokenizer.specials.eos == 3
  with pytest.raises(ValueError, match=r"data.task='jsonl' evaluates the memories of its "
                     "file as they are"):
    ip.eval_task(cfg.data, 0, 4)
  cfg.data.eval_jsonl_path = ""
  assert len(ip.eval_task(cfg.data, 0, 1)) == 40
  assert "WARNING: data.eval_jsonl_path is empty" in capsys.readouterr().out
  corpus_cfg = _jsonl_cfg(hf_dir, jsonl_files, corpus=True)
  ev = ip.eval_task(corpus_cfg.data, 0, 1)
  assert [len(e.docs) for e in ev][:4] == [12, 12, 12, 3]


def test_jsonl_config_errors(hf_dir, jsonl_files, tmp_path):
  from msa_jax.trainer import resolve_model_config, validate_config
  cfg = _jsonl_cfg(hf_dir, jsonl_files)
  cfg.eval.memory_multipliers = (1, 4)
  with pytest.raises(ValueError, match=r"ask for \[4\]x memory"):
    validate_config(cfg)   # before any training, not at the end of it
  cfg.data.tokenizer_dir = ""
  with pytest.raises(ValueError, match="needs data.tokenizer_dir"):
    resolve_model_config(cfg)
  cfg.data.tokenizer_dir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="data.tokenizer_dir=.*missing"):
    ip.make_source(cfg.data, 0)
  cfg = _jsonl_cfg(hf_dir, jsonl_files)
  cfg.data.jsonl_path = str(tmp_path / "none.jsonl")
  with pytest.raises(FileNotFoundError, match="none.jsonl"):
    ip.make_source(cfg.data, 0)


def test_resolve_vocab_from_jsonl_tokenizer(hf_dir, jsonl_files):
  from msa_jax.trainer import resolve_model_config
  cfg = _jsonl_cfg(hf_dir, jsonl_files)
  assert cfg.model.vocab_size == 0
  n = ip.vocab_size_of(cfg.data)
  assert n == 6 + len(WORDS)
  assert resolve_model_config(cfg).vocab_size == -(-n // 64) * 64
  cfg.model.vocab_size = 64
  with pytest.raises(ValueError, match="smaller than the task tokenizer's"):
    resolve_model_config(cfg)


@pytest.mark.slow   # ~40 s on the CI CPU
def test_train_and_evaluate_jsonl(hf_dir, jsonl_files, tmp_path, shared_train_setups):  # noqa: F811
  from msa_jax.trainer import train_and_evaluate
  cfg = small_cfg()
  cfg.data.task = "jsonl"
  cfg.data.tokenizer_dir = hf_dir
  cfg.data.jsonl_path = jsonl_files["uniform"]
  cfg.data.eval_jsonl_path = jsonl_files["eval"]
  cfg.num_steps = 3
  cfg.optim.warmup_phase_steps = 1
  cfg.eval.at_end = True
  cfg.eval.memory_multipliers = (1,)
  cfg.eval.num_examples = 8      # more than the 6 eval rows: all of them are used
  cfg.eval.batch_size = 8
  cfg.eval.max_rounds = 1
  cfg.eval.max_new_tokens = 4
  cfg.eval.interleave_ablations = True
  steps = []
  train_and_evaluate(cfg, str(tmp_path), on_step=lambda s, m: steps.append(m))
  assert len(steps) == 3 and all(np.isfinite(m["loss"]) for m in steps)
  with open(tmp_path / "eval.json") as f:
    (row,) = json.load(f)["rows"]
  assert row["memory_multiplier"] == 1 and row["num_examples"] == 6
  assert set(row) >= {"answer_exact_match", "router_recall@1", "router_recall@5",
                      "oracle_answer_exact_match", "memory_tokens", "num_docs", "failures",
                      "single_round_answer_exact_match", "ids_only_answer_exact_match",
                      "single_round_failures", "ids_only_failures"}
  assert all(0 <= row[f"{a}_answer_exact_match"] <= 1 for a in ("single_round", "ids_only"))
  # Each ablation's failures, counted by reason, add up to its wrong answers at most.
  for a in ("single_round", "ids_only"):
    assert sum(row[f"{a}_failures"].values()) <= round(6 * (1 - row[f"{a}_answer_exact_match"]))
  assert 3 <= row["num_docs"] <= 5
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["vocab_size"] == -(-(6 + len(WORDS)) // 64) * 64
  assert os.path.isfile(tmp_path / "eval.png")
