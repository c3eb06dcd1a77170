"""``benchmarks/issue*_gpu.sh``: every stage the usage line names prints its commands in a dry
run (``DRY=1``), each runs a module or a test file that exists, and each
``benchmarks.train_step`` command's flags parse (a typo found on the GPU costs device time)."""
import os
import re
import subprocess

import pytest

from benchmarks import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("benchmarks/issue10_gpu.sh", "benchmarks/issue11_gpu.sh")


def _stages(script: str) -> list[str]:
  text = open(os.path.join(ROOT, script)).read()
  names = re.search(r'STAGES="([^"]*)"', text).group(1)
  return [s.strip() for s in re.split(r",| or ", names) if s.strip()]


def _dry(script: str, stage: str, tmp_path) -> list[str]:
  env = dict(os.environ, DRY="1", STAGE=stage, OUT=str(tmp_path))
  run = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
  assert run.returncode == 0, (stage, run.stderr)
  return [line for line in run.stdout.splitlines() if line.startswith("== ")]


@pytest.mark.parametrize("script,stage", [(s, st) for s in SCRIPTS for st in _stages(s)])
def test_every_stage_prints_runnable_commands(script, stage, tmp_path):
  steps = _dry(script, stage, tmp_path)
  assert steps, f"{script} STAGE={stage} runs nothing"
  for line in steps:
    words = line.split()
    if "-m" in words:
      module = words[words.index("-m") + 1]
      if module == "pytest":
        files = [w for w in words if w.startswith("tests/")]
        assert files and all(os.path.exists(os.path.join(ROOT, f)) for f in files), line
      else:
        assert os.path.exists(os.path.join(ROOT, module.replace(".", "/") + ".py")), line
      if module == "benchmarks.train_step":
        args = train_step._parse(words[words.index("-m") + 2:])   # exits on an unknown flag
        train_step.compare_sets(args.compare, train_step.compare_fields(args))


def test_an_unknown_stage_is_refused(tmp_path):
  env = dict(os.environ, DRY="1", STAGE="no_such_stage", OUT=str(tmp_path))
  run = subprocess.run(["bash", SCRIPTS[0]], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
  assert run.returncode == 2 and "choose" in run.stderr
