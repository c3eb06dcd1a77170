"""``benchmarks/embed_grad.py`` at a small shape: every method timed on both id sets, the
float32 gradients equal, JAX's bf16 scatter-add off by its bf16 summation."""
from benchmarks import embed_grad


def test_embed_grad_benchmark_rows(tmp_path):
  out = tmp_path / "embed_grad.json"
  result = embed_grad.main(["--tokens", "3000", "--vocab", "2000", "--dim", "16",
                            "--read_bytes", str(1 << 22), "--out", str(out)])
  assert out.exists()
  rows = {(r["ids"], r["method"]): r for r in result["rows"]}
  assert set(rows) == {(i, m) for i in ("kv", "uniform")
                       for m in ("autodiff", "f32_scatter", "sorted")}
  assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in rows.values())
  for ids in ("kv", "uniform"):
    assert rows[(ids, "f32_scatter")]["rel_err_vs_f32"] == 0
    assert rows[(ids, "sorted")]["rel_err_vs_f32"] < 1e-6
  # the kv documents' few distinct tokens: hundreds of bf16 additions per entry
  assert rows[("kv", "autodiff")]["distinct"] < 1000
  assert rows[("kv", "autodiff")]["rel_err_vs_f32"] > 1e-2
