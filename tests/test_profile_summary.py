"""benchmarks.profile_summary: the kernel table of a profiler trace."""
from types import SimpleNamespace as NS

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile_summary as ps


def _ev(name, start, dur):
  return NS(name=name, start_ns=start, duration_ns=dur)


def test_counts_device_stream_kernels_once_per_call():
  planes = [
      NS(name="/host:CPU", lines=[NS(name="python", events=[_ev("step", 0, 900_000)])]),
      NS(name="/device:GPU:0", lines=[
          NS(name="Stream #13(Compute)", events=[      # two calls of 60 µs over 100 µs each
              _ev("gemm", 0, 30_000), _ev("fusion.1", 50_000, 10_000), _ev("gemm", 80_000, 20_000),
              _ev("gemm", 100_000, 30_000), _ev("fusion.1", 150_000, 10_000),
              _ev("gemm", 180_000, 20_000)]),
          NS(name="XLA Ops", events=[_ev("dot.3", 0, 200_000)]),          # the same work again
          NS(name="Stream #14(MemcpyH2D)", events=[_ev("memcpy", 0, 50_000)])]),
  ]
  s = ps.aggregate(planes, calls=2, top=1)
  assert s["device_events"]
  assert s["device_busy_ms"] == pytest.approx(0.060)
  assert s["span_ms"] == pytest.approx(0.100)
  assert s["rows"] == [{"name": "gemm", "ms": pytest.approx(0.050), "count": 2,
                        "share": pytest.approx(50 / 60)}]
  assert s["other_ms"] == pytest.approx(0.010)
  assert "gemm" in ps.format_summary(s, "t")


def test_a_stream_of_kernels_and_copies_counts():
  """jax 0.11's GPU trace names its compute stream "Stream #14(Compute,MemcpyD2D,Memset)"."""
  planes = [
      NS(name="/device:GPU:0", lines=[
          NS(name="Stream #14(Compute,MemcpyD2D,Memset)", events=[_ev("gemm", 0, 30_000)]),
          NS(name="Stream #15(MemcpyH2D)", events=[_ev("memcpy", 0, 50_000)])]),
  ]
  s = ps.aggregate(planes)
  assert s["device_busy_ms"] == pytest.approx(0.030)
  assert [r["name"] for r in s["rows"]] == ["gemm"]


def test_an_empty_table_names_the_planes_and_lines_it_saw():
  planes = [NS(name="/device:GPU:0", lines=[NS(name="Stream #15(MemcpyH2D)", events=[])])]
  text = ps.format_summary(ps.aggregate(planes))
  assert "no device kernels" in text and "/device:GPU:0: Stream #15(MemcpyH2D)" in text


def test_a_cpu_trace_has_no_device_kernels(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((64, 64))
  seen = []
  s = ps.profile_calls(lambda: jax.block_until_ready(f(x)), str(tmp_path), calls=2, log=seen.append)
  assert not s["device_events"] and s["rows"] == [] and s["calls"] == 2
  assert "no device kernels" in seen[0]


def test_missing_trace_names_the_directory_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="no profiler trace .* under .*profile_calls"):
    ps.summarize(str(tmp_path))


def test_kernels_are_described_by_their_hlo_instruction():
  import jax
  import jax.numpy as jnp
  text = jax.jit(lambda x, w: jnp.tanh(x @ w).sum()).lower(
      jnp.ones((4, 8)), jnp.ones((8, 16))).compile().as_text()
  names = [line.split("=")[0].strip().removeprefix("ROOT ").lstrip("%")
           for line in text.splitlines() if " = " in line and "fusion" in line.split("=")[0]]
  assert names, text
  kernel = names[0].replace(".", "_")      # XLA's kernel name for the instruction
  found = ps.describe_kernels(text, [kernel, "nvjet_sm90_tst_64x8"])
  assert list(found) == [kernel] and "fusion(" in found[kernel]
  hand = ('  %gemm_fusion_dot.291 = bf16[1,9728]{1,0} fusion(bf16[1,2560]{1,0} %a), '
          'kind=kCustom, metadata={op_name="jit(f)/mlp/dot_general" source_file="m.py"}')
  (what,) = ps.describe_kernels(hand, ["gemm_fusion_dot_291"]).values()
  assert what.startswith("bf16[1,9728]{1,0} fusion(") and what.endswith("[jit(f)/mlp/dot_general]")


