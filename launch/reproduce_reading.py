r"""Issue 14, items 1-2 in one command: train the ``tiny`` reading recipe on 16K-token
memories, then ask the same questions through the engine over shared banks of 1×, 16×,
256×, 1024× and 6104× the training memory (6104 × 16K = 100M tokens).

  python -m launch.reproduce_reading --out=OUT --root=/tmp/reading \
      [--rope=document|global|document,global] [--budget_s=450] [--train_s=220] \
      [--multipliers=1,16,256,1024,6104] [--num_questions=64] [--train_args=...]

``launch/reproduce_reading.sh`` wraps it in a hard ``timeout`` (the GPU call). The recipe
trains for ~9 minutes: ``--train_only`` in one call, then ``--reuse_training`` with the
run unpacked under ``--root`` in the next (``STAGE=train`` / ``STAGE=eval`` of the script).

Per RoPE mode (``model.rope_mode``; the second one is a second training run):
  1. ``python -m msa_jax.train --config=configs/16k_to_100m.py:tiny`` under ``timeout
     --train_s`` (SIGTERM: the trainer saves its step and exits), no in-training eval.
  2. For each multiplier m, the run's task as ONE shared corpus of m × B documents (B: the
     documents of ``--base_tokens``, default the training memory: 315 for 16K tokens)
     (``msa_jax.data.write_task.SharedCorpus``: corpus-unique ids and keys, document n the
     same at every size), generated and encoded straight into a bank
     (``msa_jax.inference.encode.encode_documents``: no JSON), and the same
     ``--num_questions`` questions (gold documents among the first B) scored through the
     engine (``msa_jax.evaluate.run_bank``): answer exact match, router recall@1 and
     @k, oracle-routed exact match, and the relative degradation against 1×.
     A size is skipped (with the reason in its row) when the time it is predicted to
     take (encode rate and eval time measured on the previous size) does not fit in
     what is left of ``--budget_s``; the bank is deleted after its evaluation.
  3. After every size: ``OUT/reading.json`` (rows per mode, the training summary) and
     ``OUT/reading.png`` (EM and recall against bank tokens, both modes); after each
     training: ``OUT/router_health_<mode>.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

RECIPE = "configs/16k_to_100m.py:tiny"
# This process evaluates between training runs: it must not pre-allocate the accelerator's
# memory (JAX's default), or a training run after it (--rope=document,global) has none.
_PARENT_PREALLOCATE = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
SUMMARY_KEYS = ("step", "loss", "lm_loss", "aux_loss", "router_recall@1", "router_recall@5",
                "router_precision@k", "tokens_per_sec", "learning_rate")


def log(msg: str) -> None:
  print(f"[reproduce_reading {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(workdir: str, rope: str, train_s: float, extra_args: list[str], config: str = RECIPE,
          python: str = sys.executable) -> dict:
  """Trains the recipe under a hard time limit (``timeout``: SIGTERM, on which the trainer
  saves its step and exits; SIGKILL 30 s later); returns the training summary."""
  cmd = ["timeout", "--signal=TERM", "--kill-after=30", str(int(train_s)), python, "-m",
         "msa_jax.train", f"--config={config}", f"--workdir={workdir}",
         f"--config.model.rope_mode={rope}", "--config.eval.at_end=False",
         "--config.tensorboard=False", *extra_args]
  log("train: " + " ".join(cmd))
  env = dict(os.environ)
  if _PARENT_PREALLOCATE is None:   # the trainer takes the accelerator as usual
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
  else:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = _PARENT_PREALLOCATE
  t0 = time.perf_counter()
  rc = subprocess.call(cmd, env=env)
  seconds = time.perf_counter() - t0
  summary = {"rope_mode": rope, "command": cmd, "returncode": rc, "seconds": seconds,
             "timed_out": rc in (124, 137) or rc < 0, **training_curve(workdir)}
  log(f"train ({rope}): rc {rc}, {seconds:.0f}s, {len(summary['curve'])} logged rows, "
      f"last step {last_step(summary)}")
  return summary


def training_curve(workdir: str) -> dict:
  """``{"curve": SUMMARY_KEYS of each logged row, "final": the last row}`` of a run."""
  rows = read_metrics(workdir)
  return {"curve": [{k: r.get(k) for k in SUMMARY_KEYS if k in r} for r in rows],
          "final": rows[-1] if rows else None}


def last_step(summary: dict):
  """The last logged step of a :func:`training_curve` summary (None: nothing logged)."""
  return summary["final"]["step"] if summary["final"] else None


def reused_training(workdir: str, rope: str) -> dict:
  """The training summary of a run trained before (``--reuse_training``), from its
  metrics; its config must have the mode asked for."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise SystemExit(f"--reuse_training: {workdir} holds no trained run (no checkpoints/): "
                     "unpack the --train_only call's packed run there "
                     "(reproduce_reading.sh STAGE=eval)")
  with open(os.path.join(workdir, "config.json")) as f:
    trained_mode = json.load(f)["model"].get("rope_mode", "document")
  if trained_mode != rope:
    raise SystemExit(f"{workdir} was trained with rope_mode={trained_mode!r}, not {rope!r}: "
                     "unpack the right run there or leave out --reuse_training")
  summary = {"rope_mode": rope, "reused": workdir, **training_curve(workdir)}
  log(f"train ({rope}): reusing {workdir}, last step {last_step(summary)}")
  return summary


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def base_docs_of(cfg) -> int:
  """Documents of one training memory (315 for the tiny recipe's 16K tokens of 52-token
  documents)."""
  from msa_jax.data import from_config
  return int(from_config.make_task(cfg.data, 0).config.num_docs)


