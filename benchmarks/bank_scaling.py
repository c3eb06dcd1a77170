"""One trained model, growing shared banks: accuracy and cost against memory size.

  python -m benchmarks.bank_scaling --workdir=runs/smoke --sizes=16384,131072,700000

For each size N (documents) it writes the run's task as one shared corpus of N documents
(``msa_jax.data.write_task``; document n is the same in every corpus), encodes it into a
bank with the real encoder, and asks the SAME questions (gold documents among the first
``--question_pool`` documents) through the engine (``msa_jax.evaluate.run_bank``):
answer exact match, router recall@1/@k, oracle exact match, encode tokens/s, and the
latency by stage of a batch of ``--batch_size`` questions over all Memory Interleave rounds
(prefill = routing + fetch + forward of the questions; decode), after a warm-up batch. Writes ``bank_scaling.json`` and ``bank_scaling.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def plot(rows, path: str, batch: int) -> None:
  from msa_jax import plots
  x = [r["memory_tokens"] for r in rows]
  fig, (a, b) = plots.subplots(1, 2, figsize=(10, 4))
  a.plot(x, [r["answer_exact_match"] for r in rows], "o-", label="answer exact match")
  a.plot(x, [r["oracle_answer_exact_match"] for r in rows], "s--", label="EM, oracle routing")
  a.plot(x, [r["router_recall@1"] for r in rows], "^-", label="router recall@1")
  a.set_xscale("log")
  a.set_ylim(-0.02, 1.02)
  a.set_xlabel("bank memory tokens")
  a.set_title("one shared bank: accuracy")
  a.grid(alpha=0.3)
  a.legend(fontsize=8)
  b.plot(x, [r["timings_ms"]["prefill"] for r in rows], "o-", label="prefill (route+fetch+fwd)")
  b.plot(x, [r["timings_ms"]["decode"] for r in rows], "s-", label="decode (all tokens)")
  b.set_xscale("log")
  b.set_yscale("log")
  b.set_xlabel("bank memory tokens")
  b.set_ylabel(f"ms per batch of {batch} questions (all rounds)")
  b.set_title("latency by stage")
  b.grid(alpha=0.3)
  b.legend(fontsize=8)
  plots.save(fig, path)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a trained run (config.json + checkpoint)")
  ap.add_argument("--sizes", default="16384,131072,700000", help="documents per bank")
  ap.add_argument("--num_questions", type=int, default=64)
  ap.add_argument("--question_pool", type=int, default=0, help="0: the smallest size")
  ap.add_argument("--data", default="/tmp/bank_scaling", help="corpora and banks")
  ap.add_argument("--out", default="results/bank_scaling")
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--kv_placement", default="device")
  args = ap.parse_args()
  from msa_jax import evaluate
  from msa_jax.data import write_task
  from msa_jax.inference.checkpoint import load_model, load_tokenizer, task_prefix
  from msa_jax.inference.checkpoint import training_config
  from msa_jax.inference.encode import encode_corpus

  cfg = training_config(args.workdir)
  sizes = [int(s) for s in args.sizes.split(",")]
  pool = args.question_pool or min(sizes)
  os.makedirs(args.data, exist_ok=True)
  os.makedirs(args.out, exist_ok=True)
  questions = os.path.join(args.data, f"questions_{pool}.jsonl")
  if not os.path.exists(questions):
    write_task.write_jsonl(write_task.question_rows(cfg, pool, cfg.seed, args.num_questions),
                           questions, args.num_questions, "questions")
  model, params = load_model(args.workdir)
  tokenizer = load_tokenizer(args.workdir)
  prefix = task_prefix(args.workdir, tokenizer)
  rows = []
  for n in sizes:
    corpus = os.path.join(args.data, f"corpus_{n}.jsonl")
    bank = os.path.join(args.data, f"bank_{n}")
    if not os.path.exists(corpus):
      write_task.write_jsonl(write_task.corpus_rows(cfg, n, cfg.seed), corpus, n, "corpus")
    t0 = time.perf_counter()
    m = encode_corpus(model, params, corpus, bank, tokenizer=tokenizer, prefix_tokens=prefix)
    encode_s = time.perf_counter() - t0
    res = evaluate.run_bank(args.workdir, bank, questions,
                            out=os.path.join(args.out, f"eval_bank_{n}.json"),
                            batch_size=args.batch_size, kv_placement=args.kv_placement)
    res.update(num_docs=n, encode_seconds=encode_s,
               encode_tokens_per_s=m["num_tokens"] / encode_s if encode_s > 1 else None)
    rows.append(res)
    with open(os.path.join(args.out, "bank_scaling.json"), "w") as f:
      json.dump({"workdir": os.path.abspath(args.workdir), "questions": args.num_questions,
                 "question_pool": pool, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, "bank_scaling.png"), args.batch_size)
  for r in rows:
    print(f"{r['memory_tokens']:>12,} tokens | encode {r['encode_tokens_per_s'] or 0:,.0f} tok/s | "
          f"EM {r['answer_exact_match']:.3f} | R@1 {r['router_recall@1']:.3f} | oracle EM "
          f"{r['oracle_answer_exact_match']:.3f} | prefill {r['timings_ms']['prefill']:.1f} ms | "
          f"decode {r['timings_ms']['decode']:.1f} ms")


if __name__ == "__main__":
  main()
