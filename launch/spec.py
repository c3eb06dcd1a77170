"""A sweep is data: a base config string, points (a grid or a list of overrides) and resources.

A sweep file (``configs/sweeps/NAME.py``) defines ``get_sweep(arg: str = "") -> dict``;
``--sweep=FILE:ARG`` passes ``ARG`` (e.g. ``smoke`` for the smallest setting). Keys:

  name       the sweep's folder under ``--root``
  config     the ``--config`` string of ``msa_jax.train`` (``configs/x.py:variant``)
  fixed      overrides applied to every point (optional)
  grid       ``{key: [values...]}``: every combination is a point, and/or
  points     ``[{key: value, ...}, ...]``: the points themselves; an entry may be
             ``{"overrides": {...}, "resources": {...}}`` to give that point its own
             resources
  resources  defaults for every point (optional): ``nodes``, ``gpus_per_node``,
             ``cpus_per_task``, ``time`` (SLURM ``HH:MM:SS``), ``partition``, ``tpu_type``

Keys are ``msa_jax.train`` config fields (``model.top_k``); each point runs
``python -m msa_jax.train --config=CONFIG --workdir=ROOT/NAME/RUN --config.KEY=VALUE ...``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
import sys
from typing import Any

DEFAULT_RESOURCES = {"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 8, "time": "04:00:00",
                     "partition": "", "tpu_type": ""}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SWEEP_KEYS = {"name", "config", "fixed", "grid", "points", "resources", "description"}


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its folder name, its overrides (``fixed`` included) and resources."""
  name: str
  overrides: dict[str, Any]
  resources: dict[str, Any]

  @property
  def num_processes(self) -> int:
    """Processes of a multi-host run: one per GPU on every node."""
    return int(self.resources["nodes"]) * max(int(self.resources["gpus_per_node"]), 1)


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  config: str
  points: list[Point]
  source: str
  description: str = ""


def flag_value(value: Any) -> str:
  """A Python value as ``--config.key=`` text that ml_collections parses back to it."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def run_name(overrides: dict[str, Any], varying: list[str]) -> str:
  """``key=value,...`` over the keys that vary between points (all keys if none vary)."""
  keys = varying or sorted(overrides)
  name = ",".join(f"{k}={flag_value(overrides[k])}" for k in keys if k in overrides)
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name) or "default"


def _split_path(spec: str) -> tuple[str, str]:
  path, _, arg = spec.partition(":")
  return path, arg


def load_sweep(spec: str) -> Sweep:
  """The checked ``Sweep`` of ``PATH[:ARG]``; errors name the file and the key to fix."""
  path, arg = _split_path(spec)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--sweep={spec}: no file {path}; sweep files live in "
                            "configs/sweeps/")
  if _REPO not in sys.path:   # sweep files import configs.sweeps._common
    sys.path.insert(0, _REPO)
  mod_name = "sweep_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  module_spec = importlib.util.spec_from_file_location(mod_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path}: define get_sweep(arg='') returning the sweep dict")
  raw = module.get_sweep(arg) if arg else module.get_sweep()
  sweep = sweep_from_dict(raw, source=spec)
  check_overrides(sweep)
  return sweep


def _load_config(config: str):
  """The ConfigDict of a ``--config`` string ``path.py[:arg]`` (as ``msa_jax.train`` loads it)."""
  from msa_jax.run_config import load_config_file
  path = config.partition(":")[0]
  if not os.path.exists(path):
    raise FileNotFoundError(f"sweep config {config!r}: no file {path} (paths are relative to "
                            "the repository root; run from there)")
  return load_config_file(config)


def check_overrides(sweep: Sweep) -> None:
  """Every override names a field of the sweep's config that the command line can set."""
  from msa_jax.run_config import config_field
  cfg = _load_config(sweep.config)
  for key in sorted({k for p in sweep.points for k in p.overrides}):
    try:
      node, leaf = config_field(cfg, key)
    except KeyError:
      raise ValueError(f"{sweep.source}: override {key!r} is not a field of {sweep.config}; "
                       "check the spelling (fields: configs/*.py)") from None
    if node[leaf] is None:
      raise ValueError(f"{sweep.source}: {key!r} defaults to None in {sweep.config}, which "
                       "--config.KEY=VALUE cannot override; drop it or give the recipe a "
                       "typed default")