def test_op_category_names_the_model_op_and_the_pass():
  fwd = "jit(step)/jit(main)/jvp(MSAModel.forward_train)/MSAModel._forward_active_hidden/layers_3.active/layers_3._finish/mlp/mul"
  bwd = ("jit(step)/jit(main)/transpose(jvp(MSAModel.forward_train))/while/body/"
         "layers_17._finish/mlp/mul")
  assert ps.op_category(fwd) == "mlp/mul"
  assert ps.op_category(bwd) == "mlp/mul [bwd]"
  assert ps.op_category("jit(prefill)/MSAModel.decode_active/MSAModel._logits/norm/convert_element_type") \
      == "norm/convert_element_type"
  assert ps.op_category("jit(f)/layers_0.active/layers_0._attend/jit(attend)/jit(_pad)/pad") \
      == "_attend/pad"
  assert ps.op_category("") == "(no source)"


def test_device_time_by_source_op_sums_every_kernel():
  """Kernels of the same model op (two layers' SwiGLU multiplies, forward and backward
  apart) are summed; a library kernel (cuBLAS) is grouped by its name's first word."""
  hlo = "\n".join([
      '  %loop_multiply_fusion.1 = bf16[8,16]{1,0} fusion(%a), kind=kLoop, '
      'metadata={op_name="jit(step)/layers_0._finish/mlp/mul"}',
      '  %loop_multiply_fusion.2 = bf16[8,16]{1,0} fusion(%b), kind=kLoop, '
      'metadata={op_name="jit(step)/layers_1._finish/mlp/mul"}',
      '  ROOT %fusion.7 = bf16[8,16]{1,0} fusion(%c), kind=kLoop, '
      'metadata={op_name="jit(step)/transpose(jvp(f))/layers_1._finish/mlp/mul"}',
  ])
  rows = [{"name": "loop_multiply_fusion_1", "ms": 1.0}, {"name": "loop_multiply_fusion_2", "ms": 2.0},
          {"name": "fusion_7", "ms": 0.5}, {"name": "nvjet_sm90_tst_64x8", "ms": 4.0},
          {"name": "nvjet_sm90_tss_128x8", "ms": 1.0}]
  groups = ps.by_source_op(rows, hlo)
  assert groups == [
      {"op": "(library) nvjet", "ms": 5.0, "kernels": 2, "share": pytest.approx(5 / 8.5)},
      {"op": "mlp/mul", "ms": 3.0, "kernels": 2, "share": pytest.approx(3 / 8.5)},
      {"op": "mlp/mul [bwd]", "ms": 0.5, "kernels": 1, "share": pytest.approx(0.5 / 8.5)}]
  assert "mlp/mul [bwd]" in ps.format_by_source_op(groups)


def _ev_op(name, start, dur, stats):
  return NS(name=name, start_ns=start, duration_ns=dur, stats=stats)


# A cuBLAS GEMM as XLA's GPU backend writes it (operands by name; a workspace in the tuple).
_CUBLAS_HLO = """HloModule jit_step, entry_computation_layout={()->bf16[4096,3072]{1,0}}

ENTRY %main.9 (p.1: bf16[4096,1024], w.2: bf16[1024,3072]) -> bf16[4096,3072] {
  %p.1 = bf16[4096,1024]{1,0} parameter(0)
  %w.2 = bf16[1024,3072]{1,0} parameter(1)
  %custom-call.12 = (bf16[4096,3072]{1,0}, s8[4194304]{0}) custom-call(%p.1, %w.2), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/transpose(jvp(MSAModel.forward_train))/layers_3._finish/mlp/gate_proj/dot_general"}, backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %get-tuple-element.3 = bf16[4096,3072]{1,0} get-tuple-element(%custom-call.12), index=0
}
"""


