r"""How fast the training data arrives: batches per second of each training stage of a
recipe, for several example-worker counts.

  python -m benchmarks.data_pipeline [--config=configs/16k_to_100m.py:tiny]
      [--workers=0,3,6] [--batches=100] [--stages=all|0,3] [--set data.kv.fact_gaps=6 ...]

The ``tiny`` recipe's reader stage was data-bound on the H200 (its steps took ~0.23 s
whatever the model's width: a step of the model takes milliseconds, 128 examples of
Python tens; configs/16k_to_100m.py), so its steps per second are at most the batches
per second measured here. For each stage (``from_config.training_stages``: a
stage starts wherever a memory, facts or batch curriculum does) and each worker count
(``data.worker_count``, capped by ``example_workers`` at half the CPU cores), the stage's
dataset (``from_config.make_train_iterator``, exactly what training reads) serves
``--warmup`` batches, then ``--batches`` timed ones: batches/s over the timed span and
the median ms between batches. With workers, the prefetch buffer fills during the
warm-up, so use enough timed batches (≥ 100) for the rate to be the workers' steady one.
``--set KEY=VALUE`` overrides a config field (VALUE as a Python literal, else a string).
Prints a table and writes ``data_pipeline.json`` to ``--out`` (default ``$OUT`` or
benchmarks/results).
"""
from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/16k_to_100m.py:tiny")
  p.add_argument("--workers", default="0,3,6", help="data.worker_count values to time")
  p.add_argument("--batches", type=int, default=100, help="timed batches per stage and count")
  p.add_argument("--warmup", type=int, default=5, help="batches served before timing")
  p.add_argument("--stages", default="all", help="stage indices (0 = first), or all")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. data.kv.fact_gaps=6 (repeatable)")
  p.add_argument("--out", default="", help="directory of data_pipeline.json")
  return p.parse_args(argv)


def apply_override(cfg, assignment: str) -> None:
  """``cfg.KEY = VALUE`` for ``KEY=VALUE`` (dotted KEY; VALUE a Python literal or a string)."""
  key, sep, raw = assignment.partition("=")
  if not sep or not key:
    raise ValueError(f"--set {assignment!r}: expected KEY=VALUE, e.g. data.kv.fact_gaps=6")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  from msa_jax.run_config import config_field
  try:
    node, leaf = config_field(cfg, key)
  except KeyError as missing:
    raise ValueError(f"--set {assignment!r}: the config has no field {missing}") from None
  setattr(node, leaf, value)


def time_batches(dataset, batches: int, warmup: int) -> dict:
  """Serves ``warmup`` then ``batches`` batches of ``dataset``; their rate and gaps."""
  it = iter(dataset)
  for _ in range(warmup):
    next(it)
  gaps_ms = []
  start = last = time.perf_counter()
  for _ in range(batches):
    next(it)
    now = time.perf_counter()
    gaps_ms.append((now - last) * 1e3)
    last = now
  span = last - start
  return {"batches_per_s": batches / span, "median_ms": statistics.median(gaps_ms),
          "max_ms": max(gaps_ms), "timed_batches": batches}


def measure(cfg, workers: list[int], batches: int, warmup: int, stages=None,
            log=print) -> list[dict]:
  """One row per (stage, worker count): the stage's shape and its measured rate."""
  from msa_jax.data import from_config
  shapes = from_config.training_stages(cfg.data, cfg.batch_size)
  chosen = range(len(shapes)) if stages is None else stages
  for index in chosen:
    if not 0 <= index < len(shapes):
      raise ValueError(f"stage {index} does not exist: the config has {len(shapes)} "
                       f"stage(s), 0..{len(shapes) - 1}")
  rows = []
  for count in workers:
    cfg.data.worker_count = count
    used = from_config.example_workers(count, verbose=False)
    iterator = from_config.make_train_iterator(
        cfg.data, seed=cfg.seed, batch_size=cfg.batch_size,
        chunk_size=cfg.model.pooling_chunk_size, verbose=False)
    for index in chosen:
      first, memory, facts, batch = shapes[index]
      start, dataset = iterator.stages[index]
      assert start == first, (start, first)
      timing = time_batches(dataset, batches, warmup)
      row = dict(stage=index, first_batch=first, batch_size=batch,
                 memory_tokens=memory if memory is not None else cfg.data.memory_tokens,
                 facts_per_doc=facts, workers_asked=count, workers_used=used, **timing,
                 examples_per_s=timing["batches_per_s"] * batch)
      rows.append(row)
      log(f"stage {index} (from batch {first}, batch {batch}, {row['memory_tokens']} memory "
          f"tokens, facts {facts}) workers {used}: {timing['batches_per_s']:.1f} batches/s, "
          f"median {timing['median_ms']:.1f} ms", flush=True)
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| stage | from batch | batch | memory | facts | workers | batches/s | examples/s "
           "| median ms | max ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['stage']} | {r['first_batch']} | {r['batch_size']} | "
                 f"{r['memory_tokens']} | {r['facts_per_doc']} | {r['workers_used']} | "
                 f"{r['batches_per_s']:.1f} | {r['examples_per_s']:.0f} | "
                 f"{r['median_ms']:.1f} | {r['max_ms']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = _parse(sys.argv[1:] if argv is None else argv)
  from benchmarks import out_dir, write_json
  from msa_jax.run_config import load_config_file
  cfg = load_config_file(args.config)
  for assignment in args.set:
    apply_override(cfg, assignment)
  workers = [int(w) for w in args.workers.split(",") if w.strip()]
  stages = None if args.stages == "all" else [int(s) for s in args.stages.split(",")]
  rows = measure(cfg, workers, args.batches, args.warmup, stages)
  print(table(rows))
  payload = {"config": args.config, "overrides": args.set, "cpu_count": os.cpu_count(),
             "rows": rows}
  path = os.path.join(args.out or out_dir(), "data_pipeline.json")
  write_json(path, payload)
  print(f"wrote {path}")
  return payload


if __name__ == "__main__":
  main()