def relative_degradation(rows: list[dict], key: str) -> None:
  """Adds ``<key>_rel_degradation`` = (value at 1× − value) / value at 1× to each row."""
  base = next((r[key] for r in rows if r.get("multiplier") == 1 and key in r), None)
  for r in rows:
    if key in r and base:
      r[f"{key}_rel_degradation"] = (base - r[key]) / base


def predict_encode_seconds(done: list[tuple[int, float]], tokens: int) -> float:
  """Encode seconds for ``tokens``, from the last two sizes encoded: their marginal rate
  (the first size's time is mostly compiling) added to the last size's time."""
  (t1, s1), (t2, s2) = done[-2], done[-1]
  marginal = (t2 - t1) / (s2 - s1) if s2 > s1 and t2 > t1 else t2 / s2
  return s2 + max(tokens - t2, 0) / marginal


def corpus_source(workdir: str, cfg, num_docs: int) -> str:
  """The ``source`` a bank of the first ``num_docs`` documents of the run's shared corpus
  records in its manifest."""
  return f"write_task:{os.path.abspath(workdir)}:seed{cfg.seed}:{num_docs}"


def write_questions(cfg, root: str, base: int, num_questions: int) -> str:
  """``num_questions`` questions of the run's task whose gold documents are among the first
  ``base`` of its shared corpus, as ``ROOT/questions_<base>_<n>.jsonl`` (its path).
  Rewritten every call (a few rows): a file kept from another run's task would be scored
  against this run's answers."""
  from msa_jax.data import write_task
  questions = os.path.join(root, f"questions_{base}_{num_questions}.jsonl")
  write_task.write_jsonl(write_task.question_rows(cfg, base, cfg.seed, num_questions,
                                                  question_pool=base),
                         questions, num_questions, "questions", overwrite=True)
  return questions


