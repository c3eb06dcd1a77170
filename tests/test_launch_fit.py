"""launch.fit: known exponents are recovered from synthetic data within the bootstrap
interval, with and without scipy; the CLI path writes a JSON and a PNG."""
import json
import os

import numpy as np
import pytest

from launch import fit


def _power_data(seed, n=12, a=300.0, b=-0.25, noise=0.03):
  rng = np.random.default_rng(seed)
  x = np.geomspace(1e12, 1e17, n)
  return x, a * x ** b * np.exp(rng.normal(0, noise, n))


def _saturating_data(seed, n=12, a=0.6, b=-0.4, c=0.3, noise=0.01):
  rng = np.random.default_rng(seed)
  x = np.geomspace(1e4, 1e8, n)
  return x, c + a * (x / 1e4) ** b + rng.normal(0, noise, n)


def test_power_law_recovers_exponent_within_ci():
  x, y = _power_data(0)
  f = fit.fit_law(x, y, "power", bootstrap=400)
  lo, hi = f.ci["b"]
  assert lo < -0.25 < hi and hi - lo < 0.05
  assert f.ci["a"][0] < 300.0 < f.ci["a"][1]
  assert f.params["b"] == pytest.approx(-0.25, abs=0.01) and f.r2 > 0.99
  # Exact data: exact parameters.
  exact = fit.fit_law(x, 2.0 * x ** -0.3, "power", bootstrap=20)
  assert exact.params["a"] == pytest.approx(2.0, rel=1e-9)
  assert exact.params["b"] == pytest.approx(-0.3, abs=1e-12)


def test_power_law_interval_covers_truth_most_of_the_time():
  hits = 0
  for seed in range(20):
    x, y = _power_data(seed, noise=0.05)
    lo, hi = fit.fit_law(x, y, "power", bootstrap=200, seed=seed).ci["b"]
    hits += lo < -0.25 < hi
  assert hits >= 15        # a 95% interval from 12 points: ~17-19 of 20 expected


@pytest.mark.parametrize("use_scipy", [False, True])
def test_saturating_law_recovers_parameters(use_scipy):
  if use_scipy:
    pytest.importorskip("scipy.optimize")
  x, y = _saturating_data(1)
  f = fit.fit_law(x, y, "saturating", bootstrap=300, use_scipy=use_scipy)
  for key, true in (("b", -0.4), ("c", 0.3), ("a", 0.6 * 1e4 ** 0.4)):
    lo, hi = f.ci[key]
    assert lo < true < hi, (key, lo, true, hi)
  assert f.params["b"] == pytest.approx(-0.4, abs=0.05)
  exact = fit.fit_law(x, 0.9 - 0.2 * x ** -0.5, "saturating", bootstrap=10,
                      use_scipy=use_scipy)
  assert exact.params["b"] == pytest.approx(-0.5, abs=1e-4)
  assert exact.params["c"] == pytest.approx(0.9, abs=1e-5)
  assert exact.params["a"] == pytest.approx(-0.2, rel=1e-3)


def test_numpy_and_scipy_paths_agree():
  pytest.importorskip("scipy.optimize")
  x, y = _saturating_data(2)
  a = fit.fit_law(x, y, "saturating", bootstrap=0, use_scipy=False).params
  b = fit.fit_law(x, y, "saturating", bootstrap=0, use_scipy=True).params
  for k in a:
    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6)


def test_bad_inputs_name_the_fix():
  with pytest.raises(ValueError, match="needs at least 4 distinct x"):
    fit.fit_law([1, 2, 3], [1, 2, 3], "saturating")
  with pytest.raises(ValueError, match="use --law=saturating"):
    fit.fit_law([1, 2, 3], [1, -2, 3], "power")
  with pytest.raises(ValueError, match="choose one of"):
    fit.fit_law([1, 2, 3], [1, 2, 3], "linear")


def _records(tmp_path):
  """A results.jsonl of two RoPE modes, each evaluated at 6 memory sizes, plus model sizes."""
  rows = []
  mem = np.geomspace(1e4, 1e8, 6)
  for mode, b in (("document", -0.1), ("global", -0.5)):
    evals = [{"memory_tokens": float(m), "answer_exact_match": 0.4 + 0.5 * (m / 1e4) ** b}
             for m in mem]
    rows.append({"run": f"rope={mode}", "overrides": {"model.rope_mode": mode},
                 "eval": evals, "final": {"loss": 1.0}, "compute": 1.0, "params": 1,
                 "tokens": 1.0})
  for i, c in enumerate(np.geomspace(1e12, 1e15, 5)):
    # The tail means follow the law; the final rows (one noisy batch each) do not.
    rows.append({"run": f"size{i}", "overrides": {"model.hidden_size": 64 * (i + 1)},
                 "eval": [], "final": {"loss": float(50 * c ** -0.1) * (1.2 if i % 2 else 0.8)},
                 "tail": {"loss": float(50 * c ** -0.1)}, "compute": float(c),
                 "params": 1, "tokens": 1.0})
  path = tmp_path / "results.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_run_writes_json_and_png_per_group(tmp_path):
  path = _records(tmp_path)
  out = fit.run(path, "memory_tokens", "answer_exact_match", group_by="model.rope_mode",
                where={}, bootstrap=50)
  assert out["law"] == "saturating"
  assert set(out["fits"]) == {"model.rope_mode=document", "model.rope_mode=global"}
  assert out["fits"]["model.rope_mode=document"]["params"]["b"] == pytest.approx(-0.1, abs=1e-3)
  assert out["fits"]["model.rope_mode=global"]["params"]["b"] == pytest.approx(-0.5, abs=1e-3)
  stem = tmp_path / "fit_answer_exact_match_vs_memory_tokens"
  assert json.loads((tmp_path / (stem.name + ".json")).read_text())["x"] == "memory_tokens"
  assert os.path.getsize(str(stem) + ".png") > 10_000

  out = fit.run(path, "compute", "loss", where={"model.rope_mode": "None"}, bootstrap=50,
                out=str(tmp_path / "loss"))
  assert out["law"] == "power" and len(out["fits"]["all"]["points"]) == 5
  assert out["fits"]["all"]["params"]["b"] == pytest.approx(-0.1, abs=1e-9)
  assert out["y_from"] == "tail"
  final = fit.run(path, "compute", "loss", where={"model.rope_mode": "None"}, bootstrap=50,
                  out=str(tmp_path / "loss_final"), y_from="final")
  ys = [p["y"] for p in final["fits"]["all"]["points"]]
  assert ys[1] / ys[0] > 1.2 and final["fits"]["all"]["r2"] < 0.9    # the noisy rows
  with pytest.raises(ValueError, match="choose one of"):
    fit.run(path, "compute", "loss", y_from="best")
  records = [json.loads(l) for l in open(path)]
  for r in records:
    r.pop("tail", None)
  old = tmp_path / "old.jsonl"
  old.write_text("".join(json.dumps(r) + "\n" for r in records))
  with pytest.raises(ValueError, match="--y_from=final"):
    fit.run(str(old), "compute", "loss", where={"model.rope_mode": "None"})
  with pytest.raises(ValueError, match="pairs with an eval metric"):
    fit.run(path, "memory_tokens", "loss")
  with pytest.raises(FileNotFoundError, match="--collect"):
    fit.run(str(tmp_path / "none.jsonl"), "compute", "loss")
