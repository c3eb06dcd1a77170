r"""Evaluation: answer exact match and router recall, through the inference engine.

  python -m msa_jax.evaluate --workdir=/tmp/msa_smoke
      asks the run's eval questions with 1×, 4×, ... the training memory (more distractor
      documents in each question's own memory), routed and with oracle routing, and writes
      ``WORKDIR/eval.json`` (``{"rows": [...]}``) and ``WORKDIR/eval.png``;
  python -m msa_jax.evaluate --workdir=DIR --bank=BANK --questions=QUESTIONS.jsonl
      asks the questions (rows with the gold ``answer_tokens`` and ``doc_id``, as
      ``python -m msa_jax.data.write_task`` writes them) over one shared bank and writes
      ``WORKDIR/eval_bank.json``.

Both go through ``msa_jax.inference`` (KV-cache decoding, Memory Interleave).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import numpy as np

from msa_jax import losses
from msa_jax.data import from_config
from msa_jax.inference import interleave
from msa_jax.inference.engine import Engine


def _recall(scores_rn: np.ndarray, gold_slots: list[int], k: int) -> float:
  """Mean over router layers of |gold ∩ top-k| / |gold| (``losses.recall_at_k``)."""
  n = scores_rn.shape[-1]
  gold = np.zeros((1, n), bool)
  gold[0, gold_slots] = True
  per_layer = losses.recall_at_k(scores_rn[None], gold, np.ones((1, n), bool), k)
  return float(np.mean(per_layer))


@dataclasses.dataclass(frozen=True)
class Mode:
  """How one evaluation pass answers: routed or oracle-routed, how many retrieval rounds
  (None: the evaluation's ``max_rounds``), and what a round injects (``text`` | ``ids``)."""

  oracle: bool = False
  max_rounds: Optional[int] = None
  injection: str = "text"


ROUTED, ORACLE = Mode(), Mode(oracle=True)
# The paper's Memory Interleave ablations (Table 4), on the same trained model: one
# retrieval round before the answer ("w/o multi-round"), and ids injected without the
# documents' text ("w/o original text"). ``eval.interleave_ablations`` runs them.
ABLATIONS = {"single_round": Mode(max_rounds=1), "ids_only": Mode(injection="ids")}


def generate_with_memory(model, params, examples, specials, *, batch_size: int,
                         max_rounds: int, max_new_tokens: int, modes=(ROUTED, ORACLE)):
  """Generations per :class:`Mode` over one encoding of each batch's memories."""
  engine = Engine(model, params, "examples")
  out = [[] for _ in modes]
  for s in range(0, len(examples), batch_size):
    chunk = examples[s:s + batch_size]
    memory = interleave.example_batch(model, params, chunk, batch_size)
    for i, mode in enumerate(modes):
      gold = ([list(ex.rounds or [ex.positive_doc_ids]) for ex in chunk] if mode.oracle
              else None)
      rounds = max_rounds if mode.max_rounds is None else mode.max_rounds
      out[i].extend(interleave.generate(engine, memory, [ex.question for ex in chunk], specials,
                                        max_rounds=rounds, max_new_tokens=max_new_tokens,
                                        oracle_rounds=gold, injection=mode.injection))
  return out


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
  ablations = list(ABLATIONS) if cfg.eval.get("interleave_ablations", False) else []
  routed, oracle, *ablated = generate_with_memory(
      model, params, examples, specials, batch_size=batch, max_rounds=cfg.eval.max_rounds,
      max_new_tokens=cfg.eval.max_new_tokens,
      modes=(ROUTED, ORACLE, *(ABLATIONS[a] for a in ablations)))
  exact = lambda gens: float(np.mean([g.answer == ex.answer for g, ex in zip(gens, examples)]))
  em, oracle_em = exact(routed), exact(oracle)
  recall = {k: [] for k in (1, 5)}
  for g, ex in zip(routed, examples):
    first_gold = set(ex.rounds[0]) if ex.rounds else set(ex.positive_doc_ids)
    slots = [i for i, d in enumerate(ex.docs) if d.doc_id in first_gold]
    for k in recall:
      recall[k].append(_recall(g.first_scores[:, :len(ex.docs)], slots, k))
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
      **{f"{a}_answer_exact_match": exact(g) for a, g in zip(ablations, ablated)},
      "num_examples": len(examples),
      "failures": _count_failures(routed),
      **{f"{a}_failures": _count_failures(g) for a, g in zip(ablations, ablated)},
      "timings_ms": _mean_timings(routed),
  }


def _count_failures(gens) -> dict[str, int]:
  failures: dict[str, int] = {}
  for g in gens:
    if g.failure:
      failures[g.failure] = failures.get(g.failure, 0) + 1
  return failures


