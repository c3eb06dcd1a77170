"""The SLURM and TPU-VM runners: generated scripts checked for content, for quoting (a
value with spaces and quotes reaches ``msa_jax.train`` intact when the script runs with
stand-ins for ``srun``/``sbatch``/``gcloud``/``python3``) and for the environment."""
import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest

from launch import results
from launch.runners import slurm, tpu_vm
from launch.spec import sweep_from_dict, train_command, workdir

NASTY = "/data/my file's \"kv\" $HOME.jsonl"     # spaces, both quotes, a $: must stay literal


def _sweep():
  return sweep_from_dict({
      "name": "nasty", "config": "configs/16k_to_100m.py:tiny",
      "fixed": {"data.jsonl_path": NASTY},
      "points": [{"model.top_k": 1}, {"model.top_k": 2},
                 {"overrides": {"model.top_k": 4},
                  "resources": {"nodes": 2, "gpus_per_node": 8, "partition": "h200"}}],
      "resources": {"gpus_per_node": 1, "time": "02:00:00"}})


def _stub(bin_dir, name, body):
  path = os.path.join(bin_dir, name)
  with open(path, "w") as f:
    f.write(f"#!{sys.executable}\n" + textwrap.dedent(body))
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


RECORD_ARGV = """\
    import json, os, sys
    with open(os.environ["ARGV_LOG"], "a") as f:
      f.write(json.dumps({"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                          "cwd": os.getcwd()}) + "\\n")
    """


