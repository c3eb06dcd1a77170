r"""Fits a scaling law to a sweep's results, with bootstrap confidence intervals.

  python -m launch.fit --results=runs/model_size/results.jsonl --x=compute --y=loss
  python -m launch.fit --results=runs/rope_mode/results.jsonl --x=memory_tokens \
      --y=answer_exact_match --group_by=model.rope_mode

Laws (``--law``; default: ``power`` for losses (any y named *loss*), ``saturating`` for
accuracies):
  power       y = a · x^b               (least squares on log y against log x)
  saturating  y = c + a · x^b, b < 0    (y tends to c: accuracy against memory size,
                                         loss against compute with an irreducible part)
The saturating law is fitted by profiling b: for each b the best (c, a) is a linear
least-squares solve; b itself is found by a bounded 1-D search (scipy's
``minimize_scalar`` when scipy is installed, a numpy golden-section search
otherwise). Confidence intervals: percentiles of refits on ``--bootstrap``
resamples of the points. Writes ``OUT.json`` (parameters, intervals, points) and
``OUT.png`` (points, fit, 95% band); ``OUT`` defaults to ``fit_<y>_vs_<x>`` beside
the results.

x: ``compute`` (6 · params · tokens), ``params``, ``tokens`` (one point per run; y from
the mean of the logged rows over the last 10 % of the run's steps, ``--y_from=tail``, the
default, or the final row alone, ``--y_from=final``; for eval metrics, the eval row at 1×
memory) or ``memory_tokens`` (one point per run and evaluated memory size).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np

X_KEYS = ("compute", "params", "tokens", "memory_tokens")
Y_FROM = ("tail", "final")
EVAL_KEYS = ("answer_exact_match", "router_recall@1", "router_recall@5",
             "oracle_answer_exact_match")
LAWS = ("power", "saturating")
_B_RANGE = (-4.0, -1e-3)


@dataclasses.dataclass
class Fit:
  """A fitted law: ``params`` (a, b[, c]), their bootstrap ``ci`` (low, high), and R²."""
  law: str
  params: dict[str, float]
  ci: dict[str, tuple[float, float]]
  r2: float
  x0: float   # x is scaled by x0 inside the fit; params are in the original units
  draws: list = dataclasses.field(default_factory=list, repr=False)   # bootstrap refits

  def predict(self, x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    y = self.params["a"] * x ** self.params["b"]
    return y + self.params["c"] if self.law == "saturating" else y

  def formula(self) -> str:
    p = self.params
    if self.law == "power":
      return f"y = {p['a']:.4g} · x^{p['b']:.4f}"
    return f"y = {p['c']:.4g} + {p['a']:.4g} · x^{p['b']:.4f}"


def _fit_power(u: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(a, b) of y = a·u^b by least squares in log space; needs y > 0."""
  b, log_a = np.polyfit(np.log(u), np.log(y), 1)
  return float(np.exp(log_a)), float(b)


def _linear_given_b(u, y, b) -> tuple[float, float, float]:
  """Best (c, a) of y = c + a·u^b for a fixed b, and the squared error."""
  basis = np.stack([np.ones_like(u), u ** b], axis=1)
  (c, a), *_ = np.linalg.lstsq(basis, y, rcond=None)
  err = float(np.sum((basis @ np.asarray([c, a]) - y) ** 2))
  return float(c), float(a), err


def _golden_min(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-6) -> float:
  g = (math.sqrt(5) - 1) / 2
  a, b = lo, hi
  c, d = b - g * (b - a), a + g * (b - a)
  fc, fd = f(c), f(d)
  while b - a > tol:
    if fc < fd:
      b, d, fd = d, c, fc
      c = b - g * (b - a)
      fc = f(c)
    else:
      a, c, fc = c, d, fd
      d = a + g * (b - a)
      fd = f(d)
  return (a + b) / 2


def _fit_saturating(u, y, use_scipy: bool) -> tuple[float, float, float]:
  """(a, b, c) of y = c + a·u^b with b in _B_RANGE (b profiled; (c, a) linear given b)."""
  def err(b):
    return _linear_given_b(u, y, b)[2]
  grid = np.linspace(*_B_RANGE, 80)   # a coarse scan first: the profile can have two dips
  i = int(np.argmin([err(b) for b in grid]))
  lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
  if use_scipy:
    from scipy.optimize import minimize_scalar
    b = float(minimize_scalar(err, bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-7}).x)
  else:
    b = _golden_min(err, lo, hi)
  c, a, _ = _linear_given_b(u, y, b)
  return a, b, c


