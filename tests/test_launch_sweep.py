"""launch.spec / launch.sweep / the local runner / launch.results: every sweep file's
dry run, sweep-file errors, skipping and resuming, and results.jsonl/csv.

The local runner is exercised with a stand-in for ``python`` that writes what a
training run writes (no training), so these tests take seconds.
"""
import csv
import glob
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from launch import results
from launch.runners import local
from launch.spec import flag_value, load_sweep, sweep_from_dict, train_command, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FILES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "sweeps", "*.py"))
                     if not os.path.basename(p).startswith("_"))


def _rel(path):
  return os.path.relpath(path, REPO)


@pytest.mark.parametrize("path", [_rel(p) for p in SWEEP_FILES])
def test_dry_run_of_every_sweep_file_lists_its_runs(path, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  for arg in ("", ":smoke"):
    sweep = load_sweep(path + arg)
    assert local.run(sweep, str(tmp_path), dry_run=True) == {}
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    assert len(lines) == len(sweep.points) >= 2
    for line, point in zip(lines, sweep.points):
      assert point.name in line and "(not started)" in line
      assert f"--workdir={tmp_path}/{sweep.name}/{point.name}" in line
      for key, value in point.overrides.items():
        assert f"--config.{key}={flag_value(value)}" in line
  assert not os.listdir(tmp_path), "a dry run wrote files"


@pytest.mark.parametrize("path", [_rel(p) for p in SWEEP_FILES])
def test_every_sweep_point_passes_the_trainers_checks(path, monkeypatch):
  """Each point's config (the recipe with its overrides) passes ``validate_config``: e.g. a
  60-step point must not inherit a 150-step router warm-up, nor a batch curriculum whose
  stages it never leaves."""
  from msa_jax.trainer import validate_config
  from launch.spec import _load_config
  monkeypatch.chdir(REPO)
  for arg in ("", ":smoke"):
    sweep = load_sweep(path + arg)
    for point in sweep.points:
      cfg = _load_config(sweep.config)
      with cfg.unlocked():
        for key, value in point.overrides.items():
          node = cfg
          *parents, leaf = key.split(".")
          for part in parents:
            node = node[part]
          node[leaf] = value
      validate_config(cfg)
      from msa_jax.data import from_config
      stages = from_config.training_stages(cfg.data, cfg.batch_size)
      if sweep.name == "memory_cost":   # one stage: what the timed steps measure
        assert len(stages) == 1, stages


def test_sweep_cli_dry_run(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "launch.sweep", "--sweep=configs/sweeps/rope_mode.py:smoke",
       "--runner=local", "--dry_run", f"--root={tmp_path}"], cwd=REPO, capture_output=True,
      text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "sweep rope_mode_smoke: 2 point(s)" in out.stdout
  assert out.stdout.count("-m msa_jax.train --config=configs/16k_to_100m.py:smoke") == 2
  assert "--config.model.rope_mode=global" in out.stdout
  assert not os.listdir(tmp_path)


def test_smoke_sweeps_are_small():
  """Every ``:smoke`` setting is a short CPU run (the issue's 'runnable locally')."""
  for path in SWEEP_FILES:
    if "smoke_topk" in path:
      continue
    for p in load_sweep(path + ":smoke").points:
      assert p.overrides["num_steps"] <= 100 and p.overrides["batch_size"] <= 8, path


def test_grid_points_fixed_and_resources():
  sweep = sweep_from_dict({
      "name": "s", "config": "c.py:x", "fixed": {"num_steps": 5},
      "grid": {"model.top_k": [1, 2]},
      "points": [{"data.num_docs": 8},
                 {"overrides": {"data.num_docs": 16}, "resources": {"gpus_per_node": 4}}],
      "resources": {"time": "01:00:00"}})
  assert [p.name for p in sweep.points] == [
      "data.num_docs=8,model.top_k=1", "data.num_docs=16,model.top_k=1",
      "data.num_docs=8,model.top_k=2", "data.num_docs=16,model.top_k=2"]
  assert all(p.overrides["num_steps"] == 5 for p in sweep.points)
  assert [p.resources["gpus_per_node"] for p in sweep.points] == [1, 4, 1, 4]
  assert all(p.resources["time"] == "01:00:00" for p in sweep.points)
  assert sweep.points[1].num_processes == 4
  argv = train_command(sweep, sweep.points[0], "runs", python="py")
  assert argv[:5] == ["py", "-m", "msa_jax.train", "--config=c.py:x",
                      "--workdir=runs/s/data.num_docs=8,model.top_k=1"]
  assert flag_value((1, 4)) == "(1,4)" and flag_value((1,)) == "(1,)"


@pytest.mark.parametrize("raw, match", [
    ({"config": "c.py", "grid": {"a": [1]}}, "non-empty 'name'"),
    ({"name": "s", "config": "c.py"}, "give a 'grid'"),
    ({"name": "s", "config": "c.py", "grid": {"a": []}}, r"grid entries \['a'\]"),
    ({"name": "s", "config": "c.py", "grid": {"a": [1]}, "gird": 1}, "unknown sweep keys"),
    ({"name": "s", "config": "c.py", "points": [{"a": 1}, {"a": 1}]}, "more than once"),
    ({"name": "s", "config": "c.py", "points": [{"a": 1}], "resources": {"gpu": 2}},
     "unknown resources"),
])
def test_bad_sweep_dicts_name_the_fix(raw, match):
  with pytest.raises(ValueError, match=match):
    sweep_from_dict(raw)


def test_overrides_are_checked_against_the_recipe(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text(textwrap.dedent("""
      def get_sweep(arg=""):
        return {"name": "bad", "config": "configs/16k_to_100m.py:smoke",
                "grid": {"model.top_kk": [1, 2]}}"""))
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    with pytest.raises(ValueError, match="'model.top_kk' is not a field"):
      load_sweep(str(path))
    path.write_text(path.read_text().replace("model.top_kk", "model.router_layers"))
    with pytest.raises(ValueError, match="defaults to None"):
      load_sweep(str(path))
  finally:
    os.chdir(cwd)
  with pytest.raises(FileNotFoundError, match="configs/sweeps"):
    load_sweep(str(tmp_path / "missing.py"))


# ----------------------------------------------------------------- local runner, results

FAKE_TRAIN = textwrap.dedent("""\
    #!{python}
    # Stands in for `python -m msa_jax.train`: logs its argv, writes config.json and
    # metrics.jsonl like a run of NUM steps (resuming after what is there), and eval.json.
    import json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[3:])
    wd = args["workdir"]
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "argv.log"), "a") as f:
      f.write(json.dumps(sys.argv[1:]) + "\\n")
    with open(os.path.join(wd, "devices.log"), "a") as f:
      f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "-") + "\\n")
    if os.environ.get("FAIL_RUN") and os.environ["FAIL_RUN"] in wd:
      sys.exit(3)
    num_steps = int(args.get("config.num_steps", 4))
    width = int(args.get("config.model.hidden_size", 64))
    json.dump({{"num_steps": num_steps, "eval": {{"at_end": True}},
               "model": {{"vocab_size": 128, "hidden_size": width, "intermediate_size": 4 * width,
                         "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8}}}},
              open(os.path.join(wd, "config.json"), "w"))
    path = os.path.join(wd, "metrics.jsonl")
    done = sum(1 for _ in open(path)) if os.path.exists(path) else 0
    stop = int(os.environ.get("STOP_AT", num_steps))
    with open(path, "a") as f:
      for step in range(done + 1, min(num_steps, stop) + 1):
        f.write(json.dumps({{"step": step, "loss": 10.0 / width, "tokens_per_step": 100.0,
                             "router_recall@1": 0.5, "grad_norm_per_layer": [1.0]}}) + "\\n")
    if stop >= num_steps:
      json.dump({{"rows": [{{"memory_tokens": 64, "answer_exact_match": 0.75}},
                           {{"memory_tokens": 256, "answer_exact_match": 0.5}}]}},
                open(os.path.join(wd, "eval.json"), "w"))
    """)


@pytest.fixture
def fake_python(tmp_path):
  path = tmp_path / "fake_python"
  path.write_text(FAKE_TRAIN.format(python=sys.executable))
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def _sweep():
  return sweep_from_dict({"name": "toy", "config": "configs/16k_to_100m.py:smoke",
                          "fixed": {"num_steps": 4},
                          "grid": {"model.hidden_size": [32, 64, 128]}})


def _argv_log(sweep, point, root):
  with open(os.path.join(workdir(sweep, point, root), "argv.log")) as f:
    return [json.loads(l) for l in f]


def test_local_runner_skips_finished_and_resumes_unfinished(tmp_path, fake_python, monkeypatch,
                                                            capsys):
  sweep, root = _sweep(), str(tmp_path / "runs")
  monkeypatch.setenv("STOP_AT", "2")          # every run stops half way ("preempted")
  codes = local.run(sweep, root, python=fake_python, poll_s=0.05)
  assert codes == {p.name: 0 for p in sweep.points}
  assert all(results.status(workdir(sweep, p, root)) == "unfinished" for p in sweep.points)
  monkeypatch.delenv("STOP_AT")
  codes = local.run(sweep, root, python=fake_python, parallel=2, poll_s=0.05)
  out = capsys.readouterr().out
  assert out.count("resuming") == 3
  for p in sweep.points:
    wd = workdir(sweep, p, root)
    assert results.status(wd) == "finished"
    assert [r["step"] for r in results.metric_rows(wd)] == [1, 2, 3, 4]
    assert len(_argv_log(sweep, p, root)) == 2           # started, then resumed once
    with open(os.path.join(wd, results.POINT_FILE)) as f:
      record = json.load(f)
    assert record["overrides"] == p.overrides and record["runner"] == "local"
    assert record["commit"] == results.git_commit() != "unknown"
    assert [l["runner"] for l in record["launches"]] == ["local", "local"]   # start, resume
  codes = local.run(sweep, root, python=fake_python, poll_s=0.05)
  assert codes == {} and capsys.readouterr().out.count("finished, skipping") == 3


def test_one_point_per_device(tmp_path, fake_python):
  sweep = sweep_from_dict({"name": "dev", "config": "c.py", "fixed": {"num_steps": 2},
                           "points": [{"a": 1}, {"a": 2}, {"a": 3},
                                      {"overrides": {"a": 4}, "resources": {"gpus_per_node": 2}}]})
  root = str(tmp_path / "runs")
  codes = local.run(sweep, root, python=fake_python, devices=["0", "1"], poll_s=0.05)
  assert set(codes.values()) == {0}
  seen = []
  for p in sweep.points:
    with open(os.path.join(workdir(sweep, p, root), "devices.log")) as f:
      seen.append(f.read().split())
    with open(os.path.join(workdir(sweep, p, root), "train.log")) as f:
      f.read()                                   # each parallel run logs to its workdir
  assert all(s in (["0"], ["1"]) for s in seen[:3])
  assert sorted(seen[3][0].split(",")) == ["0", "1"]
  with pytest.raises(ValueError, match="needs 2 devices but --devices lists 1"):
    local.run(sweep, str(tmp_path / "other"), python=fake_python, devices=["0"])


def test_changed_overrides_are_not_silently_reused(tmp_path, fake_python):
  sweep, root = _sweep(), str(tmp_path / "runs")
  local.run(sweep, root, python=fake_python, poll_s=0.05)
  changed = sweep_from_dict({"name": "toy", "config": "configs/16k_to_100m.py:smoke",
                             "fixed": {"num_steps": 8},
                             "grid": {"model.hidden_size": [32, 64, 128]}})
  assert [p.name for p in changed.points] == [p.name for p in sweep.points]
  with pytest.raises(ValueError, match="num_steps: 4 then, 8 now"):
    local.run(changed, root, python=fake_python, dry_run=True)
  assert results.status(workdir(sweep, sweep.points[0], root)) == "finished"   # untouched


def test_failed_run_is_reported_and_others_finish(tmp_path, fake_python, monkeypatch):
  sweep, root = _sweep(), str(tmp_path / "runs")
  monkeypatch.setenv("FAIL_RUN", "hidden_size=64")
  codes = local.run(sweep, root, python=fake_python, poll_s=0.05)
  assert codes["model.hidden_size=64"] == 3
  assert codes["model.hidden_size=32"] == codes["model.hidden_size=128"] == 0


def test_multi_node_point_is_refused_locally(tmp_path, fake_python):
  sweep = sweep_from_dict({"name": "big", "config": "c.py", "points": [
      {"overrides": {"a": 1}, "resources": {"nodes": 2}}, {"a": 2}]})
  with pytest.raises(ValueError, match="--runner=slurm"):
    local.run(sweep, str(tmp_path), python=fake_python)


def test_results_jsonl_and_csv(tmp_path, fake_python):
  sweep, root = _sweep(), str(tmp_path / "runs")
  local.run(sweep, root, python=fake_python, poll_s=0.05)
  records = results.collect(sweep, root)
  assert [r["status"] for r in records] == ["finished"] * 3
  with open(os.path.join(root, "toy", "results.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  assert [r["run"] for r in rows] == [p.name for p in sweep.points]
  for r, width in zip(rows, (32, 64, 128)):
    assert r["overrides"] == {"num_steps": 4, "model.hidden_size": width}
    assert r["final"]["step"] == 4 and r["final"]["loss"] == pytest.approx(10.0 / width)
    assert "grad_norm_per_layer" not in r["final"]          # lists stay in metrics.jsonl
    assert r["tail"]["loss"] == pytest.approx(10.0 / width) and r["tail"]["tail_rows"] == 1
    assert r["tokens"] == 400.0
    # Params: tied embedding + one layer (q, k, v, o and a 3-matrix MLP), by hand.
    d, hd = width, 8
    layer = d * 2 * hd * 2 + d * 1 * hd * 2 + 3 * d * 4 * d
    assert r["params"] == layer + 128 * d
    assert r["compute"] == pytest.approx(6 * r["params"] * 400.0)
    assert r["commit"] == results.git_commit() and r["commits"] == [r["commit"]]
    assert [e["answer_exact_match"] for e in r["eval"]] == [0.75, 0.5]
  with open(os.path.join(root, "toy", "results.csv")) as f:
    flat = list(csv.DictReader(f))
  assert len(flat) == 6                                     # 3 runs × 2 eval sizes
  assert flat[0]["overrides.model.hidden_size"] == "32" and flat[1]["eval.memory_tokens"] == "256"
  assert os.path.exists(os.path.join(root, "toy", "summary.png"))


def test_collect_flag_and_unfinished_runs_are_left_out(tmp_path, fake_python, monkeypatch):
  sweep, root = _sweep(), str(tmp_path / "runs")
  local.run(sweep, root, python=fake_python, poll_s=0.05)
  os.remove(os.path.join(workdir(sweep, sweep.points[1], root), "eval.json"))
  records = results.collect(sweep, root)
  assert [r["status"] for r in records] == ["finished", "unfinished", "finished"]
  with open(os.path.join(root, "toy", "results.jsonl")) as f:
    assert len(f.readlines()) == 2


def test_tail_means_average_the_last_tenth_of_steps():
  rows = [{"step": s, "loss": float(s), "router_recall@1": 0.5, "note": "x", "flag": True}
          for s in range(10, 210, 10)]
  tail = results.tail_means(rows)
  # Steps > 180 of 200: 190 and 200.
  assert tail["loss"] == pytest.approx(195.0) and tail["tail_rows"] == 2
  assert tail["tail_from_step"] == 190 and tail["router_recall@1"] == 0.5
  assert "note" not in tail and "flag" not in tail and "step" not in tail
  rows[-1]["lm_loss_answer"] = 4.0             # a metric only some rows carry
  assert results.tail_means(rows)["lm_loss_answer"] == 4.0
  assert results.tail_means(rows[:1])["loss"] == 10.0 and results.tail_means([]) == {}