def _mean_timings(gens) -> dict[str, float]:
  keys = gens[0].timings_ms.keys() if gens else ()
  return {k: float(np.mean([g.timings_ms[k] for g in gens])) for k in keys}


def score_bank_answers(answers: list[dict], k: int) -> dict[str, Any]:
  """Exact match and router recall@1/@k of answer rows against their gold fields.

  Recall: the gold ``doc_id`` (or the first round's gold ids) among the first round's
  documents ranked by score, averaged over router layers, then over questions.
  """
  em, r1, rk = [], [], []
  for row in answers:
    if "answer_tokens" not in row or row.get("gold_answer_tokens") is None:
      raise ValueError("score_bank_answers needs gold_answer_tokens and answer_tokens per row")
    em.append(row["answer_tokens"] == row["gold_answer_tokens"])
    gold = set(row["rounds_gold"][0]) if row.get("rounds_gold") else {str(row["doc_id"])}
    ranked = row["ranked_doc_ids"]
    r1.append(np.mean([len(gold & set(r[:1])) / len(gold) for r in ranked]))
    rk.append(np.mean([len(gold & set(r[:k])) / len(gold) for r in ranked]))
  return {"answer_exact_match": float(np.mean(em)), "router_recall@1": float(np.mean(r1)),
          f"router_recall@{k}": float(np.mean(rk)), "num_questions": len(answers)}


def plot(rows, path: str) -> None:
  """Exact match (routed and oracle) and recall@1 against memory size, log x."""
  from msa_jax import plots
  x = [r["memory_tokens"] for r in rows]
  fig, ax = plots.subplots(figsize=(6, 4))
  ax.plot(x, [r["answer_exact_match"] for r in rows], "o-", label="answer exact match")
  ax.plot(x, [r["oracle_answer_exact_match"] for r in rows], "s--",
          label="answer EM, oracle routing")
  ax.plot(x, [r["router_recall@1"] for r in rows], "^-", label="router recall@1")
  ax.plot(x, [r["router_recall@5"] for r in rows], "v:", label="router recall@5")
  for name, style in zip(ABLATIONS, ("x-.", "+-.")):
    if f"{name}_answer_exact_match" in rows[0]:
      ax.plot(x, [r[f"{name}_answer_exact_match"] for r in rows], style,
              label=f"answer EM, {name.replace('_', ' ')}")
  ax.set_xscale("log")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("memory tokens")
  ax.set_title("MSA evaluation vs memory size")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  plots.save(fig, path)


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
    ablated = "".join(f"{a} EM {row[f'{a}_answer_exact_match']:.2f} | " for a in ABLATIONS
                      if f"{a}_answer_exact_match" in row)
    print(f"eval {i + 1}/{len(mults)}: memory {row['memory_tokens']:,} tokens "
          f"({row['num_docs']} docs) | EM {row['answer_exact_match']:.2f} | "
          f"oracle EM {row['oracle_answer_exact_match']:.2f} | {ablated}"
          f"R@1 {row['router_recall@1']:.2f} | R@5 {row['router_recall@5']:.2f} | "
          f"elapsed {time.perf_counter() - t0:.0f}s", flush=True)
  result = {"rows": rows}
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  plot(rows, os.path.join(workdir, "eval.png"))
  return result


