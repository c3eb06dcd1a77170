r"""Memory parallel on several GPUs, on paper: bytes per GPU and predicted time to first token.

Issue 15 runs the memory-parallel engine on 2-8 H200s; until a multi-GPU machine is lent,
this model says what those runs should show, from numbers measured on ONE H200:

* routing one router layer reads that GPU's share of ``K̄R`` once: its time is the bytes
  over the measured read bandwidth times the kernel's measured ratio to that floor
  (``--route_json``: a ``benchmarks.ttft --stages=route`` result; the ``pallas`` batch-1
  row at the largest size);
* the global merge is one all-gather of ``k`` (score, document) pairs per router layer:
  latency-bound, ``--merge_us`` per layer (NVLink all-gather of a few hundred bytes;
  an assumption until measured);
* the question's forward through all layers reads the weights once (replicated on every
  GPU), plus the selected documents' ``K̄``/``V̄`` (a few hundred KB: negligible on the
  device; ``--host_fetch_us`` per router layer when they live in pinned host memory).

Memory per GPU: ``K̄R`` (codes + one float32 scale per chunk when quantised), ``K̄``/``V̄``
(int8 codes + per chunk×head scales, or bf16), the weights, for ``tokens / GPUs`` tokens.

  python -m benchmarks.scaling_model            # table + scaling_model.json / .png in $OUT

Nothing here is a measurement of several GPUs; the table says so in its title.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os

from benchmarks import synth_bank

GB = 1e9


@functools.lru_cache(maxsize=None)
def _model(shape: str):
  """The shape's ModelConfig, read from its recipe once (every setting asks for it)."""
  return synth_bank.model_config_of(shape)