def _scipy_available() -> bool:
  try:
    import scipy.optimize  # noqa: F401
    return True
  except ImportError:
    return False


def fit_law(x: Sequence[float], y: Sequence[float], law: str = "power", *,
            bootstrap: int = 1000, seed: int = 0, use_scipy: Optional[bool] = None,
            level: float = 0.95) -> Fit:
  """Fits ``law`` to (x, y) and bootstrap ``level`` intervals over resampled points."""
  if law not in LAWS:
    raise ValueError(f"law {law!r}: choose one of {LAWS}")
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
  x, y = x[keep], y[keep]
  need = 2 if law == "power" else 3          # parameters; one more point leaves a residual
  if len(np.unique(x)) < need + 1:
    raise ValueError(f"a {law} law needs at least {need + 1} distinct x values with finite y; "
                     f"got {len(np.unique(x))} (add points to the sweep)")
  if law == "power" and np.any(y <= 0):
    raise ValueError("a power law needs y > 0 (log space); use --law=saturating")
  use_scipy = _scipy_available() if use_scipy is None else use_scipy
  x0 = float(np.exp(np.mean(np.log(x))))   # fit on u = x / x0: well-conditioned powers

  def solve(u, yy) -> dict[str, float]:
    if law == "power":
      a, b = _fit_power(u, yy)
      return {"a": a * x0 ** (-b), "b": b}
    a, b, c = _fit_saturating(u, yy, use_scipy)
    return {"a": a * x0 ** (-b), "b": b, "c": c}

  params = solve(x / x0, y)
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(bootstrap):
    idx = rng.integers(0, len(x), len(x))
    if len(np.unique(x[idx])) < need:
      continue
    try:
      draws.append(solve(x[idx] / x0, y[idx]))
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
      continue
  alpha = (1 - level) / 2 * 100
  ci = {k: (float(np.percentile([d[k] for d in draws], alpha)),
            float(np.percentile([d[k] for d in draws], 100 - alpha))) if draws else
        (float("nan"), float("nan")) for k in params}
  fit = Fit(law, params, ci, float("nan"), x0, draws)
  resid = y - fit.predict(x)
  total = float(np.sum((y - y.mean()) ** 2))
  fit.r2 = 1 - float(np.sum(resid ** 2)) / total if total > 0 else float("nan")
  return fit


# ----------------------------------------------------------------------- results → points

def points_from_results(records: list[dict], x_key: str, y_key: str,
                        where: Optional[dict] = None, y_from: str = "tail") -> list[dict]:
  """``[{"x", "y", "run", "overrides"}]`` of the finished runs (filtered by ``where``);
  a training metric's y from the run's ``tail`` means or its ``final`` row (``y_from``)."""
  if x_key not in X_KEYS:
    raise ValueError(f"--x={x_key}: choose one of {X_KEYS}")
  if y_from not in Y_FROM:
    raise ValueError(f"--y_from={y_from}: choose one of {Y_FROM}")
  out = []
  for r in records:
    if where and any(str(r["overrides"].get(k)) != str(v) for k, v in where.items()):
      continue
    if x_key == "memory_tokens":
      if y_key not in EVAL_KEYS:
        raise ValueError(f"--x=memory_tokens pairs with an eval metric {EVAL_KEYS}, not "
                         f"{y_key!r}")
      for e in r.get("eval", []):
        out.append({"x": e["memory_tokens"], "y": e.get(y_key), "run": r["run"],
                    "overrides": r["overrides"]})
      continue
    if y_key in EVAL_KEYS and r.get("eval"):
      y = r["eval"][0].get(y_key)
    elif y_from == "tail" and "tail" not in r:
      raise ValueError(f"run {r['run']!r} has no tail means (results collected before "
                       "launch.results wrote them): re-collect with `python -m launch.sweep "
                       "--sweep=... --collect`, or fit its final row with --y_from=final")
    else:
      y = r.get(y_from, {}).get(y_key)
    out.append({"x": r.get(x_key), "y": y, "run": r["run"], "overrides": r["overrides"]})
  missing = [p["run"] for p in out if p["x"] is None or p["y"] is None]
  if missing:
    raise ValueError(f"runs {missing} have no {x_key!r} or {y_key!r} (an eval metric needs "
                     "eval.at_end; tokens/compute need metrics with tokens_per_step)")
  return out


