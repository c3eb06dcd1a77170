"""The shared-corpus task writer: unique ids and keys at any size, gold documents present,
deterministic and prefix-stable, rows that decode to their text, and the CLI."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from msa_jax.data import from_config, write_task
from train_common import REPO, get_config

OLD_LIMIT = 128 ** 2   # the 2-token ids of the smoke task before the 3-token ones


@pytest.fixture(scope="module")
def smoke():
  return get_config("smoke")


@pytest.fixture(scope="module")
def big_corpus(smoke):
  """20,000 smoke documents: beyond the 16,384 unique 2-token ids the task had."""
  return list(write_task.corpus_rows(smoke, OLD_LIMIT + 3_616, seed=0))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 1000, 4097])
def test_index_permutation_is_a_bijection(size):
  values = write_task.IndexPermutation(size, seed=1, stream=2)(np.arange(size))
  assert sorted(values.tolist()) == list(range(size))
  if size >= 64:   # keyed: another seed gives another order
    other = write_task.IndexPermutation(size, seed=2, stream=2)(np.arange(size))
    assert (values != other).mean() > 0.9
  with pytest.raises(ValueError, match="outside"):
    write_task.IndexPermutation(size, seed=1, stream=2)(np.array([size]))


def test_ids_and_keys_unique_beyond_the_old_limit(smoke, big_corpus):
  kv = smoke.data.kv
  assert kv.id_len == kv.key_len == 3 and not kv.bracket_ids
  assert len(big_corpus) > OLD_LIMIT
  ids = [r["id"] for r in big_corpus]
  keys = [tuple(r["tokens"][3:6]) for r in big_corpus]
  assert len(set(ids)) == len(ids) and len(set(keys)) == len(keys)
  assert {len(r["tokens"]) for r in big_corpus} == {8}
  # the id string names the document's first tokens (what the model generates)
  tok = from_config.tokenizer_of(smoke.data)
  for r in big_corpus[:200]:
    assert tok.encode_doc_id(r["id"]) == tok.encode(r["id"]) == r["tokens"][:3]


def test_rows_decode_to_their_text(smoke, big_corpus):
  tok = from_config.tokenizer_of(smoke.data)
  words = set(tok.words)
  for r in itertools.islice(big_corpus, 0, None, 97):
    assert tok.decode(r["tokens"]) == r["text"]
    assert tok.encode(r["text"]) == r["tokens"]
    parts = r["text"].split()
    assert [p[0] for p in parts] == list("iiikkkvv") and set(parts) <= words
  for q in write_task.question_rows(smoke, 500, seed=0, num_questions=20):
    assert tok.decode(q["question_tokens"]) == q["question"]
    assert tok.decode(q["answer_tokens"]) == q["answer"]


def test_questions_have_exactly_one_gold_document(smoke, big_corpus):
  by_key = {}
  for r in big_corpus:
    by_key.setdefault(tuple(r["tokens"][3:6]), []).append(r)
  rows = list(write_task.question_rows(smoke, len(big_corpus), seed=0, num_questions=300))
  assert len({q["doc_id"] for q in rows}) == 300
  for q in rows:
    (gold,) = by_key[tuple(q["question_tokens"])]
    assert gold["id"] == q["doc_id"] and q["rounds"] == [[q["doc_id"]]]
    assert gold["tokens"][6:] == q["answer_tokens"]


def test_deterministic_and_prefix_stable(smoke, big_corpus):
  again = list(itertools.islice(write_task.corpus_rows(smoke, 1_000, seed=0), 1_000))
  assert again == big_corpus[:1_000]   # document n does not depend on num_docs
  other_seed = list(write_task.corpus_rows(smoke, 1_000, seed=1))
  assert sum(a["id"] == b["id"] for a, b in zip(again, other_seed)) < 10
  q = lambda n, s=0: list(write_task.question_rows(smoke, n, s, 40, question_pool=1_000))
  assert q(1_000) == q(len(big_corpus)) == q(1_000)
  assert q(1_000) != q(1_000, 1)
  pool = {r["id"] for r in big_corpus[:1_000]}
  assert {r["doc_id"] for r in q(5_000)} <= pool


def test_tiny_and_multi_fact_tasks():
  # the reading task: bare 4-token id, 6 facts "k k k k v v", then 2 of them again
  tiny = get_config("tiny")
  rows = list(write_task.corpus_rows(tiny, 300, seed=3))
  assert {len(r["tokens"]) for r in rows} == {52}
  assert all(r["tokens"][40:46] in [r["tokens"][i:i + 6] for i in range(4, 40, 6)]
             for r in rows)
  tok = from_config.tokenizer_of(tiny.data)
  assert all(tok.encode_doc_id(r["id"]) == r["tokens"][:4] for r in rows)
  assert all(r["text"].startswith("i") for r in rows)
  keys = [tuple(r["tokens"][i:i + 4]) for r in rows for i in range(4, 40, 6)]
  assert len(set(keys)) == 300 * 6
  # The recipe's answers restate the key (data.kv.answer_with_key): the gold answer a bank
  # question is scored against is the key then its value, as the training samples' answer.
  assert tiny.data.kv.answer_with_key
  docs = {r["id"]: r["tokens"] for r in rows}
  for q in write_task.question_rows(tiny, 300, seed=3, num_questions=10):
    assert q["answer_tokens"][:4] == q["question_tokens"][-4:]
    fact_at = [i for i in range(4, 40, 6) if docs[q["doc_id"]][i:i + 4] == q["answer_tokens"][:4]]
    assert len(fact_at) == 1 and docs[q["doc_id"]][fact_at[0]:fact_at[0] + 6] == q["answer_tokens"]
  plain = get_config("tiny")
  plain.data.kv.answer_with_key = False
  q = next(write_task.question_rows(plain, 300, seed=3, num_questions=1))
  assert len(q["answer_tokens"]) == 2
  # the paper recipe's kv block: 16 facts "k k is v v ." per document, worded questions
  paper = get_config("4b")
  rows = list(write_task.corpus_rows(paper, 200, seed=0))
  keys = [r["text"].split()[i:i + 2] for r in rows for i in range(4, 4 + 16 * 6, 6)]
  assert len({tuple(k) for k in keys}) == 200 * 16
  texts = {r["id"]: r["text"] for r in rows}
  for q in write_task.question_rows(paper, 200, seed=0, num_questions=10):
    key = q["question"].split()[5:7]
    assert q["question"].startswith("what is the value for ")
    assert " ".join(key + ["is", q["answer"], "."]) in texts[q["doc_id"]]


def test_size_errors(smoke):
  with pytest.raises(ValueError, match="addresses 1..2,097,152 documents"):
    next(write_task.corpus_rows(smoke, 128 ** 3 + 1))
  with pytest.raises(ValueError, match="num_questions=11"):
    next(write_task.question_rows(smoke, 100, num_questions=11, question_pool=10))
  niah = get_config("smoke")
  niah.data.task = "niah"
  with pytest.raises(ValueError, match="data.task='niah'"):
    next(write_task.corpus_rows(niah, 10))


def test_run_config_gives_tokenizer_and_prefix(smoke, tmp_path):
  (tmp_path / "config.json").write_text(smoke.to_json_best_effort())
  cfg = from_config.load_run_config(str(tmp_path))
  tok = from_config.tokenizer_of(cfg.data)
  assert tok.words == from_config.tokenizer_of(smoke.data).words
  assert from_config.prefix_of(cfg.data) == [tok.specials.bos]
  with pytest.raises(FileNotFoundError, match="training run's directory"):
    from_config.load_run_config(str(tmp_path / "missing"))


def test_cli_writes_corpus_and_questions(tmp_path):
  corpus, questions = tmp_path / "c.jsonl", tmp_path / "q.jsonl"
  cmd = [sys.executable, "-m", "msa_jax.data.write_task",
         f"--config={os.path.join(REPO, 'configs', '16k_to_100m.py')}:smoke",
         "--num_docs=500", f"--corpus={corpus}", f"--questions={questions}",
         "--num_questions=7", "--seed=5"]
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "corpus: 500/500 (100%)" in out.stdout
  rows = [json.loads(line) for line in corpus.read_text().splitlines()]
  qs = [json.loads(line) for line in questions.read_text().splitlines()]
  smoke = get_config("smoke")
  assert rows == list(write_task.corpus_rows(smoke, 500, seed=5))
  assert qs == list(write_task.question_rows(smoke, 500, seed=5, num_questions=7))
  with pytest.raises(FileExistsError, match="--overwrite"):   # nothing written is lost
    write_task.write_jsonl(iter([{"a": 1}]), str(corpus), 1, "corpus")
  assert [json.loads(line) for line in corpus.read_text().splitlines()] == rows


def test_task_fingerprint_names_the_documents():
  tiny = get_config("tiny")
  same = get_config("tiny")
  assert write_task.task_fingerprint(tiny) == write_task.task_fingerprint(same)
  same.seed = tiny.seed + 1
  assert write_task.task_fingerprint(same) != write_task.task_fingerprint(tiny)
  other = get_config("tiny")
  other.data.kv.facts_per_doc = 5
  assert write_task.task_fingerprint(other) != write_task.task_fingerprint(tiny)
