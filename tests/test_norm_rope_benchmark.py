"""``benchmarks/norm_rope.py`` at a small shape: every method timed against its floors, the
forwards the same up to a bf16 rounding, and the fused backward's scale gradient float32-exact where JAX's rounds
RoPE's cotangent to bf16 first."""
from benchmarks import norm_rope


def test_norm_rope_benchmark_rows(tmp_path):
  out = tmp_path / "norm_rope.json"
  result = norm_rope.main(["--tokens", "2000", "--heads", "2", "--read_bytes", str(1 << 22),
                           "--out", str(out)])
  assert out.exists()
  assert result["shape"] == [20, 104, 2, 128]
  rows = {r["method"]: r for r in result["rows"]}
  assert set(rows) == {"autodiff", "lean", "fused", "fused_bf16", "tables", "pallas"}
  for r in rows.values():
    assert r["y_rel_diff_autodiff"] < 2.0 ** -7     # the same ops, up to a bf16 rounding
    assert r["step_ms"] > 0 and r["step_x_floor"] > 0
    assert 0 < r["dx_rel_err_f32"] < 8e-3           # dx is rounded to bf16 by every method
  assert set(result["forward_ms"]) == {"norm_rope", "one_pass", "tables", "pallas"}
  assert all(ms > 0 for ms in result["forward_ms"].values())
  # the tables hold the same cos/sin: the same errors (XLA may fuse the two differently)
  assert abs(rows["tables"]["dx_rel_err_f32"] - rows["autodiff"]["dx_rel_err_f32"]) < 1e-3
  assert rows["fused"]["dscale_rel_err_f32"] < 1e-5
  assert rows["autodiff"]["dscale_rel_err_f32"] > 1e-4
  # off a GPU "pallas" is fused_bf16's own code, and the kernels alone are not timed
  assert rows["pallas"]["dx_rel_err_f32"] == rows["fused_bf16"]["dx_rel_err_f32"]
  assert result["kernel_rows"] == []


def test_kernels_only_times_nothing_else(tmp_path):
  """``--kernels_only`` skips the methods and the forwards (off a GPU nothing is timed)."""
  result = norm_rope.main(["--tokens", "200", "--heads", "2", "--read_bytes", str(1 << 20),
                           "--kernels_only", "--out", str(tmp_path / "k.json")])
  assert result["rows"] == [] and result["forward_ms"] == {} and result["kernel_rows"] == []
  assert (tmp_path / "k.json").exists()