def load_results(path: str) -> list[dict]:
  """The records of a ``results.jsonl`` (``launch.results``)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run the sweep (or python -m launch.sweep "
                            "--sweep=... --collect) first")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot(groups: dict[str, tuple[list[dict], Fit]], x_key: str, y_key: str, path: str,
         title: str = "") -> None:
  """Points, fitted curve and its 95% bootstrap band per group; log x (and log y for power)."""
  from msa_jax import plots
  fig, ax = plots.subplots(figsize=(6.4, 4.2))
  for i, (name, (pts, fit)) in enumerate(groups.items()):
    color = f"C{i}"
    xs = np.asarray([p["x"] for p in pts], np.float64)
    ax.plot(xs, [p["y"] for p in pts], "o", color=color)
    grid = np.geomspace(xs.min() / 1.3, xs.max() * 1.3, 200)
    label = (f"{name}: " if name else "") + fit.formula() + \
        f"\n  b = {fit.params['b']:.3f} [{fit.ci['b'][0]:.3f}, {fit.ci['b'][1]:.3f}]"
    ax.plot(grid, fit.predict(grid), "-", color=color, label=label)
    if fit.draws:
      curves = np.stack([Fit(fit.law, d, {}, 0, fit.x0).predict(grid) for d in fit.draws])
      ax.fill_between(grid, *np.percentile(curves, [2.5, 97.5], axis=0), color=color,
                      alpha=0.15, lw=0)
  ax.set_xscale("log")
  if all(f.law == "power" for _, f in groups.values()):
    ax.set_yscale("log")
  ax.set_xlabel(x_key + (" (FLOPs, 6·N·D)" if x_key == "compute" else ""))
  ax.set_ylabel(y_key)
  ax.set_title(title or f"{y_key} against {x_key}")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  plots.save(fig, path)


def run(results_path: str, x_key: str, y_key: str, *, law: Optional[str] = None,
        group_by: Optional[str] = None, where: Optional[dict] = None, out: Optional[str] = None,
        bootstrap: int = 1000, seed: int = 0, y_from: str = "tail") -> dict:
  """Fits every group; writes ``out``.json and ``out``.png; returns the JSON dict."""
  law = law or ("power" if "loss" in y_key else "saturating")
  pts = points_from_results(load_results(results_path), x_key, y_key, where, y_from)
  grouped: dict[str, list[dict]] = {}
  for p in pts:
    name = f"{group_by}={p['overrides'].get(group_by)}" if group_by else ""
    grouped.setdefault(name, []).append(p)
  fits = {name: (g, fit_law([p["x"] for p in g], [p["y"] for p in g], law,
                            bootstrap=bootstrap, seed=seed)) for name, g in grouped.items()}
  out = out or os.path.join(os.path.dirname(os.path.abspath(results_path)),
                            f"fit_{y_key.replace('@', '_at_')}_vs_{x_key}")
  result = {"results": results_path, "x": x_key, "y": y_key, "y_from": y_from, "law": law,
            "where": where or {},
            "group_by": group_by, "bootstrap": bootstrap, "fits": {}}
  for name, (g, fit) in fits.items():
    result["fits"][name or "all"] = {
        "formula": fit.formula(), "params": fit.params,
        "ci95": {k: list(v) for k, v in fit.ci.items()}, "r2": fit.r2,
        "points": [{"x": p["x"], "y": p["y"], "run": p["run"]} for p in g]}
    print(f"{name or 'all'}: {fit.formula()} | R² {fit.r2:.3f} | " + " | ".join(
        f"{k} 95% CI [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in fit.ci.items()), flush=True)
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2)
  plot(fits, x_key, y_key, out + ".png")
  print(f"wrote {out}.json and {out}.png", flush=True)
  return result


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  where = dict(kv.split("=", 1) for kv in (f.where or []))
  run(f.results, f.x, f.y, law=f.law, group_by=f.group_by, where=where, out=f.out,
      bootstrap=f.bootstrap, seed=f.seed, y_from=f.y_from)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("results", None, "A sweep's results.jsonl.", required=True)
  flags.DEFINE_enum("x", "compute", list(X_KEYS), "The x axis.")
  flags.DEFINE_string("y", "loss", "A final metric (loss, lm_loss, router_recall@1, ...) or an "
                      "eval metric (answer_exact_match, router_recall@1 at 1× memory).")
  flags.DEFINE_enum("y_from", "tail", list(Y_FROM), "A training metric's y: the mean of the "
                    "logged rows over the last 10% of steps (tail) or the final row.")
  flags.DEFINE_enum("law", None, list(LAWS), "Default: power for losses, saturating else.")
  flags.DEFINE_string("group_by", None, "An override key: one fit per value.")
  flags.DEFINE_list("where", None, "key=value filters on the overrides.")
  flags.DEFINE_string("out", None, "Output path without extension.")
  flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples.")
  flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
  app.run(main)