def evaluate_sizes(workdir: str, root: str, multipliers: list[int], num_questions: int,
                   deadline: float, on_row, batch_size: int = 16,
                   keep_banks: bool = False, base_tokens: int = 0) -> list[dict]:
  """Encodes and evaluates a shared bank at each multiplier of ``base_tokens`` (0: the
  training memory), skipping sizes predicted not to fit before ``deadline``;
  ``on_row(rows)`` after each."""
  from msa_jax import evaluate
  from msa_jax.data import write_task
  from msa_jax.inference.checkpoint import (load_model, load_tokenizer, task_prefix,
                                            training_config)
  from msa_jax.inference.encode import Encoder, encode_documents
  cfg = training_config(workdir)
  corpus = write_task.SharedCorpus(write_task.kv_config_of(cfg), cfg.seed)
  doc_len = corpus.config.doc_length
  base = base_tokens // doc_len if base_tokens else base_docs_of(cfg)
  questions = write_questions(cfg, root, base, num_questions)
  model, params = load_model(workdir)
  tokenizer = load_tokenizer(workdir)
  prefix = task_prefix(workdir, tokenizer)
  encoder = Encoder(model, params, batch_tokens=262_144)   # one compile for every size
  rows: list[dict] = []
  done: list[tuple[int, float]] = []   # (tokens, encode seconds) of the sizes encoded
  last_eval_s = None
  for m in multipliers:
    n = m * base
    row = {"multiplier": m, "num_docs": n, "memory_tokens": n * doc_len}
    left = deadline - time.time()
    if n > corpus.capacity:
      row["skipped"] = (f"{n:,} documents exceed the task's {corpus.capacity:,} unique ids/keys")
    elif len(done) >= 2:
      predicted_encode = predict_encode_seconds(done, n * doc_len)
      predicted = 1.2 * predicted_encode + 1.5 * max(last_eval_s, 20.0) + 10.0
      row["predicted_seconds"] = predicted
      if predicted > left:
        row["skipped"] = (f"predicted {predicted:.0f}s (encode {predicted_encode:.0f}s from "
                          f"the sizes before, eval, margin) > {left:.0f}s left of --budget_s")
    if "skipped" in row:
      log(f"{m}x: skipped: {row['skipped']}")
      rows.append(row)
      on_row(rows)
      continue
    bank = os.path.join(root, "banks", f"{os.path.basename(workdir)}_{m}x")
    shutil.rmtree(bank, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = encode_documents(model, params, corpus.records, n, bank,
                                source=corpus_source(workdir, cfg, n),
                                tokenizer=tokenizer, prefix_tokens=prefix, encoder=encoder,
                                log=lambda s: log(s) if "100%" in s else None)
    encode_s = time.perf_counter() - t0
    rate = manifest["num_tokens"] / encode_s
    done.append((manifest["num_tokens"], encode_s))
    t0 = time.perf_counter()
    res = evaluate.run_bank(workdir, bank, questions,
                            out=os.path.join(root, f"eval_{os.path.basename(workdir)}_{m}x.json"),
                            batch_size=batch_size, max_new_tokens=int(cfg.eval.max_new_tokens))
    last_eval_s = time.perf_counter() - t0
    row.update({k: v for k, v in res.items() if k not in ("bank",)})
    row.update(encode_seconds=encode_s, encode_tokens_per_s=rate, eval_seconds=last_eval_s)
    rows.append(row)
    for key in ("answer_exact_match", "router_recall@1"):
      relative_degradation(rows, key)
    on_row(rows)
    if not keep_banks:
      shutil.rmtree(bank, ignore_errors=True)
  return rows


def plot(result: dict, path: str) -> None:
  """EM (routed, oracle) and recall@1 against bank tokens, one colour per RoPE mode."""
  from msa_jax import plots
  fig, (a, b) = plots.subplots(1, 2, figsize=(11, 4))
  colors = {"document": "C0", "global": "C3"}
  for mode, run in result["runs"].items():
    rows = [r for r in run.get("eval", []) if "answer_exact_match" in r]
    if not rows:
      continue
    x = [r["memory_tokens"] for r in rows]
    c = colors.get(mode, "C2")
    a.plot(x, [r["answer_exact_match"] for r in rows], "o-", color=c, label=f"{mode}: EM")
    a.plot(x, [r.get("oracle_answer_exact_match", float("nan")) for r in rows], "s:",
           color=c, alpha=0.6, label=f"{mode}: EM, oracle routing")
    b.plot(x, [r["router_recall@1"] for r in rows], "^-", color=c, label=f"{mode}: recall@1")
    k = next((key for key in rows[0] if key.startswith("router_recall@")
              and key != "router_recall@1" and not key.endswith("degradation")), None)
    if k:
      b.plot(x, [r[k] for r in rows], "v--", color=c, alpha=0.6, label=f"{mode}: {k[7:]}")
  for ax, title in ((a, "answer exact match"), (b, "router recall")):
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("shared bank tokens (training memory 16K)")
    ax.set_title(f"tiny reading recipe: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  plots.save(fig, path, dpi=110)


def write_result(result: dict, out_dir: str) -> str:
  """``out_dir/reading.json`` (through a partial file: a stop never leaves half of it) and
  ``reading.png``; returns the JSON's path."""
  out_json = os.path.join(out_dir, "reading.json")
  with open(out_json + ".partial", "w") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(out_json + ".partial", out_json)
  plot(result, os.path.join(out_dir, "reading.png"))
  return out_json


def merge_results(results: list[dict]) -> dict:
  """One result from several ``reading.json`` of the same trained runs (e.g. the 6104×
  size evaluated in a call of its own): each mode's bank rows by multiplier (a later file's
  row replaces an earlier one's), relative degradation recomputed against the 1× row.
  Refuses to mix runs of one RoPE mode whose trainings ended at different steps."""
  merged = {k: v for k, v in results[0].items() if k != "runs"}
  merged["merged_from"] = [r.get("argv") for r in results]
  merged["runs"] = {}
  for res in results:
    for mode, run in res.get("runs", {}).items():
      into = merged["runs"].setdefault(mode, {"train": run.get("train"), "eval": []})
      step = (run.get("train") or {}).get("final", {}).get("step")
      first = (into["train"] or {}).get("final", {}).get("step")
      if step != first:
        raise SystemExit(f"cannot merge {mode}: one file's run ends at step {first}, "
                         f"another's at {step}; merge evaluations of the same trained run")
      rows = {r["multiplier"]: r for r in into["eval"]}
      rows.update({r["multiplier"]: dict(r) for r in run.get("eval", [])})
      into["eval"] = [rows[m] for m in sorted(rows)]
  for run in merged["runs"].values():
    for key in ("answer_exact_match", "router_recall@1"):
      relative_degradation(run["eval"], key)
  return merged


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.environ.get("OUT") or "results/reading")
  ap.add_argument("--config", default=RECIPE, help="a kv recipe (tests: the smoke one)")
  ap.add_argument("--root", default="/tmp/reading", help="workdirs, questions, banks")
  ap.add_argument("--rope", default="document", help="document, global or both (comma list)")
  ap.add_argument("--budget_s", type=float, default=450.0,
                  help="wall seconds for everything; sizes that would not fit are skipped")
  ap.add_argument("--train_s", type=float, default=220.0, help="hard limit per training run")
  ap.add_argument("--multipliers", default="1,16,256,1024,6104",
                  help="bank sizes in multiples of --base_tokens; empty: no bank evaluation")
  ap.add_argument("--base_tokens", type=int, default=0,
                  help="bank sizes are multiples of this many tokens (0: the training memory)")
  ap.add_argument("--num_questions", type=int, default=64)
  ap.add_argument("--batch_size", type=int, default=16, help="questions decoded together")
  ap.add_argument("--train_args", default="", help="extra msa_jax.train flags (space list)")
  ap.add_argument("--keep_banks", action="store_true")
  ap.add_argument("--train_only", action="store_true",
                  help="train each mode and stop (the recipe's ~9 min and the evaluation do "
                       "not fit in one 10-minute GPU call: evaluate in a second one)")
  ap.add_argument("--reuse_training", action="store_true",
                  help="evaluate the runs a --train_only call left in ROOT/train_<mode> "
                       "(unpacked there) instead of training")
  ap.add_argument("--merge", default="",
                  help="comma list of reading.json files of the same trained runs: write "
                       "their rows as one OUT/reading.json and reading.png, and stop")
  args = ap.parse_args(argv)
  if args.merge:
    results = []
    for path in args.merge.split(","):
      with open(path) as f:
        results.append(json.load(f))
    os.makedirs(args.out, exist_ok=True)
    out_json = write_result(merge_results(results), args.out)
    log(f"merged {len(results)} files into {out_json} and reading.png")
    return
  deadline = time.time() + args.budget_s
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.root, exist_ok=True)
  modes = [m.strip() for m in args.rope.split(",") if m.strip()]
  for m in modes:
    if m not in ("document", "global"):
      raise SystemExit(f"--rope={args.rope}: each mode must be 'document' or 'global'")
  multipliers = [int(x) for x in args.multipliers.split(",") if x.strip()]
  # No JAX device in this process before the first training run (see _PARENT_PREALLOCATE).
  result = {"recipe": args.config, "argv": sys.argv, "budget_s": args.budget_s, "runs": {}}
  out_json = os.path.join(args.out, "reading.json")

  def save() -> None:
    write_result(result, args.out)

  for i, mode in enumerate(modes):
    workdir = os.path.join(args.root, f"train_{mode}")
    if args.reuse_training:
      run = {"train": reused_training(workdir, mode)}
    else:
      left = deadline - time.time()
      # Leave the other modes their share of the training time (and, unless only
      # training, this one's evaluation some).
      train_s = min(args.train_s, left - 30.0 * (len(modes) - i - args.train_only))
      if train_s < 60:
        result["runs"][mode] = {"skipped": f"only {left:.0f}s left for training"}
        save()
        continue
      run = {"train": train(workdir, mode, train_s, args.train_args.split(), args.config)}
    result["runs"][mode] = run
    save()
    health = os.path.join(workdir, "router_health.png")
    if os.path.exists(health):
      shutil.copy(health, os.path.join(args.out, f"router_health_{mode}.png"))
    if args.train_only:
      continue
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
      run["eval_error"] = "no checkpoint was saved; nothing to evaluate"
      save()
      continue
    # Evaluation of this mode may use the time up to the next mode's training share.
    mode_deadline = deadline - (len(modes) - i - 1) * (args.train_s + 60.0)

    def on_row(rows, run=run):
      run["eval"] = rows
      save()
      r = rows[-1]
      if "answer_exact_match" in r:
        log(f"{mode} {r['multiplier']}x ({r['memory_tokens']:,} tokens): EM "
            f"{r['answer_exact_match']:.3f} | R@1 {r['router_recall@1']:.3f} | oracle EM "
            f"{r.get('oracle_answer_exact_match', float('nan')):.3f} | encode "
            f"{r['encode_tokens_per_s']:,.0f} tok/s, {r['encode_seconds']:.0f}s | eval "
            f"{r['eval_seconds']:.0f}s | {deadline - time.time():.0f}s left")
    if "device" not in result:
      import jax
      result["device"], result["jax"] = str(jax.devices()[0].device_kind), jax.__version__
    try:
      evaluate_sizes(workdir, args.root, multipliers, args.num_questions, mode_deadline,
                     on_row, batch_size=args.batch_size, keep_banks=args.keep_banks,
                     base_tokens=args.base_tokens)
    except Exception as e:  # noqa: BLE001 - keep the other mode and what was written
      run["eval_error"] = f"{type(e).__name__}: {e}"
      traceback.print_exc()
      log(f"eval ({mode}) failed: {run['eval_error']}")
      save()
  save()
  log(f"wrote {out_json} and reading.png")


if __name__ == "__main__":
  main()
