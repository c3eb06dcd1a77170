"""Which arithmetic the H200's failing fp8 kernel test computed (CPU, from its log).

  python -m benchmarks.fp8_mismatch        # CPU, about 30 s

``tests/test_kernel_routing_quant.py::test_gpu_fused_quantised_route_compiled[1-64-
float8_e4m3fn-2]`` failed on the H200: its log holds the kernel's 16 top-k scores (ACTUAL)
and the XLA numerics reference at the same documents (DESIRED). The case is deterministic,
so this rebuilds it on the CPU (the test's own helpers) and scores those documents with
several candidate arithmetics; the one the kernel ran is the one within the fp8 wgmma's
accumulation noise of ACTUAL. Writes ``fp8_mismatch_analysis.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re

import jax.numpy as jnp
import numpy as np

from benchmarks import write_json

LOG = "benchmarks/results/h200_logs/gpu_tests_routing_quant.log"


def _log_scores(path: str, label: str) -> np.ndarray:
  text = open(path).read()
  body = re.search(rf"{label}: array\(\[([^\]]*)\]", text).group(1)
  return np.array([float(v) for v in body.replace("\n", " ").split(",")])


def _test_module():   # the failing test's own case builder and references
  spec = importlib.util.spec_from_file_location("routing_quant_tests",
                                                "tests/test_kernel_routing_quant.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def analyse(log: str) -> dict:
  """Scores of the logged documents under each candidate arithmetic vs ACTUAL/DESIRED."""
  from msa_jax.inference import quantize
  from pallas_kernels import block_routing as br
  from pallas_kernels import quantised_queries as qq
  t = _test_module()
  actual, desired = _log_scores(log, "ACTUAL"), _log_scores(log, "DESIRED")
  b, m = 1, 64                                  # the failing parametrisation's case
  rng = np.random.default_rng(b * 100 + m)
  doc_lens = []
  while sum(doc_lens) < 60_000 - 300:
    doc_lens.append(int(rng.integers(1, 300)))
  rq, mask, kr, doc = t._case(b + m, b, m, 1024, doc_lens, pad=60_000 - sum(doc_lens))
  codes, scale = quantize.quantise(kr, "float8_e4m3fn", 1)
  n = len(doc_lens)
  doc_s, _ = t._numerics_reference(rq, mask, codes, scale, doc, n, 16, 64, 2)
  docs = [int(np.argmin(np.abs(doc_s[0] - v))) for v in desired]   # DESIRED = doc_s[docs]
  q = br._fill_masked_queries(jnp.asarray(rq), jnp.asarray(mask), 64)[:, None]
  rq2 = qq.route_queries(q, codes.dtype, 2)                  # eager on the CPU: exact terms
  hi, lo = (np.asarray(x.astype(jnp.float32), np.float64)[0, 0] for x in (rq2.q_bgjf,
                                                                          rq2.lo_bgjf))
  q_scale = np.asarray(rq2.scale_bgj, np.float64)[0, 0]
  k64 = codes.astype(np.float32).astype(np.float64)

  def scores(q_jf):   # kr_scale · max_j (q_scale_j · q_j · codes), per document
    s_c = ((q_jf @ k64.T) * q_scale[:, None]).max(0) * scale.astype(np.float64)
    return t._doc_max(s_c[None], doc, n, -np.inf)[0][docs]

  candidates = {
      "two e4m3 terms (hi + lo, the reference)": scores(hi + lo),
      "one e4m3 term (hi; lo = 0)": scores(hi),
      "hi + 2 lo": scores(hi + 2 * lo),
      "hi - lo": scores(hi - lo),
      "float64 queries, fp8 keys": t._float_reference(
          rq, mask, quantize.dequantise_np(codes, scale), doc, n)[0][docs],
  }
  rows = [{"arithmetic": name, "max_abs_vs_actual": float(np.abs(actual - v).max()),
           "mean_abs_vs_actual": float(np.abs(actual - v).mean()),
           "max_abs_vs_desired": float(np.abs(desired - v).max())}
          for name, v in candidates.items()]
  return {"log": log, "documents": docs, "rows": rows,
          "cpu_reference_vs_gpu_desired_max_abs": float(np.abs(doc_s[0][docs] - desired).max())}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--log", default=LOG)
  p.add_argument("--out", default="benchmarks/results")
  args = p.parse_args()
  res = analyse(args.log)
  print(f"CPU reference vs the GPU's DESIRED: max |diff| "
        f"{res['cpu_reference_vs_gpu_desired_max_abs']:.2e}")
  print(f"{'arithmetic':44s} {'max|ACTUAL-x|':>14s} {'mean':>9s} {'max|DESIRED-x|':>15s}")
  for r in res["rows"]:
    print(f"{r['arithmetic']:44s} {r['max_abs_vs_actual']:14.5f} {r['mean_abs_vs_actual']:9.5f} "
          f"{r['max_abs_vs_desired']:15.5f}")
  write_json(os.path.join(args.out, "fp8_mismatch_analysis.json"), res)


if __name__ == "__main__":
  main()
