"""Where the device time goes: a table of the kernels of a profiled region, from its trace.

  python -m benchmarks.profile_summary /path/to/profile_dir [--top 25]

Benchmarks record a region with :func:`trace` (``jax.profiler.trace`` writing a Perfetto
trace) and print :func:`summarize`'s table: device time per kernel name (XLA fusions,
cuBLAS/cuDNN calls, Pallas kernels), count, share of the device busy time, and the busy
time against the wall span, so a slow step or prefill says which kernels to look at
without a profiler UI. Only device (GPU/TPU) events count; on a CPU the table lists the
host's XLA ops instead (useful to check the tool, not for timing).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os


def find_trace(profile_dir: str) -> str:
  """The newest Perfetto trace (``*.trace.json.gz`` / ``perfetto_trace.json.gz``) under
  ``profile_dir``; an error naming the directory when there is none."""
  paths = [p for pattern in ("**/*.trace.json.gz", "**/perfetto_trace.json.gz")
           for p in glob.glob(os.path.join(profile_dir, pattern), recursive=True)]
  if not paths:
    raise FileNotFoundError(f"no Perfetto trace under {profile_dir}: record one with "
                            "benchmarks.profile_summary.trace(dir) (create_perfetto_trace)")
  return max(paths, key=os.path.getmtime)


def _events(path: str) -> list[dict]:
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def summarize(profile_dir: str, top: int = 25) -> dict:
  """Device kernels of the newest trace under ``profile_dir``, by total time.

  Returns ``{"trace", "device_busy_ms", "span_ms", "rows": [{"name", "ms", "count",
  "share"}], "other_ms"}``: ``rows`` are the ``top`` kernels by total duration, ``share``
  their fraction of the busy time; ``span_ms`` runs from the first device event's start
  to the last one's end (busy / span shows idle gaps: launch or host bound).
  """
  path = find_trace(profile_dir)
  events = _events(path)
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, n in names.items()
                 if any(tag in n for tag in ("/device:GPU", "/device:TPU", "GPU:", "TPU:"))
                 and "host" not in n.lower()}
  pids = device_pids or set(names)        # a CPU trace: every process (host XLA ops)
  # A device process also holds derived lines ("XLA Modules", "XLA Ops") that repeat the
  # kernels of its stream lines: count the streams only, where there are any.
  threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in pids}
  streams = {key for key, n in threads.items() if "stream" in n.lower()}
  total = collections.Counter()
  count = collections.Counter()
  start, end = float("inf"), float("-inf")
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in pids or "dur" not in e:
      continue
    if streams and (e["pid"], e.get("tid")) not in streams:
      continue
    dur = float(e["dur"])                  # microseconds
    total[e["name"]] += dur
    count[e["name"]] += 1
    start, end = min(start, float(e["ts"])), max(end, float(e["ts"]) + dur)
  busy = sum(total.values())
  rows = [{"name": n, "ms": us / 1e3, "count": count[n], "share": us / busy if busy else 0.0}
          for n, us in total.most_common(top)]
  return {"trace": path, "device_events": bool(device_pids), "device_busy_ms": busy / 1e3,
          "span_ms": (end - start) / 1e3 if busy else 0.0,
          "other_ms": (busy - sum(r["ms"] * 1e3 for r in rows)) / 1e3, "rows": rows}


def format_summary(summary: dict, title: str = "") -> str:
  """The table :func:`summarize` describes, as text."""
  kind = "device" if summary["device_events"] else "host (no device events in the trace)"
  lines = [f"{title}{' ' if title else ''}{kind} busy {summary['device_busy_ms']:.2f} ms over a "
           f"span of {summary['span_ms']:.2f} ms ({summary['trace']})",
           f"  {'kernel':70s} {'ms':>9s} {'count':>6s} {'share':>6s}"]
  for r in summary["rows"]:
    lines.append(f"  {r['name'][:70]:70s} {r['ms']:9.3f} {r['count']:6d} {100 * r['share']:5.1f}%")
  lines.append(f"  {'(the rest)':70s} {summary['other_ms']:9.3f}")
  return "\n".join(lines)


@contextlib.contextmanager
def trace(profile_dir: str):
  """``jax.profiler.trace`` into ``profile_dir`` with a Perfetto trace for :func:`summarize`."""
  import jax
  os.makedirs(profile_dir, exist_ok=True)
  with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
    yield


def profile_calls(fn, profile_dir: str, calls: int = 3, title: str = "", top: int = 25,
                  log=print) -> dict:
  """Runs ``fn()`` once to warm up, then ``calls`` times under :func:`trace`, and logs the
  table. ``fn`` must block until its result is ready (``jax.block_until_ready``)."""
  fn()
  with trace(profile_dir):
    for _ in range(calls):
      fn()
  summary = summarize(profile_dir, top)
  summary["calls"] = calls
  log(format_summary(summary, f"{title} ({calls} calls):" if title else f"({calls} calls):"))
  return summary


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("profile_dir")
  ap.add_argument("--top", type=int, default=25)
  args = ap.parse_args()
  print(format_summary(summarize(args.profile_dir, args.top)))


if __name__ == "__main__":
  main()
