"""Where the device time goes: a table of the kernels of a profiled region.

  python -m benchmarks.profile_summary /path/to/profile_dir [--top 25] [--calls 1]

Benchmarks record a region with :func:`profile_calls` (``jax.profiler`` trace, read back
through ``jax.profiler.ProfileData``) and print :func:`format_summary`'s table: device
time per kernel name (XLA fusions, cuBLAS/cuDNN calls, Pallas kernels) per call, count,
share of the device busy time, and the busy time against the wall span of the device
events, so a slow step or prefill says which kernels to look at without a profiler UI.
Only the device's stream lines count (memcpy lines and the derived "XLA Ops"/"XLA
Modules" lines would count the same work twice); a CPU trace has no device plane and
gives an empty table.
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import re


def find_trace(profile_dir: str) -> str:
  """The newest ``*.xplane.pb`` under ``profile_dir``; an error naming the directory."""
  paths = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no profiler trace (*.xplane.pb) under {profile_dir}: record one "
                            "with benchmarks.profile_summary.profile_calls")
  return max(paths, key=os.path.getmtime)


def _is_device_plane(name: str) -> bool:
  return name.startswith(("/device:GPU", "/device:TPU"))


def _is_kernel_line(name: str) -> bool:
  """A stream line that runs kernels: "Stream #14(Compute,MemcpyD2D,Memset)" is one,
  "Stream #15(MemcpyH2D)" (transfers only) is not."""
  lower = name.lower()
  if "stream" not in lower:
    return False
  kinds = lower.partition("(")[2].rstrip(")").split(",")
  return any(k.strip() and not k.strip().startswith(("memcpy", "memset")) for k in kinds) \
      or "(" not in lower


def aggregate(planes, calls: int = 1, top: int | None = 25) -> dict:
  """The kernel table of profiler planes (``ProfileData.planes`` or objects with the same
  ``name`` / ``lines`` / ``events`` / ``start_ns`` / ``duration_ns`` attributes).

  Returns ``{"device_events", "planes" (each plane's first line names: what an empty table
  saw), "device_busy_ms", "span_ms", "rows": [{"name", "ms", "count", "share"}],
  "other_ms", "hlo_ops": [{"hlo_op", "ms", "count"}] (the time by the HLO instruction
  each kernel ran for, where its stats say: :func:`event_hlo_op`), "kernel_hlo_ops":
  [{"name", "hlo_op" (None if unsaid), "ms"}] (by both), "kernel_stat_sample" (the first
  kernels' stats, to see what a trace holds)}``, times per call (divided by ``calls``):
  ``rows`` are the ``top`` kernels by total time (None: every kernel), ``share`` their
  fraction of the busy time, ``span_ms`` from the first kernel's start to the last one's
  end over all calls, divided by ``calls`` (busy / span shows the device idle: launch or
  host bound).
  """
  # ProfileData's planes, lines and events are iterators: read each once.
  planes = [(p.name, list(p.lines)) for p in planes]
  total = collections.Counter()
  count = collections.Counter()
  op_total = collections.Counter()      # by the HLO instruction a kernel ran for
  op_count = collections.Counter()
  pair_total = collections.Counter()    # by (kernel name, HLO instruction)
  stat_sample = {}
  start, end = float("inf"), float("-inf")
  for plane_name, lines in planes:
    if not _is_device_plane(plane_name):
      continue
    for line in lines:
      if not _is_kernel_line(line.name):
        continue
      for ev in line.events:
        total[ev.name] += ev.duration_ns
        count[ev.name] += 1
        start, end = min(start, ev.start_ns), max(end, ev.start_ns + ev.duration_ns)
        stats = list(getattr(ev, "stats", None) or ())
        if ev.name not in stat_sample and len(stat_sample) < 3:
          stat_sample[ev.name] = [(str(k), str(v)[:160]) for k, v in stats]
        op = event_hlo_op(stats)
        pair_total[(ev.name, op)] += ev.duration_ns
        if op:
          op_total[op] += ev.duration_ns
          op_count[op] += 1
  busy = sum(total.values())
  planes_seen = {name: [line.name for line in lines][:12] for name, lines in planes}
  per_call = lambda ns: ns / 1e6 / calls  # noqa: E731  ns → ms per call
  rows = [{"name": n, "ms": per_call(ns), "count": count[n] // calls,
           "share": ns / busy if busy else 0.0} for n, ns in total.most_common()]
  hlo_ops = [{"hlo_op": op, "ms": per_call(ns), "count": op_count[op] // calls}
             for op, ns in op_total.most_common()]
  return top_rows({"device_events": bool(total), "planes": planes_seen,
                   "device_busy_ms": per_call(busy),
                   "span_ms": per_call(end - start) if total else 0.0, "rows": rows,
                   "hlo_ops": hlo_ops, "kernel_stat_sample": stat_sample,
                   "kernel_hlo_ops": [{"name": n, "hlo_op": op, "ms": per_call(ns)}
                                      for (n, op), ns in pair_total.most_common()]}, top)


_HLO_OP_IN_TEXT = re.compile(r"hlo_op=([^,#\s]+)")


def event_hlo_op(stats) -> str | None:
  """The HLO instruction a device kernel ran for, from its profiler stats: an ``hlo_op``
  stat, or ``hlo_op=NAME`` inside a string stat (the XLA kernel annotation); None if
  neither (the trace does not say)."""
  for key, value in stats:
    if key == "hlo_op":
      return str(value)
    if isinstance(value, str) and "hlo_op=" in value:
      m = _HLO_OP_IN_TEXT.search(value)
      if m:
        return m.group(1)
  return None


def top_rows(summary: dict, top: int | None) -> dict:
  """``summary`` with its ``top`` longest kernels as ``rows`` (None: all) and the time of
  the others as ``other_ms``."""
  rows = summary["rows"][:top]
  return dict(summary, rows=rows,
              other_ms=summary["device_busy_ms"] - sum(r["ms"] for r in rows))


def summarize(profile_dir: str, calls: int = 1, top: int | None = 25) -> dict:
  """:func:`aggregate` of the newest trace under ``profile_dir`` (its path as ``trace``)."""
  from jax.profiler import ProfileData
  path = find_trace(profile_dir)
  return dict(aggregate(ProfileData.from_file(path).planes, calls, top), trace=path)


def format_summary(summary: dict, title: str = "") -> str:
  """The table :func:`aggregate` describes, as text (times per call)."""
  head = f"{title} " if title else ""
  if not summary["device_events"]:
    seen = "; ".join(f"{p}: {', '.join(lines) or 'no lines'}"
                     for p, lines in summary.get("planes", {}).items())
    return (f"{head}no device kernels in the trace ({summary.get('trace', '')}); planes and "
            f"their first lines: {seen or 'none'}")
  lines = [f"{head}device busy {summary['device_busy_ms']:.3f} ms per call over a span of "
           f"{summary['span_ms']:.3f} ms ({summary.get('trace', '')})",
           f"  {'kernel':72s} {'ms/call':>9s} {'count':>6s} {'share':>6s}"]
  for r in summary["rows"]:
    lines.append(f"  {r['name'][:72]:72s} {r['ms']:9.3f} {r['count']:6d} "
                 f"{100 * r['share']:5.1f}%")
  lines.append(f"  {'(the rest)':72s} {summary['other_ms']:9.3f}")
  return "\n".join(lines)


_HLO_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def describe_kernels(hlo_text: str, names) -> dict:
  """What each profiled kernel is in the compiled program: ``{kernel: "shape op ...
  (op_name)"}`` for the kernels named after an HLO instruction (XLA names a fusion's
  kernel after the instruction, ``.`` → ``_``; library kernels such as cuBLAS's have other
  names and are left out)."""
  want = set(names)
  found = {}
  for raw, body in _hlo_index(hlo_text)[0].items():
    name = raw.replace(".", "_")
    if name in want and name not in found:
      op = _OP_NAME.search(body)
      head = body.split(", metadata=")[0].split(", backend_config=")[0]
      found[name] = head[:160] + (f"  [{op.group(1)[-120:]}]" if op else "")
  return found


_WRAPPER = re.compile(r"^(jit|pjit|jvp|transpose|vmap|checkpoint|remat|custom_jvp_call|"
                      r"custom_vjp_call|while|cond|scan|body|cond_fun|body_fun|closed_call|"
                      r"core_call|shard_map|xla_pmap|pmap)\b")


def op_category(op_name: str) -> str:
  """A kernel's place in the model, from its HLO ``op_name``: the last two components of
  the source path with transformation wrappers (``jit(..)``, ``jvp(..)``, ``while/body``),
  layer numbers (``layers_17.active`` → ``active``) and module prefixes dropped, and
  ``[bwd]`` where the op is under ``transpose(..)`` (the backward pass). For example
  ``jit(step)/transpose(jvp(MSAModel.forward_train))/layers_3._finish/mlp/mul`` →
  ``mlp/mul [bwd]``."""
  bwd = "transpose(" in op_name
  parts = []
  for part in op_name.split("/"):
    if not part or _WRAPPER.match(part):
      continue
    part = re.sub(r"^layers_\d+\.?", "", part) or part   # layers_3._finish -> _finish
    part = re.sub(r"^[A-Z]\w*\.", "", part)              # MSAModel._logits -> _logits
    parts.append(part)
  name = "/".join(parts[-2:]) if parts else "(no source)"
  return f"{name} [bwd]" if bwd else name


def _kernel_op_names(hlo_text: str) -> dict:
  """``{kernel name: op_name}`` of every instruction of a compiled program that has one."""
  out = {}
  for name, body in _hlo_index(hlo_text)[0].items():
    op = _OP_NAME.search(body)
    if op:
      out.setdefault(name.replace(".", "_"), op.group(1))
  return out


def by_source_op(rows, hlo_text: str, top: int = 30) -> list[dict]:
  """Device time grouped by where each kernel comes from in the model (:func:`op_category`
  of its HLO instruction's ``op_name``): ``[{"op", "ms", "kernels", "share"}]``, largest
  first. A kernel is placed by the HLO instruction its profiler stats name (``rows`` from
  :func:`aggregate`'s ``kernel_hlo_ops``: cuBLAS's ``nvjet_*`` and copies too), else by its
  own name (XLA names a fusion's kernel after its instruction); the rest are grouped by
  their name's first word. ``rows``: all of them (``top=None``) for a complete account."""
  ops = _kernel_op_names(hlo_text)
  total = collections.Counter()
  kernels = collections.Counter()
  for r in rows:
    op = ops.get(r["name"])
    if r.get("hlo_op"):
      op = ops.get(r["hlo_op"].lstrip("%").replace(".", "_"), op)
    cat = op_category(op) if op else "(library) " + re.split(r"[_\d]", r["name"], maxsplit=1)[0]
    total[cat] += r["ms"]
    kernels[cat] += 1
  busy = sum(total.values())
  return [{"op": c, "ms": ms, "kernels": kernels[c], "share": ms / busy if busy else 0.0}
          for c, ms in total.most_common(top)]


def format_by_source_op(groups: list[dict]) -> str:
  """:func:`by_source_op`'s table as text."""
  lines = [f"  {'by source op':72s} {'ms/call':>9s} {'kernels':>7s} {'share':>6s}"]
  for g in groups:
    lines.append(f"  {g['op'][:72]:72s} {g['ms']:9.3f} {g['kernels']:7d} "
                 f"{100 * g['share']:5.1f}%")
  return "\n".join(lines)


_SHAPE = re.compile(r"^\(?\s*\w+\[([\d,]*)\]")
_OPERANDS = re.compile(r"\b(?:dot|custom-call)\(([^)]*)\)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_GEMM_TARGET = re.compile(r'custom_call_target="__cublas\$(?:gemm|lt\$matmul)[^"]*"')
_CUSTOM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
_DOT_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")


def _dims(shape_text: str) -> list[int] | None:
  """``[d0, d1, ...]`` of an HLO result ``bf16[4096,1024]{1,0}`` (a tuple: its first)."""
  m = _SHAPE.match(shape_text.strip())
  return None if m is None else [int(x) for x in m.group(1).split(",") if x]


@functools.lru_cache(maxsize=2)
def _hlo_index(hlo_text: str):
  """``(defs {name: body}, computations {name: [bodies]})`` of a program's HLO text
  (instruction names are unique within a module); parsed once for every reader of the
  same program's text."""
  defs, comps, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    c = _COMPUTATION.match(line)
    if c and "=" not in line.split("(")[0]:
      current = c.group(1)
      continue
    m = _HLO_DEF.match(line)
    if m:
      defs[m.group(1)] = m.group(2)
      if current:
        comps[current].append(m.group(2))
  return defs, comps


def gemm_flops(body: str, defs: dict, comps: dict) -> tuple[float, str] | None:
  """``(flops, "M x K x N")`` of an instruction that is a matmul: a cuBLAS custom call, a
  ``dot``, or a fusion whose computation holds one (XLA's Triton GEMMs); None otherwise.
  FLOPs: 2 · (output elements) · (the contracted size), from the operand and output
  shapes and the contracting dimensions."""
  if " fusion(" in body:
    called = _CALLS.search(body)
    for inner in comps.get(called.group(1), []) if called else []:
      if " dot(" in inner:
        return gemm_flops(inner, defs, comps)
    return None
  is_custom = _GEMM_TARGET.search(body)
  if not is_custom and " dot(" not in body:
    return None
  out, ops = _dims(body), _OPERANDS.search(body)
  contracting = (_CUSTOM_CONTRACTING if is_custom else _DOT_CONTRACTING).search(body)
  if out is None or ops is None or contracting is None:
    return None
  lhs = re.search(r"%?([\w.\-]+)\s*(?:,|$)", ops.group(1).strip())  # shapes may precede names
  lhs_dims = _dims(defs.get(lhs.group(1), "")) if lhs else None
  if lhs_dims is None:
    return None
  k = 1
  for c in re.findall(r"\d+", contracting.group(1)):
    k *= lhs_dims[int(c)]
  n_out = 1
  for x in out:
    n_out *= x
  rows = n_out // out[-1] if out else 1
  return 2.0 * n_out * k, f"{rows} x {k} x {out[-1] if out else 1}"


def gemm_table(hlo_ops, hlo_text: str) -> list[dict]:
  """The matmuls among profiled HLO instructions (:func:`aggregate`'s ``hlo_ops``), each
  with its rate: ``[{"hlo_op", "op", "dims", "count", "ms", "tflops"}]``, longest first;
  ``op`` is :func:`op_category` of its source and ``dims`` rows x contracted x columns of
  one call (a scanned layer's matmul runs once a layer: ``count`` of them a step)."""
  defs, comps = _hlo_index(hlo_text)
  out = []
  for r in hlo_ops:
    body = defs.get(r["hlo_op"].lstrip("%"))
    found = gemm_flops(body, defs, comps) if body else None
    if not found or r["ms"] <= 0:
      continue
    flops, dims = found
    src = _OP_NAME.search(body)
    out.append({"hlo_op": r["hlo_op"], "op": op_category(src.group(1)) if src else "(no source)",
                "dims": dims, "count": r["count"], "ms": r["ms"],
                "tflops": flops * r["count"] / r["ms"] / 1e9})
  return out


def format_gemm_table(rows: list[dict], top: int = 20) -> str:
  """:func:`gemm_table` as text, with the matmuls' total time and rate."""
  if not rows:
    return "  (no matmul among the kernels' HLO instructions)"
  ms = sum(r["ms"] for r in rows)
  tflop = sum(r["tflops"] * r["ms"] / 1e3 for r in rows)
  lines = [f"  matmuls: {ms:.3f} ms/call at {tflop / ms * 1e3:.0f} TFLOP/s over {len(rows)} "
           f"instructions; the longest:",
           f"  {'source op':44s} {'rows x K x cols':>26s} {'count':>5s} {'ms/call':>9s} "
           f"{'TFLOP/s':>8s}"]
  for r in rows[:top]:
    lines.append(f"  {r['op'][:44]:44s} {r['dims']:>26s} {r['count']:5d} {r['ms']:9.3f} "
                 f"{r['tflops']:8.0f}")
  return "\n".join(lines)


def profile_calls(fn, profile_dir: str, calls: int = 3, title: str = "", top: int = 25,
                  log=print, hlo_text: str = "") -> dict:
  """Runs ``fn()`` once to warm up, then ``calls`` times under the profiler into
  ``profile_dir``, logs the table and returns it. ``fn`` must block until its result is
  ready (``jax.block_until_ready``). ``hlo_text``: the compiled program
  (``compiled.as_text()``); each kernel it defines is logged with its HLO instruction."""
  import jax
  fn()
  os.makedirs(profile_dir, exist_ok=True)
  # No Python tracer: it slowed a 36-layer prefill's three profiled calls by over a minute.
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  jax.profiler.start_trace(profile_dir, profiler_options=options)
  try:
    for _ in range(calls):
      fn()
  finally:
    jax.profiler.stop_trace()
  every_kernel = summarize(profile_dir, calls, top=None)     # the trace, read once
  summary = top_rows(every_kernel, top)
  summary["calls"] = calls
  log(format_summary(summary, f"{title} ({calls} calls):" if title else f"({calls} calls):"))
  if hlo_text:
    summary["hlo"] = describe_kernels(hlo_text, [r["name"] for r in summary["rows"]])
    for name, what in summary["hlo"].items():
      log(f"    {name}: {what}")
    placed = every_kernel["kernel_hlo_ops"] if every_kernel["hlo_ops"] else every_kernel["rows"]
    summary["by_source_op"] = by_source_op(placed, hlo_text)
    if summary["by_source_op"]:
      log(format_by_source_op(summary["by_source_op"]))
    summary["gemms"] = gemm_table(every_kernel["hlo_ops"], hlo_text)
    if every_kernel["hlo_ops"]:
      log(format_gemm_table(summary["gemms"]))
    elif every_kernel["device_events"]:
      log(f"  (the kernels carry no hlo_op; their stats, e.g.: "
          f"{every_kernel['kernel_stat_sample']})")
  return summary


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("profile_dir")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--calls", type=int, default=1, help="calls the trace holds (per-call times)")
  args = ap.parse_args()
  print(format_summary(summarize(args.profile_dir, args.calls, args.top)))


if __name__ == "__main__":
  main()