_BYTES = {"bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One engine setting: a total bank size over a number of GPUs."""
  tokens: int
  gpus: int
  kr_dtype: str
  kv_dtype: str


def bank_bytes_per_gpu(s: Setting, shape: str, tokens_per_chunk: float) -> dict:
  """Bytes of K̄R and K̄/V̄ one GPU holds when the bank is split evenly by documents."""
  cfg = _model(shape)
  chunks = s.tokens / tokens_per_chunk / s.gpus
  layers = len(cfg.router_layer_ids)
  f = cfg.num_kv_heads * cfg.head_dim
  kr = chunks * layers * (f * _BYTES[s.kr_dtype] + (4 if s.kr_dtype != "bfloat16" else 0))
  kv_scales = 2 * cfg.num_kv_heads * 4 if s.kv_dtype == "int8" else 0
  kv = chunks * layers * (2 * f * _BYTES[s.kv_dtype] + kv_scales)
  return {"kr_gb": kr / GB, "kv_gb": kv / GB, "chunks_per_gpu": chunks}


def weights_bytes(shape: str) -> float:
  """bf16 bytes of the model's weights (embedding tied, counted once)."""
  c = _model(shape)
  d, i, h, g, hd = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
  per_layer = d * (h * hd) * 2 + d * (g * hd) * 2 + 3 * d * i
  router = len(c.router_layer_ids) * (d * h * hd + d * g * hd)
  return 2.0 * (c.num_layers * per_layer + router + c.vocab_size * d)


def predict_ttft_ms(s: Setting, shape: str, tokens_per_chunk: float, read_gbs: float,
                    route_x_floor: float, merge_us: float, host_fetch_us: float,
                    kv_on_host: bool) -> dict:
  """Predicted time to first token and its parts, in milliseconds."""
  layers = len(_model(shape).router_layer_ids)
  per_gpu = bank_bytes_per_gpu(s, shape, tokens_per_chunk)
  route_layer_ms = per_gpu["kr_gb"] / layers * GB / (read_gbs * GB) * 1e3 * route_x_floor
  merge_ms = layers * merge_us / 1e3 if s.gpus > 1 else 0.0
  fetch_ms = layers * host_fetch_us / 1e3 if kv_on_host else 0.0
  forward_ms = weights_bytes(shape) / (read_gbs * GB) * 1e3
  total = layers * route_layer_ms + merge_ms + fetch_ms + forward_ms
  return {"route_per_layer_ms": route_layer_ms, "route_ms": layers * route_layer_ms,
          "merge_ms": merge_ms, "fetch_ms": fetch_ms, "forward_ms": forward_ms,
          "ttft_ms": total}


def _measured(route_jsons: str) -> tuple[float, dict, str]:
  """(read GB/s, {K̄R dtype: pallas batch-1 ratio to its floor at the largest size},
  sources) from comma-separated ``benchmarks.ttft --stages=route`` results."""
  read_gbs, ratios, sources = None, {}, []
  for path in route_jsons.split(","):
    with open(path) as f:
      d = json.load(f)
    rows = [r for r in d["route"] if r["impl"] == "pallas" and r["batch"] == 1]
    for dtype in {r["kr_dtype"] for r in rows}:
      best = max((r for r in rows if r["kr_dtype"] == dtype), key=lambda r: r["tokens"])
      ratios[dtype] = best["x_floor"]
    read_gbs = read_gbs or d["read_bandwidth_gbs"]
    sources.append(f"{path} ({d.get('date', '?')})")
  if "bfloat16" not in ratios:
    raise SystemExit(f"{route_jsons} has no bf16 pallas batch-1 route row; run "
                     "`python -m benchmarks.ttft --stages=route` on the GPU first")
  return read_gbs, ratios, "; ".join(sources)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shape", default="qwen3-4b", choices=sorted(synth_bank.SHAPES))
  ap.add_argument("--route_json", help="comma-separated benchmarks.ttft route results",
                  default="benchmarks/results/ttft_route_4b_100m_h200.json,"
                          "benchmarks/results/ttft_route_4b_100m_quant_h200.json")
  ap.add_argument("--tokens_per_chunk", type=float, default=50.0,
                  help="the recipe's 100-token documents in P=64 chunks: 2 chunks each")
  ap.add_argument("--gpu_gb", type=float, default=139.0, help="usable memory of one GPU")
  ap.add_argument("--merge_us", type=float, default=20.0)
  ap.add_argument("--host_fetch_us", type=float, default=30.0)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  read_gbs, ratios, source = _measured(args.route_json)
  w_gb = weights_bytes(args.shape) / GB
  settings = [Setting(100_000_000, 1, "float8_e4m3fn", "int8"),
              Setting(100_000_000, 2, "bfloat16", "bfloat16")]
  settings += [Setting(125_000_000 * g, g, "float8_e4m3fn", "int8") for g in (1, 2, 4, 8)]
  settings += [Setting(1_000_000_000, g, "float8_e4m3fn", "int8") for g in (2, 4, 8)]
  rows = []
  print(f"PREDICTED, not measured on several GPUs: {args.shape}, read {read_gbs:,.0f} GB/s, "
        f"weights {w_gb:.1f} GB; the fused kernel's measured ratio to its read floor per K̄R "
        + ", ".join(f"{k} {v:.2f}x" for k, v in sorted(ratios.items())) + f" (from {source}); "
        f"{args.tokens_per_chunk:g} tokens per chunk (the recipe's 100-token documents at P 64)")
  print(f"{'tokens':>14} {'GPUs':>4} {'K̄R':>8} {'K̄/V̄':>8} {'GB/GPU':>7} {'where K̄/V̄':>11} "
        f"{'route':>8} {'merge':>6} {'fwd':>6} {'TTFT ms':>8}")
  for s in settings:
    mem = bank_bytes_per_gpu(s, args.shape, args.tokens_per_chunk)
    on_gpu = mem["kr_gb"] + w_gb
    kv_on_host = on_gpu + mem["kv_gb"] > args.gpu_gb
    total_gb = on_gpu + (0.0 if kv_on_host else mem["kv_gb"])
    where = "K̄R too big" if on_gpu > args.gpu_gb else ("host" if kv_on_host else "GPU")
    t = predict_ttft_ms(s, args.shape, args.tokens_per_chunk, read_gbs,
                        ratios.get(s.kr_dtype, ratios["bfloat16"]),
                        args.merge_us, args.host_fetch_us, kv_on_host)
    rows.append({**dataclasses.asdict(s), **mem, "weights_gb": w_gb, "gpu_gb": total_gb,
                 "kv_on_host": kv_on_host, "fits": on_gpu <= args.gpu_gb, **t})
    print(f"{s.tokens:>14,} {s.gpus:>4} {s.kr_dtype[:8]:>8} {s.kv_dtype[:8]:>8} "
          f"{total_gb:>7.1f} {where:>11} {t['route_ms']:>8.2f} "
          f"{t['merge_ms']:>6.2f} {t['forward_ms']:>6.2f} {t['ttft_ms']:>8.2f}")
  out_dir = args.out or os.environ.get("OUT") or "benchmarks/results"
  os.makedirs(out_dir, exist_ok=True)
  result = {"predicted": True, "source": source, "read_bandwidth_gbs": read_gbs,
            "route_x_floor": ratios, "merge_us": args.merge_us,
            "host_fetch_us": args.host_fetch_us, "rows": rows}
  with open(os.path.join(out_dir, "scaling_model.json"), "w") as f:
    json.dump(result, f, indent=1)
  _plot(rows, os.path.join(out_dir, "scaling_model.png"))


def _plot(rows, path):
  from msa_jax import plots
  weak = [r for r in rows if r["tokens"] == 125_000_000 * r["gpus"]]
  strong = [r for r in rows if r["tokens"] == 1_000_000_000 and r["fits"]]
  fig, ax = plots.subplots(figsize=(5.5, 3.6))
  ax.plot([r["gpus"] for r in weak], [r["ttft_ms"] for r in weak], "o-",
          label="weak: 125M tokens per GPU")
  ax.plot([r["gpus"] for r in strong], [r["ttft_ms"] for r in strong], "s-",
          label="strong: 1B tokens in all (where K̄R fits)")
  ax.set_xlabel("GPUs (H200)")
  ax.set_ylabel("predicted TTFT (ms)")
  ax.set_title("Memory parallel, predicted from one-GPU measurements", fontsize=9)
  ax.set_xticks([1, 2, 4, 8])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  plots.save(fig, path)


if __name__ == "__main__":
  main()
