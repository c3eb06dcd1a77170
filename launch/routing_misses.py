r"""What the router picked instead: for each question of a shared-bank evaluation whose
first routed document is not the gold one, how many of the question key's tokens (by
position) the routed document's best-matching fact shares, against the best share any
other key of the bank has.

  python -m launch.routing_misses --workdir=RUN --answers=EVAL_answers.jsonl \
      --num_docs=N [--out=misses.json]

``--answers``: the ``*_answers.jsonl`` that ``msa_jax.evaluate.run_bank`` writes beside
its result, over a bank of the run's shared corpus (``launch.reproduce_reading``: the
first ``--num_docs`` documents of ``write_task.SharedCorpus``). A miss to a document with
a near-duplicate key (3 of 4 tokens) is the task's collision; a miss to one sharing 0-1
tokens is the router's own error. Only for the kv task (keys of ``key_len`` symbols).
"""
from __future__ import annotations

import argparse
import collections
import json

import numpy as np


def key_overlaps(corpus, num_docs: int, answers: list[dict], block: int = 50_000) -> dict:
  """Per question (router layer 0's first routed document): ``routed_overlap`` (the most
  key positions any fact of the routed document shares with the question's key; None
  when it is the gold document) and ``bank_best`` (the most any key but the gold fact's
  shares), and a summary. One pass over the corpus's symbols, block by block (1.9M
  documents at 100M tokens): the gold and routed documents are found there by their id
  symbols, without building the documents."""
  tok = corpus.tokenizer
  key_len = corpus.config.key_len
  key0, id0 = tok.key_symbol(0), tok.id_symbol(0)
  q_qk = np.array([[t - key0 for t in row["question_tokens"][:key_len]] for row in answers])
  routed_ids = [row["ranked_doc_ids"][0][0] if row["ranked_doc_ids"][0] else None
                for row in answers]
  names = sorted({row["doc_id"] for row in answers} | set(filter(None, routed_ids)))
  names_ws = np.array([[t - id0 for t in tok.encode(name)] for name in names])
  index, keys_of = {}, {}             # doc id -> its index and its keys [F, key_len]
  hist_qo = np.zeros((len(answers), key_len + 1), np.int64)
  for start in range(0, num_docs, block):
    ids_bw, keys_bfk, _ = corpus.symbols(start, min(num_docs, start + block))
    for b, w in zip(*np.nonzero((ids_bw[:, None, :] == names_ws[None]).all(-1))):
      index[names[w]], keys_of[names[w]] = start + int(b), keys_bfk[b]
    keys_nk = keys_bfk.reshape(-1, key_len)
    for i, q_k in enumerate(q_qk):
      hist_qo[i] += np.bincount((keys_nk == q_k).sum(-1), minlength=key_len + 1)
  hist_qo[:, key_len] -= 1            # the gold fact itself
  rows = []
  for i, (row, routed_id) in enumerate(zip(answers, routed_ids)):
    gold, routed = index[row["doc_id"]], index.get(routed_id)
    overlap = None
    if routed != gold and routed is not None:
      overlap = int((keys_of[routed_id] == q_qk[i]).sum(-1).max())
    rows.append({"doc_id": row["doc_id"], "gold": gold, "routed": routed,
                 "routed_overlap": overlap,
                 "bank_best": int(np.flatnonzero(hist_qo[i])[-1])})
  misses = [r for r in rows if r["routed"] != r["gold"]]
  return {"num_docs": num_docs, "questions": len(rows), "misses": len(misses),
          "miss_overlap_counts": dict(sorted(collections.Counter(
              r["routed_overlap"] for r in misses).items(), key=lambda kv: str(kv[0]))),
          "questions_with_near_duplicate": int(sum(r["bank_best"] >= key_len - 1
                                                   for r in rows)),
          "rows": rows}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="the trained run the bank was encoded from")
  ap.add_argument("--answers", required=True, help="run_bank's *_answers.jsonl")
  ap.add_argument("--num_docs", type=int, required=True, help="documents in the bank")
  ap.add_argument("--out", default="", help="JSON of the rows and the summary")
  args = ap.parse_args(argv)
  from msa_jax.data import write_task
  from msa_jax.inference.checkpoint import training_config
  cfg = training_config(args.workdir)
  if cfg.data.task != "kv":
    raise SystemExit(f"{args.workdir} trained on data.task={cfg.data.task!r}: the key "
                     "overlap is defined for the kv task's keys only")
  corpus = write_task.SharedCorpus(write_task.kv_config_of(cfg), cfg.seed)
  with open(args.answers) as f:
    answers = [json.loads(line) for line in f if line.strip()]
  result = key_overlaps(corpus, args.num_docs, answers)
  for r in result["rows"]:
    if r["routed"] != r["gold"]:
      print(f"miss: gold document {r['gold']}, routed {r['routed']}: routed key overlap "
            f"{r['routed_overlap']}/{corpus.config.key_len}, best in the bank "
            f"{r['bank_best']}/{corpus.config.key_len}")
  print(f"{result['misses']} misses of {result['questions']} over {args.num_docs:,} "
        f"documents; routed overlaps {result['miss_overlap_counts']}; questions with a "
        f"near-duplicate key in the bank: {result['questions_with_near_duplicate']}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
