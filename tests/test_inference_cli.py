"""Inference end to end from a training run: write_task → encode (CLI) → generate → evaluate.

A 12-step smoke run (the shared ``small_cfg``) is the checkpoint. Its task is written as
one shared corpus of 300 documents plus questions, encoded with ``python -m
msa_jax.encode``, and answered through ``MemoryEngine`` and ``python -m msa_jax.generate``;
``evaluate.run_bank`` scores them. The model is barely trained, so the test pins the
plumbing and the contracts (fields, ids that exist, fingerprints), not accuracy.
"""
import json
import os
import subprocess
import sys

import pytest

from msa_jax.data import write_task
from msa_jax.inference import BankError, MemoryEngine, open_bank
from msa_jax.trainer import train_and_evaluate

from train_common import REPO, shared_train_setups, small_cfg  # noqa: F401

NUM_DOCS, NUM_QUESTIONS = 300, 6


@pytest.fixture(scope="module")
def run_and_task(tmp_path_factory, shared_train_setups):  # noqa: F811
  tmp = tmp_path_factory.mktemp("cli")
  cfg = small_cfg()
  workdir = str(tmp / "run")
  train_and_evaluate(cfg, workdir)
  corpus, questions = str(tmp / "corpus.jsonl"), str(tmp / "questions.jsonl")
  write_task.write_jsonl(write_task.corpus_rows(cfg, NUM_DOCS, cfg.seed), corpus, NUM_DOCS,
                         "corpus")
  write_task.write_jsonl(write_task.question_rows(cfg, NUM_DOCS, cfg.seed, NUM_QUESTIONS),
                         questions, NUM_QUESTIONS, "questions")
  bank = str(tmp / "bank")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "msa_jax.encode", f"--checkpoint={workdir}",
                        f"--corpus={corpus}", f"--bank={bank}"], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "300 documents" in out.stdout, out.stdout
  return cfg, workdir, corpus, questions, bank, tmp


def test_engine_answers_from_the_encoded_bank(run_and_task):
  cfg, workdir, corpus, questions, bank_path, _ = run_and_task
  bank = open_bank(bank_path)
  ids = [json.loads(line)["id"] for line in open(corpus)]
  assert bank.num_docs == NUM_DOCS and bank.doc_ids == ids
  rows = [json.loads(line) for line in open(questions)]
  engine = MemoryEngine.load(workdir, bank_path, batch_size=4, log=lambda *_: None)
  answers = engine.generate(rows, max_new_tokens=6)
  assert len(answers) == NUM_QUESTIONS
  k = engine.model.config.top_k
  for row, ans in zip(rows, answers):
    assert ans["question_tokens"] == row["question_tokens"]        # copied through
    assert len(ans["selected_doc_ids"]) == len(engine.model.config.router_layer_ids)
    for layer in ans["selected_doc_ids"]:
      assert len(layer) == k and set(layer) <= set(ids)
    assert set(ans["timings_ms"]) >= {"prefill", "decode"}
    assert (ans["answer_tokens"] is None) == ("failure" in ans)
    if "failure" in ans:
      assert isinstance(ans["failed_tokens"], list) and "failed_text" in ans
  forced = engine.generate(rows[:2], max_new_tokens=6, oracle=True)
  assert len(forced) == 2
  # top_k at inference: the same bank, each question routed to k + 1 documents, its
  # positions at the trained offset T + k, so its top k + 1 hold the trained top k.
  wider = MemoryEngine.load(workdir, bank_path, batch_size=4, top_k=k + 1, log=lambda *_: None)
  assert wider.model.config.top_k == k + 1
  for ans, trained in zip(wider.generate(rows, max_new_tokens=6), answers):
    for layer, trained_layer in zip(ans["selected_doc_ids"], trained["selected_doc_ids"]):
      assert len(layer) == k + 1 and len(set(layer)) == k + 1 and set(layer) <= set(ids)
      assert set(trained_layer) <= set(layer)
  # The question starts at the trained offset T + k (SPEC §2), not T + k + 1: the smoke
  # model's routing above happens not to move with it, the reading recipe's does.
  from msa_jax.inference import interleave
  start = interleave.BankBatch(wider.device_bank, 1, wider.position_config).active_start_b[0]
  assert start == len(bank.prefix_tokens) + k
  with pytest.raises(ValueError, match="top_k=-1: pass a number of documents >= 1"):
    MemoryEngine.load(workdir, bank_path, top_k=-1, log=lambda *_: None)


def test_generate_cli_and_bank_evaluation(run_and_task):
  from msa_jax import evaluate
  cfg, workdir, corpus, questions, bank, tmp = run_and_task
  out = str(tmp / "answers.jsonl")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-m", "msa_jax.generate", f"--checkpoint={workdir}",
                        f"--bank={bank}", f"--questions={questions}", f"--out={out}",
                        "--max_new_tokens=4", "--batch_size=8"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  rows = [json.loads(line) for line in open(out)]
  assert len(rows) == NUM_QUESTIONS and all("rounds" in r and "answer" in r for r in rows)
  result = evaluate.run_bank(workdir, bank, questions, out=str(tmp / "eval_bank.json"),
                             max_new_tokens=6)
  k = cfg.model.top_k
  for key in ("answer_exact_match", "router_recall@1", f"router_recall@{k}",
              "oracle_answer_exact_match"):
    assert 0.0 <= result[key] <= 1.0, key
  assert result["router_recall@1"] <= result[f"router_recall@{k}"]
  assert json.load(open(tmp / "eval_bank.json"))["num_questions"] == NUM_QUESTIONS
  # The same through the evaluation CLI, each question routed to k + 1 documents (the CLI
  # once failed at import: msa_jax.generate defined the same absl flags).
  res = subprocess.run([sys.executable, "-m", "msa_jax.evaluate", f"--workdir={workdir}",
                        f"--bank={bank}", f"--questions={questions}", "--max_new_tokens=6",
                        f"--top_k={k + 1}", f"--out={tmp}/eval_cli.json"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  wider = json.load(open(tmp / "eval_cli.json"))
  assert wider["top_k"] == k + 1 and wider["num_questions"] == NUM_QUESTIONS
  assert wider[f"router_recall@{k + 1}"] >= result[f"router_recall@{k}"]


def test_a_bank_from_another_model_is_refused(run_and_task, tmp_path):
  cfg, _, _, _, bank, _ = run_and_task
  other = small_cfg()
  other.num_steps = 2
  other.optim.warmup_phase_steps = 1
  other.optim.lr_ramp_steps = 1
  other.seed = 1
  train_and_evaluate(other, str(tmp_path / "other"))
  with pytest.raises(BankError, match="encoded by another model or config"):
    MemoryEngine.load(str(tmp_path / "other"), bank, log=lambda *_: None)