def test_gemm_table_from_kernels_hlo_ops():
  """Each GEMM's time (kernels grouped by the HLO instruction their stats name, as an
  ``hlo_op`` stat or inside XLA's annotation) and its rate from the instruction's shapes:
  a cuBLAS custom call and a batched ``dot`` as XLA prints them."""
  f = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", jnp.tanh(a), b))
  cpu_hlo = f.lower(jnp.ones((2, 64, 32)), jnp.ones((2, 32, 16))).compile().as_text()
  dot = next(line.split("=")[0].split()[-1].lstrip("%") for line in cpu_hlo.splitlines()
             if " dot(" in line)
  planes = [NS(name="/device:GPU:0", lines=[NS(name="Stream #14(Compute)", events=[
      _ev_op("nvjet_sm90_tst_256x128", 0, 2_000_000, [("hlo_op", "custom-call.12")]),
      _ev_op("nvjet_sm90_tst_256x128", 3_000_000, 2_000_000,
             [("annotation", "x:#hlo_op=custom-call.12,hlo_module=jit_step#")]),
      _ev_op("loop_fusion", 6_000_000, 1_000, [("hlo_op", dot)]),
      _ev_op("loop_fusion", 6_500_000, 1_000, [("hlo_op", dot)]),
      _ev_op("memset", 7_000_000, 1_000, [])])])]
  s = ps.aggregate(planes, calls=2, top=None)
  assert s["hlo_ops"][0] == {"hlo_op": "custom-call.12", "ms": pytest.approx(2.0), "count": 1}
  rows = {r["hlo_op"]: r for r in ps.gemm_table(s["hlo_ops"], _CUBLAS_HLO + cpu_hlo)}
  gemm = rows["custom-call.12"]
  assert gemm["dims"] == "4096 x 1024 x 3072" and gemm["op"] == "gate_proj/dot_general [bwd]"
  assert gemm["tflops"] == pytest.approx(2 * 4096 * 1024 * 3072 / 2e-3 / 1e12)
  assert rows[dot]["dims"] == "128 x 32 x 16"          # batch folded into rows
  assert rows[dot]["tflops"] == pytest.approx(2 * 2 * 64 * 32 * 16 / 1e-6 / 1e12)
  assert "custom-call.12" not in ps.format_gemm_table([]) and "TFLOP/s" in \
      ps.format_gemm_table(list(rows.values()))


def test_event_hlo_op_absent():
  assert ps.event_hlo_op([("correlation_id", 7), ("kernel_details", "regs:32")]) is None
  assert ps.event_hlo_op([]) is None


def test_by_source_op_places_library_kernels_by_their_hlo_op():
  """A cuBLAS kernel (no HLO instruction of its name) is placed under its custom call's
  source op when its stats name the call; without them, under "(library) nvjet"."""
  planes = [NS(name="/device:GPU:0", lines=[NS(name="Stream #14(Compute)", events=[
      _ev_op("nvjet_sm90_tst_256x128", 0, 2_000_000, [("hlo_op", "custom-call.12")]),
      _ev_op("nvjet_sm90_tst_256x128", 3_000_000, 1_000_000, [])])])]
  s = ps.aggregate(planes, top=None)
  groups = {g["op"]: g["ms"] for g in ps.by_source_op(s["kernel_hlo_ops"], _CUBLAS_HLO)}
  assert groups == {"gate_proj/dot_general [bwd]": pytest.approx(2.0),
                    "(library) nvjet": pytest.approx(1.0)}
  assert {g["op"] for g in ps.by_source_op(s["rows"], _CUBLAS_HLO)} == {"(library) nvjet"}
