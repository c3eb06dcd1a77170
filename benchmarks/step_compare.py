"""``benchmarks/train_step.py --compare``: several sets of model switches timed one after
another in one process on one batch. Parses the sets and gives each timed row its step time
over the first set's (``step_vs_first``)."""
from __future__ import annotations


def compare_sets(spec: str, switches) -> list[tuple[str, dict]]:
  """``--compare``'s sets as ``[(label, {field: value})]`` (``[("", {})]`` without one);
  ``switches``: the model fields a set may name (``cli_model_overrides``' keys)."""
  if not spec.strip():
    return [("", {})]
  sets = []
  for label in (s.strip() for s in spec.split(";")):
    fields = {}
    for item in (i.strip() for i in label.split(",") if i.strip() and label != "base"):
      key, eq, value = item.partition("=")
      if not eq or key not in switches:
        raise ValueError(f"--compare: {item!r} is not field=value for one of "
                         f"{sorted(switches)}; separate sets with ';', fields with ','")
      fields[key] = {"true": True, "false": False}.get(value.lower(), value)
    sets.append((label, fields))
  return sets


def add_compare_ratios(rows: list[dict]) -> None:
  """Each timed row's ``step_vs_first``: its step time over the first compared set's at
  the same variant, memory, scan and batch (from ``--compare``; absent without it)."""
  first = {}
  for r in rows:
    if "step_s" not in r or not r.get("compare"):
      continue
    key = (r["variant"], r["memory_tokens"], r["scan_layers"], r["batch"])
    first.setdefault(key, r["step_s"])
    r["step_vs_first"] = r["step_s"] / first[key]
