"""benchmarks.profile_summary: the kernel table of a Perfetto trace (synthetic trace here)."""
import gzip
import json
import os

import pytest

from benchmarks import profile_summary as ps


def _write(tmp_path, events):
  d = tmp_path / "plugins" / "profile" / "run1"
  os.makedirs(d)
  with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  return str(tmp_path)


def test_counts_device_stream_kernels_once(tmp_path):
  meta = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
      {"ph": "M", "name": "thread_name", "pid": 2, "tid": 8, "args": {"name": "XLA Ops"}},
  ]
  kernels = [  # stream: 3 kernels, 60 µs busy over a 100 µs span
      {"ph": "X", "pid": 2, "tid": 7, "name": "gemm", "ts": 0, "dur": 30},
      {"ph": "X", "pid": 2, "tid": 7, "name": "fusion.1", "ts": 50, "dur": 10},
      {"ph": "X", "pid": 2, "tid": 7, "name": "gemm", "ts": 80, "dur": 20},
      # the same work on the derived line and the host: not counted
      {"ph": "X", "pid": 2, "tid": 8, "name": "dot.3", "ts": 0, "dur": 100},
      {"ph": "X", "pid": 1, "tid": 1, "name": "python", "ts": 0, "dur": 500},
  ]
  s = ps.summarize(_write(tmp_path, meta + kernels), top=1)
  assert s["device_events"]
  assert s["device_busy_ms"] == pytest.approx(0.060)
  assert s["span_ms"] == pytest.approx(0.100)
  assert s["rows"] == [{"name": "gemm", "ms": pytest.approx(0.050), "count": 2,
                        "share": pytest.approx(50 / 60)}]
  assert s["other_ms"] == pytest.approx(0.010)
  assert "gemm" in ps.format_summary(s, "t")


def test_missing_trace_names_the_directory_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="no Perfetto trace under .*record one"):
    ps.summarize(str(tmp_path))
