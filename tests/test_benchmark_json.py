"""``benchmarks.write_json``: the provenance every benchmark JSON carries, the GPUs'
identities among it where ``nvidia-smi`` answers."""
import json
import os
import stat

import pytest

import benchmarks


@pytest.fixture(autouse=True)
def _fresh_gpu_identity():
  """``gpu_identity`` is asked once a process: each test sees its own ``PATH``."""
  benchmarks.gpu_identity.cache_clear()
  yield
  benchmarks.gpu_identity.cache_clear()


def _fake_nvidia_smi(bin_dir, lines):
  path = bin_dir / "nvidia-smi"
  path.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(f"'{line}'" for line in lines) + "\n")
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_json_names_each_gpu_where_nvidia_smi_answers(tmp_path, monkeypatch):
  """Two GPUs' CSV rows become two records keyed by ``GPU_FIELDS``, beside the device,
  jax version, date and XLA flags."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake_nvidia_smi(bin_dir, ["GPU-aaa, NVIDIA H100 80GB HBM3, 570.1, 1980, 700.00, 81559",
                             "GPU-bbb, NVIDIA H100 80GB HBM3, 570.1, 1980, 650.00, 81559"])
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
  benchmarks.write_json(str(tmp_path / "out" / "r.json"), {"rows": [1]})
  got = json.loads((tmp_path / "out" / "r.json").read_text())
  assert got["rows"] == [1] and got["xla_flags"] == "--xla_gpu_enable_triton_gemm=false"
  assert got["device"] == benchmarks.device_name() and got["jax"] and got["date"]
  assert [g["uuid"] for g in got["gpus"]] == ["GPU-aaa", "GPU-bbb"]
  assert got["gpus"][1] == {"uuid": "GPU-bbb", "name": "NVIDIA H100 80GB HBM3",
                            "driver_version": "570.1", "clocks.max.sm": "1980",
                            "power.limit": "650.00", "memory.total": "81559"}


def test_json_has_no_gpus_without_nvidia_smi(tmp_path, monkeypatch):
  """No ``nvidia-smi`` on the path (a CPU machine): no ``gpus`` key, and no error."""
  monkeypatch.setenv("PATH", str(tmp_path))
  assert benchmarks.gpu_identity() is None
  benchmarks.write_json(str(tmp_path / "r.json"), {})
  assert "gpus" not in json.loads((tmp_path / "r.json").read_text())
