"""The multi-GPU paper model's byte counts against hand arithmetic."""
import pytest

from benchmarks import scaling_model as sm


def test_bank_bytes_per_gpu_match_hand_count():
  # Qwen3-4B shape: 18 router layers, Hkv 8, D 128 -> F 1024.
  s = sm.Setting(tokens=1_000_000_000, gpus=8, kr_dtype="float8_e4m3fn", kv_dtype="int8")
  got = sm.bank_bytes_per_gpu(s, "qwen3-4b", tokens_per_chunk=64.0)
  chunks = 1e9 / 64 / 8
  assert got["chunks_per_gpu"] == pytest.approx(chunks)
  assert got["kr_gb"] == pytest.approx(chunks * 18 * (1024 + 4) / 1e9)
  assert got["kv_gb"] == pytest.approx(chunks * 18 * (2 * 1024 + 2 * 8 * 4) / 1e9)
  # The totals: fp8 K̄R ~288 GB and int8 K̄/V̄ ~576 GB over all 8 GPUs.
  assert 8 * got["kr_gb"] == pytest.approx(288, rel=0.01)
  assert 8 * got["kv_gb"] == pytest.approx(576, rel=0.04)


def test_ttft_prediction_adds_its_parts():
  s = sm.Setting(tokens=100_000_000, gpus=2, kr_dtype="bfloat16", kv_dtype="bfloat16")
  t = sm.predict_ttft_ms(s, "qwen3-4b", 50.0, read_gbs=4000.0, route_x_floor=1.0,
                         merge_us=20.0, host_fetch_us=30.0, kv_on_host=False)
  kr_bytes_layer = 100e6 / 50 / 2 * 1024 * 2
  assert t["route_per_layer_ms"] == pytest.approx(kr_bytes_layer / 4000e9 * 1e3)
  assert t["merge_ms"] == pytest.approx(18 * 0.02)
  assert t["fetch_ms"] == 0.0
  assert t["ttft_ms"] == pytest.approx(t["route_ms"] + t["merge_ms"] + t["forward_ms"])
