"""A run's saved config: ``config.json`` is written once, when a run starts, and never
rewritten; a resume is checked against it.

A resume whose config differs from the saved one only in the fields of
``MAY_CHANGE_ON_RESUME`` (or in fields one side lacks: a key added or removed by a
newer version of the code) goes ahead; any other difference is refused with the list
of differences unless the caller accepts it (``--allow_config_change``). Either
way the new config is recorded beside the original as ``config.<step>.json`` (the
config that trained from ``<step>`` on), after the restore succeeded; the next
resume is compared with the newest record.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

from msa_jax.config import COMPUTE_SWITCHES

CONFIG_FILE = "config.json"

# Fields that do not change what the saved steps mean: run length (``num_steps`` also
# re-shapes the main phase's cosine anneal, which ends at ``num_steps``), logging, the
# device mesh, the compilation cache, evaluation and checkpoint cadence. A dotted prefix
# covers a sub-config.
MAY_CHANGE_ON_RESUME = (
    "num_steps", "log_every_steps", "tensorboard", "mesh_shape", "logical_axis_rules",
    "compilation_cache_dir", "xla_flags", "eval.", "checkpoint.every_steps",
    "checkpoint.max_to_keep",
    "checkpoint.async_save",
    # Implementation switches: the same parameters and the same function of them (and its
    # gradient), computed another way (config.COMPUTE_SWITCHES: remat, layer scan, kernels).
    *(f"model.{name}" for name in COMPUTE_SWITCHES),
    # The same gradient in slices (in-batch routing negatives then come from each slice).
    "microbatches",
)
_ABSENT = "(absent)"


class ConfigChangeError(ValueError):
  """A resume with a config that differs from the run's saved ``config.json``."""


def run_config_dict(cfg, model_cfg) -> dict[str, Any]:
  """The JSON form of a training config, ``model`` replaced by the resolved ``ModelConfig``
  (e.g. ``vocab_size=0`` by the size used), so the workdir loads on its own."""
  config = json.loads(cfg.to_json_best_effort())
  config["model"] = model_cfg.to_dict()
  return config


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict) and d:
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def may_change_text() -> str:
  return ", ".join(f + "*" if f.endswith(".") else f for f in MAY_CHANGE_ON_RESUME)


def may_change(key: str) -> bool:
  """Whether ``key`` (dotted) may differ between a run's saved config and a resume."""
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in MAY_CHANGE_ON_RESUME)


def differences(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """``(dotted key, saved value, new value)`` for every leaf that differs (JSON-normalised)."""
  a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(new)))
  return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _format(diffs) -> str:
  return "\n".join(f"  {k}: saved {json.dumps(old)} -> now {json.dumps(new)}"
                   for k, old, new in diffs)


def saved_config_path(workdir: str) -> Optional[str]:
  """The config the run was last trained with: its newest ``config.<step>.json`` record,
  else ``config.json``; None for a new workdir."""
  records = {}
  if os.path.isdir(workdir):
    for name in os.listdir(workdir):
      m = re.fullmatch(r"config\.(\d+)\.json", name)
      if m:
        records[int(m.group(1))] = os.path.join(workdir, name)
  if records:
    return records[max(records)]
  path = os.path.join(workdir, CONFIG_FILE)
  return path if os.path.exists(path) else None


def read_saved(workdir: str) -> Optional[dict]:
  """The config of ``saved_config_path``, or None where the workdir has none."""
  path = saved_config_path(workdir)
  if path is None:
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigChangeError(f"{path} is not valid JSON ({e}); it describes the run's saved "
                            "steps, so it is never rewritten: restore it from a backup or "
                            "start a new --workdir") from None


def check_resume(workdir: str, new: dict, *, allow_change: bool) -> list[tuple[str, Any, Any]]:
  """The differences of ``new`` from the saved config of the run being resumed.

  Raises ``ConfigChangeError`` listing them when any is outside ``MAY_CHANGE_ON_RESUME``
  and ``allow_change`` is False. Writes nothing.
  """
  saved = read_saved(workdir)
  if saved is None:
    return []
  diffs = differences(saved, new)
  # A field on one side only comes from another version of the code (a key added or
  # removed since the run started), not from the user: recorded, not refused.
  refused = [d for d in diffs if not may_change(d[0]) and _ABSENT not in (d[1], d[2])]
  if refused and not allow_change:
    path = saved_config_path(workdir)
    raise ConfigChangeError(
        f"resuming {workdir} with a config that differs from its saved {path} in "
        f"{len(refused)} field(s) that change what the saved steps mean:\n{_format(refused)}\n"
        "Nothing was changed in the workdir. Resume with the run's own config (drop those "
        "overrides), start a new --workdir, or pass --allow_config_change to accept the "
        "change (it is recorded as config.<step>.json; config.json is kept). Fields that may "
        f"change on resume: {may_change_text()}")
  return diffs


def write_initial(workdir: str, config: dict) -> bool:
  """Writes ``config.json`` of a new run (atomically); an existing one is never replaced.
  Returns whether it wrote."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    return False
  _write_json(path, config)
  return True


def record_change(workdir: str, step: int, config: dict, diffs) -> str:
  """Writes ``config.<step>.json``: the config that trains on from ``step`` (after a restore)."""
  path = os.path.join(workdir, f"config.{step}.json")
  _write_json(path, config)
  print(f"config: resumed at step {step} with {len(diffs)} change(s) from {CONFIG_FILE}, "
        f"recorded in {path}:\n{_format(diffs)}", flush=True)
  return path


def _write_json(path: str, obj: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def load_config_file(spec: str):
  """The ConfigDict of a config string ``path.py[:arg]``, as ``--config`` reads it
  (``get_config(arg)``, or ``get_config()`` without an arg)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config {spec!r}: no file {path} (paths are relative to the "
                            "current directory; run from the repository root)")
  module_spec = importlib.util.spec_from_file_location(
      "config_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_"), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_field(cfg, key: str):
  """``(node, leaf)`` of a dotted config key, so that ``node[leaf]`` is the field (e.g.
  ``data.kv.fact_gaps``); a ``KeyError`` names the first part the config lacks."""
  parts = key.split(".")
  parent, node = None, cfg
  for depth, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      raise KeyError(".".join(parts[:depth + 1]))
    parent, node = node, node[part]
  return parent, parts[-1]
