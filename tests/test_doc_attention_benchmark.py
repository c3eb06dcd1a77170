"""``benchmarks/doc_attention.py`` on two tiny documents with the kernels interpreted: each
method's row (times against the floors, errors against the XLA reference) is filled."""
from benchmarks import doc_attention


def test_doc_attention_benchmark_rows(tmp_path):
  out = tmp_path / "doc_attention.json"
  result = doc_attention.main(["--docs", "2", "--heads", "2,1,64", "--interpret",
                               "--read_bytes", str(1 << 22), "--fwd", "q64k64s2",
                               "--bwd", "b64x64s2,short_fwd_bwd", "--out", str(out)])
  assert out.exists()
  methods = result["methods"]
  assert set(methods) == {"xla", "pallas_fwd_q64k64s2", "pallas_bwd_b64x64s2",
                          "pallas_bwd_short_fwd_bwd"}
  assert 0 < methods["pallas_bwd_short_fwd_bwd"]["grad_err"] < 1e-2
  assert result["floors"]["fb_ms"] > result["floors"]["fwd_ms"] > 0
  fwd, bwd = methods["pallas_fwd_q64k64s2"], methods["pallas_bwd_b64x64s2"]
  assert 0 < fwd["fwd_err"] < 1e-2 and fwd["fwd_x_floor"] > 0     # bf16 against float32
  assert 0 < bwd["grad_err"] < 1e-2 and bwd["fb_x_floor"] > 0
  assert methods["xla"]["fwd_ms"] > 0 and methods["xla"]["fb_ms"] > 0
