"""Plot the answer and document-id LM losses of training runs side by side.

  python -m launch.plot_variants --out=results/reader_variants_h200 \
      results/reader_variants_h200/r2_*

Each argument is a run directory with ``metrics.jsonl`` (``msa_jax.train`` or
``launch/reader_variants.sh``); writes ``variants.png`` (two panels: ``lm_loss_answer``,
``lm_loss_retrieval`` against step, with each loss's chance level) and ``variants.json``
(per run: the last logged step and its losses, router recall@1, and with an ``eval.json``
beside the metrics its first row's exact match, oracle exact match and recall@1).
"""
from __future__ import annotations

import argparse
import json
import math
import os

from msa_jax import plots


def read_metrics(run_dir: str) -> list[dict]:
  """The logged rows of one run that carry the split LM losses."""
  path = os.path.join(run_dir, "metrics.jsonl")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if "lm_loss_answer" in r]


def chance_levels(config: dict) -> dict[str, float]:
  """Mean NLL a model that knows nothing of the memory scores on each sample kind: an answer
  target ``<end-of-retrieval> v₁..v_V <eos>`` with uniform values, an id target
  ``i₁..i_I <id-end>`` with uniform id symbols (the markers themselves cost nothing)."""
  kv = config["data"]["kv"]
  values, ids = kv["value_len"], kv["id_len"]
  return {"lm_loss_answer": values * math.log(kv["num_value_symbols"]) / (values + 2),
          "lm_loss_retrieval": ids * math.log(kv["num_id_symbols"]) / (ids + 1)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("runs", nargs="+")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  fig, axes = plots.subplots(1, 2, figsize=(12, 4.5))
  summary, chance = {}, {}
  for run in sorted(args.runs):
    if not os.path.isdir(run):   # a shell glob also matches the plot and summary files
      continue
    name = os.path.basename(os.path.normpath(run))
    rows = read_metrics(run)
    if not rows:
      print(f"{name}: no rows with lm_loss_answer; skipped")
      continue
    with open(os.path.join(run, "config.json")) as f:
      chance = chance_levels(json.load(f))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, ("lm_loss_answer", "lm_loss_retrieval")):
      ax.plot(steps, [r[key] for r in rows], label=name)
    last = rows[-1]
    summary[name] = {k: last.get(k) for k in ("step", "lm_loss_answer", "lm_loss_retrieval",
                                              "router_recall@1")}
    eval_path = os.path.join(run, "eval.json")   # launch/reader_variants.sh EVAL=1
    if os.path.exists(eval_path):
      with open(eval_path) as f:
        first = json.load(f)["rows"][0]
      summary[name].update({f"eval_{k}": first[k] for k in (
          "answer_exact_match", "oracle_answer_exact_match", "router_recall@1")})
    print(f"{name}: step {last['step']} answers {last['lm_loss_answer']:.3f} "
          f"ids {last['lm_loss_retrieval']:.3f} R@1 {last.get('router_recall@1', 0):.2f}")
  for ax, key, title in zip(axes, ("lm_loss_answer", "lm_loss_retrieval"),
                            ("answer samples (reading the injected text)",
                             "retrieval samples (document ids from memory)")):
    if key in chance:
      ax.axhline(chance[key], color="grey", ls="--", lw=1, label="chance")
    ax.set(title=title, xlabel="step", ylabel="LM loss (nats / target token)", ylim=(0, None))
    ax.legend(fontsize=7)
  os.makedirs(args.out, exist_ok=True)
  plots.save(fig, os.path.join(args.out, "variants.png"))
  with open(os.path.join(args.out, "variants.json"), "w") as f:
    json.dump({"chance": chance, "runs": summary}, f, indent=1)


if __name__ == "__main__":
  main()
