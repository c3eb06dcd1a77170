r"""Does a global-RoPE router fail at a bank size because of the bank or because of where
the question sits? One 1× bank, the question moved.

With global RoPE the engine numbers a question after all memory (``engine.active_start``):
over a bank of N tokens its first token sits at position N, so a bigger bank also puts the
question farther from every document. This probe separates the two: it encodes ONE bank
of the training memory's documents (the same documents, at the same positions, as the
first B of every bank ``launch.reproduce_reading`` builds), and asks the same questions
with the question placed as if the bank held each of ``--question_at`` tokens. Router
recall@1 at each placement is then the router's response to the question's distance
alone, with no extra documents to compete with.

  python -m launch.question_position_probe --workdir=RUN --out=DIR \
      [--question_at=16380,262080,4193280,16773120,99983520] [--num_questions=64]

Writes ``DIR/question_position.json`` (rows: placement, recall@1, EM) and
``DIR/question_position.png``. Only for ``model.rope_mode="global"`` runs (document-wise
RoPE numbers the question after the top-k slots whatever the bank holds).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time


def log(msg: str) -> None:
  print(f"[question_position_probe {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def probe(workdir: str, root: str, placements: list[int], num_questions: int,
          batch_size: int = 16) -> list[dict]:
  """Router recall@1 and EM of ``num_questions`` over one 1× bank for each placement."""
  from launch.reproduce_reading import base_docs_of, corpus_source, write_questions
  from msa_jax import evaluate
  from msa_jax.data import write_task
  from msa_jax.inference.checkpoint import (load_model, load_tokenizer, task_prefix,
                                            training_config)
  from msa_jax.inference.encode import encode_documents
  cfg = training_config(workdir)
  if cfg.model.rope_mode != "global":
    raise ValueError(f"{workdir} trained with model.rope_mode={cfg.model.rope_mode!r}: the "
                     "question's position depends on the bank only with global RoPE; probe "
                     "a run trained with --config.model.rope_mode=global")
  corpus = write_task.SharedCorpus(write_task.kv_config_of(cfg), cfg.seed)
  base = base_docs_of(cfg)
  os.makedirs(root, exist_ok=True)
  questions = write_questions(cfg, root, base, num_questions)
  model, params = load_model(workdir)
  tokenizer = load_tokenizer(workdir)
  bank = os.path.join(root, "bank_1x")
  shutil.rmtree(bank, ignore_errors=True)
  manifest = encode_documents(model, params, corpus.records, base, bank,
                              source=corpus_source(workdir, cfg, base),
                              tokenizer=tokenizer, prefix_tokens=task_prefix(workdir, tokenizer))
  rows = []
  for tokens in placements:
    res = evaluate.run_bank(workdir, bank, questions, batch_size=batch_size, oracle=False,
                            max_new_tokens=int(cfg.eval.max_new_tokens), question_at=tokens,
                            out=os.path.join(root, f"probe_{tokens}.json"))
    row = {"question_at": tokens, "bank_tokens": manifest["num_tokens"],
           "router_recall@1": res["router_recall@1"],
           "answer_exact_match": res["answer_exact_match"]}
    log(f"question at {tokens:,}: recall@1 {row['router_recall@1']:.3f} | "
        f"EM {row['answer_exact_match']:.3f}")
    rows.append(row)
  return rows


def plot(rows: list[dict], path: str, title: str) -> None:
  """Recall@1 against the question's position."""
  from msa_jax import plots
  fig, ax = plots.subplots(1, 1, figsize=(6, 4))
  ax.plot([r["question_at"] for r in rows], [r["router_recall@1"] for r in rows], "^-",
          color="C3", label="recall@1, one 1× bank, question moved")
  ax.set_xscale("log")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("position of the question's first token")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  plots.save(fig, path, dpi=110)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="a trained global-RoPE run")
  ap.add_argument("--out", required=True, help="folder for question_position.{json,png}")
  ap.add_argument("--root", default="/tmp/question_position_probe",
                  help="scratch folder (bank, questions)")
  ap.add_argument("--question_at", default="16380,262080,4193280,16773120,99983520",
                  help="positions of the question's first token (default: after each bank "
                       "of launch.reproduce_reading's sizes 1x..6104x)")
  ap.add_argument("--num_questions", type=int, default=64)
  args = ap.parse_args(argv)
  placements = [int(x) for x in args.question_at.split(",") if x.strip()]
  if not placements or min(placements) < 1:
    raise SystemExit(f"--question_at needs positive positions, got {args.question_at!r}")
  rows = probe(args.workdir, args.root, placements, args.num_questions)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "question_position.json"), "w") as f:
    json.dump({"workdir": os.path.abspath(args.workdir), "rows": rows}, f, indent=2)
  plot(rows, os.path.join(args.out, "question_position.png"),
       f"global RoPE router, {rows[0]['bank_tokens']:,}-token bank: the question moved")
  log(f"wrote {args.out}/question_position.json and .png")


if __name__ == "__main__":
  main()
