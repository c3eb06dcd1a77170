"""``benchmarks/doc_attention.py`` on two tiny documents with the kernels interpreted: each
method's row (times against the floors, errors against the XLA reference) is filled."""
from benchmarks import doc_attention


def test_doc_attention_benchmark_rows(tmp_path):
  out = tmp_path / "doc_attention.json"
  result = doc_attention.main(["--docs", "2", "--heads", "2,1,64", "--interpret",
                               "--read_bytes", str(1 << 22), "--fwd", "q64k64s2",
                               "--bwd", "b64x64s2", "--kernel_times", "--out", str(out)])
  assert out.exists()
  methods = result["methods"]
  assert set(methods) == {"xla", "pallas_fwd_q64k64s2", "pallas_bwd_b64x64s2"}
  assert result["floors"]["fb_ms"] > result["floors"]["fwd_ms"] > 0
  fwd, bwd = methods["pallas_fwd_q64k64s2"], methods["pallas_bwd_b64x64s2"]
  assert 0 < fwd["fwd_err"] < 1e-2 and fwd["fwd_x_floor"] > 0     # bf16 against float32
  assert 0 < bwd["grad_err"] < 1e-2 and bwd["fb_x_floor"] > 0
  assert methods["xla"]["fwd_ms"] > 0 and methods["xla"]["fb_ms"] > 0
  assert bwd["fb_kernels_us"] == []        # a CPU trace has no device kernels
  floors, by_bytes, by_flops = result["floors"], result["byte_floors"], result["flop_floors"]
  for key in ("fwd_ms", "fb_ms"):
    assert floors[key] == max(by_bytes[key], by_flops[key]) > 0
  # two documents of 104 rows: the tiles' count, and their own pairs (70-100 % of a slot)
  assert result["tile_flops"] == doc_attention.tile_flops(2, 2, 64)
  assert 0 < result["useful_flops"]["fb"] < result["tile_flops"]["fb"]


def test_flop_counts_by_hand():
  # one document, one head, D 128, 104 rows -> m 128: forward 2 blocks x 2 matmuls of
  # [64, 128] x [128, 128]; dQ 2 x 3 of those; dK/dV 2 x 2 pairs x 4 of [64, 64] x 128
  one = 2 * 64 * 128 * 128
  assert doc_attention.tile_flops(1, 1, 128) == {
      "fwd": 2 * 2 * one, "fb": 2 * 2 * one + 2 * 3 * one + 2 * 2 * 4 * (2 * 64 * 64 * 128)}
  assert doc_attention.tile_flops(3, 2, 64, rows=64)["fwd"] == 3 * 2 * 2 * (2 * 64 * 64 * 64)
  # lengths 1 and 2: 1 + 3 visible pairs; forward 4 FLOPs a pair and dimension, backward 2.5 x
  assert doc_attention.useful_flops([1, 2], heads=1, d=1) == {"fwd": 16, "fb": 56}