def run_bank(workdir: str, bank_path: str, questions_path: str, *, out: str = "",
             batch_size: int = 8, max_new_tokens: int = 16, max_rounds: int = 3,
             kv_placement: str = "device", routing: str = "auto", oracle: bool = True,
             limit: int = 0, top_k: int = 0, question_at: int = 0,
             score_dtype: str = "float32") -> dict[str, Any]:
  """Scores the questions of ``questions_path`` over one shared bank (see module doc);
  ``top_k`` > 0 routes to that many documents instead of the model's own (recorded);
  ``question_at`` > 0 numbers each question as if the bank held that many tokens (global
  RoPE; ``launch.question_position_probe``); ``score_dtype``: the XLA route's numerics
  (``MemoryEngine.load``; recorded).

  Writes ``out`` (default ``WORKDIR/eval_bank_<bank name>.json``) with exact match, router
  recall@1/@k, oracle exact match and mean per-stage latency (after a compiling warm-up
  batch; a question's time is its batch's), and the answers beside it.
  """
  from msa_jax.generate import read_questions
  from msa_jax.inference import MemoryEngine
  out = out or os.path.join(workdir, f"eval_bank_{os.path.basename(os.path.normpath(bank_path))}.json")
  from msa_jax.cli import check_writable
  check_writable(os.path.dirname(os.path.abspath(out)), os.path.basename(out))
  rows = read_questions(questions_path)
  if limit:
    rows = rows[:limit]
  for n, row in enumerate(rows, start=1):
    if "answer_tokens" not in row or "doc_id" not in row:
      raise ValueError(f"{questions_path}: row {n} lacks the gold 'answer_tokens' / 'doc_id' "
                       "(write questions with python -m msa_jax.data.write_task)")
    row["gold_answer_tokens"] = row.pop("answer_tokens")
    row["rounds_gold"] = row.pop("rounds", None) or [[str(row["doc_id"])]]
  engine = MemoryEngine.load(workdir, bank_path, kv_placement=kv_placement, routing=routing,
                             batch_size=batch_size, max_rounds=max_rounds, top_k=top_k,
                             question_at=question_at, score_dtype=score_dtype)
  k = engine.model.config.top_k
  # Compile first (one batch, not scored), so that timings are steady-state latency.
  engine.generate(rows[:batch_size], max_new_tokens=max_new_tokens)
  t0 = time.perf_counter()
  answers = engine.generate(rows, max_new_tokens=max_new_tokens)
  elapsed = time.perf_counter() - t0
  result = {"bank": os.path.abspath(bank_path), "memory_tokens": engine.device_bank.bank.num_tokens,
            "num_docs": engine.device_bank.bank.num_docs, "routing": engine.device_bank.settings.routing,
            "kv_placement": kv_placement, "top_k": k, **score_bank_answers(answers, k),
            **({"question_at": question_at} if question_at else {}),
            "score_dtype": engine.device_bank.settings.score_dtype,
            "timings_ms": {key: float(np.mean([a["timings_ms"][key] for a in answers]))
                           for key in ("prefill", "decode")},
            "seconds": elapsed, "failures": {}}
  for a in answers:
    if a.get("failure"):
      result["failures"][a["failure"]] = result["failures"].get(a["failure"], 0) + 1
  if oracle:
    forced = engine.generate(rows, max_new_tokens=max_new_tokens, oracle=True)
    result["oracle_answer_exact_match"] = float(np.mean(
        [a["answer_tokens"] == a["gold_answer_tokens"] for a in forced]))
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  with open(out.replace(".json", "") + "_answers.jsonl", "w") as f:
    for a in answers:
      f.write(json.dumps(a) + "\n")
  print(f"bank eval: {result['memory_tokens']:,} tokens ({result['num_docs']:,} docs) | "
        f"EM {result['answer_exact_match']:.3f} | R@1 {result['router_recall@1']:.3f} | "
        + (f"R@{k} {result[f'router_recall@{k}']:.3f} | " if k > 1 else "") + "oracle EM "
        f"{result.get('oracle_answer_exact_match', float('nan')):.3f} | prefill "
        f"{result['timings_ms']['prefill']:.1f} ms, decode {result['timings_ms']['decode']:.1f} ms "
        f"per question | wrote {out}", flush=True)
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
  from msa_jax.cli import exit_with_error
  f = flags.FLAGS
  if f.bank or f.questions:
    try:
      if not (f.bank and f.questions):
        raise ValueError("--bank and --questions go together")
      run_bank(workdir, f.bank, f.questions, out=f.out, batch_size=f.batch_size,
               max_new_tokens=f.max_new_tokens, kv_placement=f.kv_placement, limit=f.limit,
               top_k=f.top_k)
    except Exception as e:  # noqa: BLE001 - the cause as the last lines
      exit_with_error(e, "msa_jax.evaluate")
    return
  with open(path) as fh:
    cfg = ml_collections.ConfigDict(json.load(fh))
  try:
    run(cfg, workdir)
  except Exception as e:  # noqa: BLE001 - the cause as the last lines (restore errors too)
    exit_with_error(e, "msa_jax.evaluate")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "A training run's directory.", required=True)
  flags.DEFINE_string("bank", "", "Evaluate over this shared bank (with --questions).")
  flags.DEFINE_string("questions", "", "Question rows with gold answer_tokens and doc_id.")
  flags.DEFINE_string("out", "", "Result JSON (default WORKDIR/eval_bank_<bank>.json).")
  flags.DEFINE_integer("batch_size", 8, "Questions decoded together (bank mode).")
  flags.DEFINE_integer("max_new_tokens", 8, "Tokens per round (bank mode).")
  flags.DEFINE_integer("limit", 0, "Only the first N questions (bank mode; 0 = all).")
  flags.DEFINE_enum("kv_placement", "device", ["device", "host"], "Where K̄/V̄ live (bank mode).")
  flags.DEFINE_integer("top_k", 0, "Documents each question routes to (bank mode; 0 = the "
                       "model's trained top_k).")
  app.run(main)
