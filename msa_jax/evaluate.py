r"""Evaluation at growing memory sizes: answer exact match, router recall, oracle routing.

  python -m msa_jax.evaluate --workdir=/tmp/msa_smoke

reads the run's ``config.json`` and latest checkpoint, asks the same questions
with 1×, 4×, ... the training memory (more distractor documents), and writes
``WORKDIR/eval.json`` (``{"rows": [...]}``) and ``WORKDIR/eval.png``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import numpy as np

from msa_jax import losses
from msa_jax.data import from_config
from msa_jax.generate import generate_with_memory


def _recall(scores_rn: np.ndarray, gold_slots: list[int], k: int) -> float:
  """Mean over router layers of |gold ∩ top-k| / |gold| (``losses.recall_at_k``)."""
  n = scores_rn.shape[-1]
  gold = np.zeros((1, n), bool)
  gold[0, gold_slots] = True
  per_layer = losses.recall_at_k(scores_rn[None], gold, np.ones((1, n), bool), k)
  return float(np.mean(per_layer))


def evaluate_memory_size(cfg, model, params, multiplier: int) -> dict[str, Any]:
  """One row of eval.json: the eval questions at ``multiplier``× the training memory."""
  task = from_config.eval_task(cfg.data, cfg.seed, multiplier)
  num = cfg.eval.num_examples
  if hasattr(task, "__len__"):   # a finite eval set (JSONL): at most all of it
    num = min(num, len(task))
  examples = [task(i) for i in range(num)]
  specials = task.tokenizer.specials
  n_docs = max(len(ex.docs) for ex in examples)
  # Keep one batch's memory bounded: fewer examples per batch at large memories.
  batch = max(1, min(cfg.eval.batch_size, cfg.eval.get("max_batch_docs", 65_536) // n_docs))
  kw = dict(batch_size=batch, max_rounds=cfg.eval.max_rounds,
            max_new_tokens=cfg.eval.max_new_tokens)
  routed, oracle = generate_with_memory(model, params, examples, specials, modes=(False, True),
                                        **kw)
  em = np.mean([g.answer == ex.answer for g, ex in zip(routed, examples)])
  oracle_em = np.mean([g.answer == ex.answer for g, ex in zip(oracle, examples)])
  recall = {k: [] for k in (1, 5)}
  for g, ex in zip(routed, examples):
    first_gold = set(ex.rounds[0]) if ex.rounds else set(ex.positive_doc_ids)
    slots = [i for i, d in enumerate(ex.docs) if d.doc_id in first_gold]
    for k in recall:
      recall[k].append(_recall(g.first_doc_scores[:, :len(ex.docs)], slots, k))
  failures: dict[str, int] = {}
  for g in routed:
    if g.failure:
      failures[g.failure] = failures.get(g.failure, 0) + 1
  return {
      "memory_multiplier": int(multiplier),
      # Synthetic memories are uniform; JSONL ones vary: the mean over the examples.
      "memory_tokens": int(round(np.mean([sum(len(d.tokens) for d in ex.docs)
                                          for ex in examples]))),
      "num_docs": int(round(np.mean([len(ex.docs) for ex in examples]))),
      "answer_exact_match": float(em),
      "router_recall@1": float(np.mean(recall[1])),
      "router_recall@5": float(np.mean(recall[5])),
      "oracle_answer_exact_match": float(oracle_em),
      "num_examples": len(examples),
      "failures": failures,
  }


def plot(rows, path: str) -> None:
  """Exact match (routed and oracle) and recall@1 against memory size, log x."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  x = [r["memory_tokens"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(x, [r["answer_exact_match"] for r in rows], "o-", label="answer exact match")
  ax.plot(x, [r["oracle_answer_exact_match"] for r in rows], "s--",
          label="answer EM, oracle routing")
  ax.plot(x, [r["router_recall@1"] for r in rows], "^-", label="router recall@1")
  ax.plot(x, [r["router_recall@5"] for r in rows], "v:", label="router recall@5")
  ax.set_xscale("log")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("memory tokens")
  ax.set_title("MSA evaluation vs memory size")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(cfg, workdir: str, model=None, params=None) -> dict[str, Any]:
  """Evaluates at every ``cfg.eval.memory_multipliers`` size; writes eval.json and eval.png."""
  from msa_jax.cli import check_writable
  check_writable(workdir, "eval.json and eval.png")
  if model is None:
    model, params = load_for_eval(cfg, workdir)
  rows = []
  t0 = time.perf_counter()
  mults = list(cfg.eval.memory_multipliers)
  for i, mult in enumerate(mults):
    row = evaluate_memory_size(cfg, model, params, mult)
    rows.append(row)
    print(f"eval {i + 1}/{len(mults)}: memory {row['memory_tokens']:,} tokens "
          f"({row['num_docs']} docs) | EM {row['answer_exact_match']:.2f} | "
          f"oracle EM {row['oracle_answer_exact_match']:.2f} | "
          f"R@1 {row['router_recall@1']:.2f} | R@5 {row['router_recall@5']:.2f} | "
          f"elapsed {time.perf_counter() - t0:.0f}s", flush=True)
  result = {"rows": rows}
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  plot(rows, os.path.join(workdir, "eval.png"))
  return result


def load_for_eval(cfg, workdir: str):
  """The model and the latest checkpoint's parameters of a training run."""
  del cfg  # the run's own config.json describes the model
  from msa_jax.export.convert import from_pretrained
  model, params = from_pretrained(workdir)
  print(f"evaluating {workdir}", flush=True)
  return model, params


def main(argv):
  del argv
  from absl import flags, logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import ml_collections
  workdir = flags.FLAGS.workdir
  from msa_jax.run_config import saved_config_path   # config.json, or its newest record
  path = saved_config_path(workdir) or os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's directory")
  with open(path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  from msa_jax.cli import exit_with_error
  try:
    run(cfg, workdir)
  except Exception as e:  # noqa: BLE001 - the cause as the last lines (restore errors too)
    exit_with_error(e, "msa_jax.evaluate")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "A training run's directory.", required=True)
  app.run(main)
