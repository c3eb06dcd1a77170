r"""Router recall and answer exact match of one trained run under each ``routing_score``.

  python -m benchmarks.routing_score --workdir=/work/runs/smoke_base \
      --out=results/export_routing_score

Loads the run's newest checkpoint twice (``msa_jax.from_pretrained(workdir,
routing_score=...)``: ``"cosine"``, what msa_jax trains, and ``"scaled_dot"``, what
the authors' released engine computes for ``INFONCE_DECOUPLE``) and asks both the
same evaluation questions at each memory size of the run's ``eval`` config
(``msa_jax.evaluate.evaluate_memory_size``). Writes ``routing_score.json`` and
``routing_score.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

ROUTING_SCORES = ("cosine", "scaled_dot")


def compare(workdir: str, multipliers=None, num_examples=None) -> dict:
  """``{"rows": [...]}``: one eval row per (routing score, memory multiplier)."""
  import ml_collections
  import msa_jax
  from msa_jax import evaluate
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  if multipliers:
    cfg.eval.memory_multipliers = list(multipliers)
  if num_examples:
    cfg.eval.num_examples = int(num_examples)
  rows = []
  t0 = time.perf_counter()
  total = len(ROUTING_SCORES) * len(cfg.eval.memory_multipliers)
  for score in ROUTING_SCORES:
    model, params = msa_jax.from_pretrained(workdir, routing_score=score)
    for mult in cfg.eval.memory_multipliers:
      row = dict(routing_score=score, **evaluate.evaluate_memory_size(cfg, model, params, mult))
      rows.append(row)
      print(f"[{len(rows)}/{total}] {score:>10} | memory {row['memory_tokens']:,} tokens "
            f"({row['num_docs']} docs) | EM {row['answer_exact_match']:.3f} | "
            f"R@1 {row['router_recall@1']:.3f} | R@5 {row['router_recall@5']:.3f} | "
            f"elapsed {time.perf_counter() - t0:.0f}s", flush=True)
  return {"workdir": os.path.abspath(workdir), "num_examples": int(cfg.eval.num_examples),
          "rows": rows}


def plot(result: dict, path: str) -> None:
  """Recall@1 and exact match against memory size, one line per routing score."""
  from msa_jax import plots
  fig, ax = plots.subplots(figsize=(6, 4))
  for score, style in zip(ROUTING_SCORES, ("-", "--")):
    rows = [r for r in result["rows"] if r["routing_score"] == score]
    x = [r["memory_tokens"] for r in rows]
    ax.plot(x, [r["router_recall@1"] for r in rows], "o" + style, label=f"recall@1, {score}")
    ax.plot(x, [r["answer_exact_match"] for r in rows], "s" + style, label=f"answer EM, {score}")
  ax.set_xscale("log")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("memory tokens")
  ax.set_title("routing_score: cosine (trained) vs scaled_dot (released engine)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  plots.save(fig, path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's directory")
  parser.add_argument("--out", default="results/export_routing_score")
  parser.add_argument("--multipliers", type=int, nargs="*", default=None,
                      help="memory multipliers (default: the run's eval.memory_multipliers)")
  parser.add_argument("--num_examples", type=int, default=None,
                      help="questions per memory size (default: the run's eval.num_examples)")
  args = parser.parse_args()
  result = compare(args.workdir, args.multipliers, args.num_examples)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "routing_score.json"), "w") as f:
    json.dump(result, f, indent=2)
  plot(result, os.path.join(args.out, "routing_score.png"))
  print(f"wrote {args.out}/routing_score.json and routing_score.png")


if __name__ == "__main__":
  main()
