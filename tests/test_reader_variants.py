"""``launch/reader_variants.sh`` stopped by an outer ``timeout`` still archives each run's
logs and metrics (a device call that runs out of time returns them)."""
import os
import subprocess
import tarfile

FAKE_PYTHON = """#!/usr/bin/env bash
# a stand-in for python: "training" writes metrics into --workdir, then outlives the timeout
for a in "$@"; do case $a in --workdir=*) w=${a#--workdir=};; esac; done
mkdir -p "$w"; echo '{"step": 1}' > "$w/metrics.jsonl"; echo "step 1/10"; sleep 10
"""


def test_sigterm_archives_what_exists(tmp_path):
  fake = tmp_path / "py"
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  out = tmp_path / "out"
  env = dict(os.environ, OUT=str(out), ROOT=str(tmp_path / "root"), PYTHON=str(fake),
             RUN_S="20", VARIANTS="a=--x;b=--y")
  script = os.path.join(os.path.dirname(__file__), "..", "launch", "reader_variants.sh")
  proc = subprocess.run(["timeout", "3", "bash", script], env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 124, proc.stderr
  assert "SIGTERM, archiving what exists" in proc.stderr
  with tarfile.open(out / "variants.tgz") as tar:
    names = set(tar.getnames())
  assert {"a/metrics.jsonl", "a/train.log", "a/args.txt", "b/metrics.jsonl"} <= names
