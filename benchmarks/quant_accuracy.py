"""What bank quantisation costs in accuracy: one trained model, one bank, every precision.

  python -m benchmarks.quant_accuracy --workdir=runs/smoke3 --num_docs=150000 \
      --out=results/quantisation

Writes the run's task as one shared corpus of ``--num_docs`` documents
(``msa_jax.data.write_task``), encodes it ONCE in the model dtype with the real encoder, then
converts that bank to each ``K̄R``/``K̄V̄`` precision pair of ``--precisions`` with
``bank.convert_bank`` (byte-identical to encoding with ``--kr_dtype/--kv_dtype``: the rows are
the encoder's own output, quantised the same way), and asks the SAME questions of every
bank through the engine (``msa_jax.evaluate.run_bank``): router recall@1/@k, answer exact
match, exact match with oracle routing. Writes ``quant_accuracy.json`` and
``quant_accuracy.png`` to ``--out``; the differences against the model-dtype bank are in
each row (``delta_*``, in points).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

METRICS = ("router_recall@1", "router_recall@k", "answer_exact_match", "oracle_answer_exact_match")


def plot(rows, path: str) -> None:
  from msa_jax import plots
  import numpy as np
  labels = [f"K̄R {r['kr_dtype']}\nK̄V̄ {r['kv_dtype']}" for r in rows]
  x = np.arange(len(rows))
  w = 0.8 / len(METRICS)
  fig, ax = plots.subplots(figsize=(max(7, 1.4 * len(rows)), 4))
  for j, m in enumerate(METRICS):
    ax.bar(x + (j - (len(METRICS) - 1) / 2) * w, [r[m] for r in rows], w, label=m)
  ax.set_xticks(x)
  ax.set_xticklabels(labels, fontsize=7)
  lo = min(min(r[m] for m in METRICS) for r in rows)
  ax.set_ylim(max(0.0, lo - 0.05), 1.005)
  ax.set_title(f"bank precision vs accuracy ({rows[0]['memory_tokens']:,} memory tokens, "
               f"{rows[0]['questions']} questions)", fontsize=9)
  ax.legend(fontsize=7, loc="lower left")
  ax.grid(axis="y", alpha=0.3)
  plots.save(fig, path)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a trained run (config.json + checkpoint)")
  ap.add_argument("--num_docs", type=int, default=150_000, help="documents in the bank")
  ap.add_argument("--num_questions", type=int, default=64)
  ap.add_argument("--question_pool", type=int, default=16_384,
                  help="gold documents among the first N documents")
  ap.add_argument("--precisions", default="model/model,bfloat16/bfloat16,float8_e4m3fn/model,"
                  "int8/model,model/int8,float8_e4m3fn/int8,int8/int8",
                  help="comma-separated KR/KV pairs; 'model' = the model dtype")
  ap.add_argument("--data", default="/tmp/quant_accuracy", help="corpus and banks")
  ap.add_argument("--out", default="results/quantisation")
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--score_dtype", default="float32",
                  help="the XLA route's numerics: float32, bfloat16, or the GPU kernels' "
                       "(kernel: queries quantised to the codes' dtype, fp8 as two e4m3 terms; "
                       "kernel_fp8q1: one term)")
  args = ap.parse_args()
  from msa_jax import evaluate
  from msa_jax.data import write_task
  from msa_jax.inference import bank as bank_lib
  from msa_jax.inference.checkpoint import load_model, load_tokenizer, task_prefix
  from msa_jax.inference.checkpoint import training_config
  from msa_jax.inference.encode import encode_corpus

  cfg = training_config(args.workdir)
  os.makedirs(args.data, exist_ok=True)
  os.makedirs(args.out, exist_ok=True)
  n, pool = args.num_docs, min(args.question_pool, args.num_docs)
  # Questions are rewritten every run (a few rows): one kept from another run's task (e.g.
  # answers without the restated key) would score every answer wrong. The corpus, slower to
  # write, is kept under a name that holds the task's fingerprint.
  questions = os.path.join(args.data, f"questions_{pool}_{args.num_questions}.jsonl")
  write_task.write_jsonl(write_task.question_rows(cfg, pool, cfg.seed, args.num_questions),
                         questions, args.num_questions, "questions", overwrite=True)
  corpus = os.path.join(args.data, f"corpus_{n}_{write_task.task_fingerprint(cfg)}.jsonl")
  if not os.path.exists(corpus):
    write_task.write_jsonl(write_task.corpus_rows(cfg, n, cfg.seed), corpus, n, "corpus")
  model, params = load_model(args.workdir)
  model_dtype = model.config.dtype
  tokenizer = load_tokenizer(args.workdir)
  base = os.path.join(args.data, f"bank_{n}_{model_dtype}_{model_dtype}")
  t0 = time.perf_counter()
  m = encode_corpus(model, params, corpus, base, tokenizer=tokenizer,
                    prefix_tokens=task_prefix(args.workdir, tokenizer))
  encode_s = time.perf_counter() - t0
  rows = []
  for pair in args.precisions.split(","):
    kr, kv = (model_dtype if d == "model" else d for d in pair.split("/"))
    bank = base if (kr, kv) == (model_dtype, model_dtype) else \
        os.path.join(args.data, f"bank_{n}_{kr}_{kv}")
    if bank != base:   # converted afresh from the bank just encoded, never a stale one
      shutil.rmtree(bank, ignore_errors=True)
      bank_lib.convert_bank(base, bank, kr_dtype=kr, kv_dtype=kv)
    res = evaluate.run_bank(args.workdir, bank, questions,
                            out=os.path.join(args.data, f"eval_{kr}_{kv}.json"),
                            batch_size=args.batch_size, score_dtype=args.score_dtype)
    bank_bytes = sum(os.path.getsize(os.path.join(bank, f)) for f in os.listdir(bank))
    res["router_recall@k"] = res[f"router_recall@{model.config.top_k}"]
    rows.append({"kr_dtype": kr, "kv_dtype": kv, "score_dtype": args.score_dtype,
                 "questions": args.num_questions,
                 "top_k": model.config.top_k, "bank_bytes": bank_bytes, **{k: res[k] for k in (
                     "memory_tokens", "num_docs", "routing", *METRICS, "timings_ms")}})
    print(f"K̄R {kr:14s} K̄V̄ {kv:9s} | R@1 {res['router_recall@1']:.3f} R@k "
          f"{res['router_recall@k']:.3f} | EM {res['answer_exact_match']:.3f} | oracle EM "
          f"{res['oracle_answer_exact_match']:.3f} | bank {bank_bytes / 1e6:,.0f} MB", flush=True)
  ref = next((r for r in rows if (r["kr_dtype"], r["kv_dtype"]) == (model_dtype, model_dtype)),
             None)
  for r in rows:
    if ref is not None:
      r.update({f"delta_{k}_points": 100 * (r[k] - ref[k]) for k in METRICS})
  with open(os.path.join(args.out, "quant_accuracy.json"), "w") as f:
    json.dump({"workdir": os.path.abspath(args.workdir), "model_dtype": model_dtype,
               "num_docs": n, "memory_tokens": m["num_tokens"], "question_pool": pool,
               "encode_seconds": encode_s, "rows": rows,
               "command": "python -m benchmarks.quant_accuracy " + " ".join(
                   f"--{k}={v}" for k, v in vars(args).items())}, f, indent=1)
  plot(rows, os.path.join(args.out, "quant_accuracy.png"))


if __name__ == "__main__":
  main()