def sweep_from_dict(raw: dict, source: str = "<dict>") -> Sweep:
  """Checks a sweep dict and expands its grid/points into ``Point``s."""
  unknown = set(raw) - _SWEEP_KEYS
  if unknown:
    raise ValueError(f"{source}: unknown sweep keys {sorted(unknown)}; allowed: "
                     f"{sorted(_SWEEP_KEYS)}")
  for key in ("name", "config"):
    if not raw.get(key):
      raise ValueError(f"{source}: get_sweep() must return a non-empty '{key}'")
  if "grid" not in raw and "points" not in raw:
    raise ValueError(f"{source}: give a 'grid' ({{key: [values]}}) or 'points' "
                     "([{key: value}]) of overrides")
  defaults = dict(DEFAULT_RESOURCES)
  bad = set(raw.get("resources", {})) - set(DEFAULT_RESOURCES)
  if bad:
    raise ValueError(f"{source}: unknown resources {sorted(bad)}; allowed: "
                     f"{sorted(DEFAULT_RESOURCES)}")
  defaults.update(raw.get("resources", {}))
  fixed = dict(raw.get("fixed", {}))

  entries: list[tuple[dict, dict]] = []
  grid = raw.get("grid") or {}
  empty = [k for k, v in grid.items() if not isinstance(v, (list, tuple)) or not v]
  if empty:
    raise ValueError(f"{source}: grid entries {empty} need a non-empty list of values")
  if grid:
    keys = sorted(grid)
    grid_points = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
  else:
    grid_points = [{}]
  listed = raw.get("points") or [{}]
  for base in grid_points:
    for entry in listed:
      if "overrides" in entry or "resources" in entry:
        extra = set(entry) - {"overrides", "resources"}
        if extra:
          raise ValueError(f"{source}: a point with 'overrides'/'resources' cannot also "
                           f"have {sorted(extra)}; move them into 'overrides'")
        over, res = dict(entry.get("overrides", {})), dict(entry.get("resources", {}))
      else:
        over, res = dict(entry), {}
      bad = set(res) - set(DEFAULT_RESOURCES)
      if bad:
        raise ValueError(f"{source}: unknown point resources {sorted(bad)}")
      entries.append(({**fixed, **base, **over}, {**defaults, **res}))

  varying = sorted({k for o, _ in entries for k in o
                    if len({repr(e.get(k)) for e, _ in entries}) > 1})
  points = [Point(run_name(o, varying), o, r) for o, r in entries]
  seen: dict[str, int] = {}
  for p in points:
    seen[p.name] = seen.get(p.name, 0) + 1
  dup = [n for n, c in seen.items() if c > 1]
  if dup:
    raise ValueError(f"{source}: points {dup} appear more than once (same overrides); "
                     "remove the duplicates")
  return Sweep(raw["name"], raw["config"], points, source, raw.get("description", ""))


def train_command(sweep: Sweep, point: Point, root: str, python: str = sys.executable
                  ) -> list[str]:
  """The argv that trains ``point`` in ``ROOT/NAME/RUN`` (resumes when that run exists)."""
  return ([python, "-m", "msa_jax.train", f"--config={sweep.config}",
           f"--workdir={workdir(sweep, point, root)}"]
          + [f"--config.{k}={flag_value(v)}" for k, v in sorted(point.overrides.items())])


def sweep_dir(sweep: Sweep, root: str) -> str:
  return os.path.join(root, sweep.name)


def workdir(sweep: Sweep, point: Point, root: str) -> str:
  return os.path.join(root, sweep.name, point.name)