def _read_log(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


def test_slurm_scripts_group_resources_and_run_each_point_with_srun(tmp_path, monkeypatch):
  sweep, root = _sweep(), str(tmp_path / "runs")
  paths = slurm.run(sweep, root, python="/opt/venv/bin/python", setup="module load cuda")
  assert [os.path.basename(p) for p in paths] == ["nasty_0.sbatch", "nasty_1.sbatch"]
  one_gpu, multi_node = (open(p).read() for p in paths)
  for text in (one_gpu, multi_node):
    assert text.startswith("#!/bin/bash\n#SBATCH --job-name=nasty\n")
    assert 'srun --kill-on-bad-exit=1 "${ARGS[@]}"' in text
    assert "module load cuda" in text and "set -euo pipefail" in text
    # The coordinator comes from SLURM's environment, never a flag baked into the script.
    assert "--coordinator_address" not in text and "--process_id" not in text
    assert subprocess.run(["bash", "-n", "-c", text]).returncode == 0
  assert "#SBATCH --array=0,1\n" in one_gpu and "#SBATCH --nodes=1\n" in one_gpu
  assert "#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=1\n" in one_gpu
  assert "#SBATCH --time=02:00:00" in one_gpu and "--partition" not in one_gpu
  assert "#SBATCH --array=0\n" in multi_node and "#SBATCH --nodes=2\n" in multi_node
  assert "#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-node=8\n" in multi_node
  assert "#SBATCH --partition=h200" in multi_node

  # Run each array task with a stand-in srun: it must receive the exact training argv.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir, "srun", RECORD_ARGV)
  log = tmp_path / "argv.log"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGV_LOG": str(log)}
  env["BASH_ENV"] = ""
  fake_module = tmp_path / "module.sh"
  fake_module.write_text("module() { :; }\n")
  for path, task, point in ((paths[0], 0, sweep.points[0]), (paths[0], 1, sweep.points[1]),
                            (paths[1], 0, sweep.points[2])):
    script = f"source {fake_module}\n" + open(path).read()
    out = subprocess.run(["bash", "-c", script], env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    call = _read_log(log)[-1]
    assert call["prog"] == "srun"
    assert call["argv"] == ["--kill-on-bad-exit=1"] + train_command(
        sweep, point, os.path.abspath(root), "/opt/venv/bin/python")
    assert f"--config.data.jsonl_path={NASTY}" in call["argv"]
    assert call["cwd"] == results.REPO
  out = subprocess.run(["bash", "-c", f"source {fake_module}\n" + open(paths[0]).read()],
                       env={**env, "SLURM_ARRAY_TASK_ID": "7"}, capture_output=True, text=True)
  assert out.returncode == 1 and "no sweep point for array task 7" in out.stderr
  for p in sweep.points:   # what will run, at which commit
    with open(os.path.join(workdir(sweep, p, root), results.POINT_FILE)) as f:
      assert json.load(f)["runner"] == "slurm"


def test_slurm_leaves_out_finished_points_and_submits(tmp_path, monkeypatch, capsys):
  sweep, root = _sweep(), str(tmp_path / "runs")
  done = workdir(sweep, sweep.points[0], root)
  os.makedirs(done)
  with open(os.path.join(done, "config.json"), "w") as f:
    json.dump({"num_steps": 2, "eval": {"at_end": False}}, f)
  with open(os.path.join(done, "metrics.jsonl"), "w") as f:
    f.write('{"step": 2, "loss": 1.0}\n')
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir, "sbatch", RECORD_ARGV + 'print("4242" if "--wrap" not in " ".join(sys.argv) '
        'else "4250")\n')
  log = tmp_path / "argv.log"
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("ARGV_LOG", str(log))
  paths = slurm.run(sweep, root, submit=True, sweep_arg="configs/sweeps/x.py:smoke")
  assert "#SBATCH --array=1\n" in open(paths[0]).read()
  calls = _read_log(log)
  assert [c["argv"] for c in calls[:2]] == [["--parsable", p] for p in paths]
  collect = calls[2]["argv"]
  assert "--dependency=afterany:4242:4242" in collect
  wrap = next(a for a in collect if a.startswith("--wrap="))[len("--wrap="):]
  assert shlex.split(wrap)[-3:] == ["--sweep=configs/sweeps/x.py:smoke",
                                    f"--root={os.path.abspath(root)}", "--collect"]
  assert "finished, left out" in capsys.readouterr().out


def test_slurm_dry_run_prints_and_writes_nothing(tmp_path, capsys):
  paths = slurm.run(_sweep(), str(tmp_path / "runs"), dry_run=True)
  out = capsys.readouterr().out
  assert len(paths) == 2 and not os.path.exists(tmp_path / "runs")
  assert out.count("#!/bin/bash") == 2 and out.count("srun --kill-on-bad-exit=1") == 2


def test_tpu_vm_commands_quote_and_run_on_every_worker(tmp_path, monkeypatch, capsys):
  sweep, root = _sweep(), str(tmp_path / "runs")
  repo = tmp_path / "repo on vm"
  repo.mkdir()
  files = tpu_vm.run(sweep, root, tpu_name="my-v5p-32", zone="us-east5-a", project="proj",
                     repo_dir=str(repo), setup="source ~/venv/bin/activate",
                     xpk_cluster="xc", docker_image="gcr.io/p/img:1")
  gcloud_lines = [l for l in open(files["gcloud"]).read().splitlines() if l.startswith("gcloud")]
  xpk_lines = [l for l in open(files["xpk"]).read().splitlines() if l.startswith("xpk")]
  assert len(gcloud_lines) == len(xpk_lines) == 3
  for i, (line, xline, point) in enumerate(zip(gcloud_lines, xpk_lines, sweep.points)):
    argv = shlex.split(line)
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p-32",
                        "--zone=us-east5-a", "--project=proj", "--worker=all"]
    command = argv[9][len("--command="):]
    assert command == tpu_vm.remote_command(sweep, point, root, repo_dir=str(repo),
                                            python="python3",
                                            setup="source ~/venv/bin/activate")
    x = shlex.split(xline)
    assert x[:4] == ["xpk", "workload", "create", "--cluster=xc"]
    assert f"--workload=nasty-{i}" in x and "--docker-image=gcr.io/p/img:1" in x
    assert x[-1] == f"--command={command}"
  assert "--tpu-type=TPU_TYPE" in xpk_lines[0]   # no resources.tpu_type: a placeholder to fill

  # Run the whole script: gcloud runs the command as a worker's shell would.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir, "gcloud", """\
      import subprocess, sys
      command = [a for a in sys.argv if a.startswith("--command=")][0][len("--command="):]
      sys.exit(subprocess.call(["bash", "-c", "source() { :; }; " + command]))
      """)
  _stub(bin_dir, "python3", RECORD_ARGV)
  log = tmp_path / "argv.log"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGV_LOG": str(log)}
  out = subprocess.run(["bash", files["gcloud"]], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  calls = _read_log(log)
  assert len(calls) == 3
  for call, point in zip(calls, sweep.points):
    assert call["cwd"] == str(repo)
    assert call["argv"] == train_command(sweep, point, root, "python3")[1:] + [
        "--distributed=on"]
    assert f"--config.data.jsonl_path={NASTY}" in call["argv"]


def test_tpu_vm_needs_name_and_zone_and_names_workloads_safely(tmp_path):
  with pytest.raises(ValueError, match="--tpu_name=NAME and --zone=ZONE"):
    tpu_vm.run(_sweep(), str(tmp_path), tpu_name="", zone="z")
  long = sweep_from_dict({"name": "My_Sweep.With.A.Very-Long-Name-That-Goes-On-And-On",
                          "config": "c.py", "grid": {"a": [1, 2]}})
  name = tpu_vm.workload_name(long, 12)
  assert len(name) <= 40 and name.endswith("-12") and name == name.lower()
  assert all(c.isalnum() or c == "-" for c in name)
