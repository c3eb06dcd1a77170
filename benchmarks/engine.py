"""Memory engine benchmark: encode a corpus into a bank, then answer from it, by stage.

  python -m benchmarks.engine --config=configs/16k_to_100m.py:tiny --tokens=10000000 \
      [--kr_dtype=float8_e4m3fn --kv_dtype=int8]   # bank precisions (default: the model dtype)

Builds the recipe's model (random weights unless ``--checkpoint``: encode, routing and
attention cost do not depend on the weights), writes a corpus of ``--tokens`` tokens whose
document lengths follow the recipe's own task (random token ids), encodes it with the real
encoder (``msa_jax.inference.encode``, bank on local disk), places the bank on the devices
and times, medians after warm-up:
  * encode: tokens/s of the whole stage 1 (validation pass, batches, disk writes), and
    MFU (useful FLOPs, ``msa_jax.flops.encode_flops``, over the bf16 matmul rate measured
    here and over the vendor peak); ``--encode_repeats=2`` reports a warm second run
    (no compiles), ``--encode_only`` stops there;
  * route: one router layer's top-k over the whole bank (each implementation that runs
    here), against the read floor (bytes of K̄R over a pure-read bandwidth measured in
    this run);
  * prefill: a question's stage 2 (all layers, routing in every router layer, the fetch of
    the selected chunks, KV cache) at batch 1 and 8;
  * decode: one token per row from the KV cache at batch 1 and 8, one step per call and in
    the engine's device loop (``Engine.decode_tokens``, up to 16 tokens a call).
Prints a table and writes ``engine.json`` to ``$OUT`` (or benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_name, out_dir, read_bandwidth_gbs, time_ms, write_json


def build_model(config: str, checkpoint: str):
  from msa_jax.inference.checkpoint import load_model
  if checkpoint:
    return load_model(checkpoint)
  import flax.linen as nn
  from msa_jax.model import MSAModel
  from msa_jax.trainer import resolve_model_config
  cfg = _load_config(config)
  model = MSAModel(resolve_model_config(cfg))
  compute = jnp.dtype(model.config.dtype)

  def init(rng):
    # Held in the compute dtype, as a served bf16 checkpoint is: float32 copies would
    # double the 4B model's 8 GB and be cast again by every encode call.
    params = nn.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
    return jax.tree.map(lambda p: p.astype(compute) if jnp.issubdtype(p.dtype, jnp.floating)
                        else p, params)
  return model, jax.jit(init)(jax.random.PRNGKey(0))


def _load_config(spec: str):
  from msa_jax.run_config import load_config_file
  return load_config_file(spec)


def doc_lengths_of_recipe(config: str, n: int, seed: int = 0) -> np.ndarray:
  """``n`` document lengths drawn from the recipe task's own documents."""
  from msa_jax.data import from_config
  cfg = _load_config(config)
  task = from_config.eval_task(cfg.data, cfg.seed, 1)
  lengths = np.array([len(d.tokens) for i in range(4) for d in task(i).docs])
  return np.random.default_rng(seed).choice(lengths, n)


def write_corpus(path: str, lengths: np.ndarray, vocab: int, seed: int = 0) -> int:
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i, n in enumerate(lengths):
      f.write(json.dumps({"id": f"d{i}", "tokens": rng.integers(8, vocab, int(n)).tolist()})
              + "\n")
  return int(lengths.sum())


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/16k_to_100m.py:tiny")
  ap.add_argument("--checkpoint", default="")
  ap.add_argument("--tokens", type=int, default=1_000_000)
  ap.add_argument("--question_len", type=int, default=8)
  ap.add_argument("--workdir", default="")
  ap.add_argument("--batch_tokens", type=int, default=65_536)
  ap.add_argument("--window_tokens", type=int, default=1 << 21)
  ap.add_argument("--kr_dtype", default="", help="bank K̄R precision ('' = the model dtype)")
  ap.add_argument("--kv_dtype", default="", help="bank K̄/V̄ precision ('' = the model dtype)")
  ap.add_argument("--encode_repeats", type=int, default=1,
                  help="encode the corpus this many times (fresh banks); the last, warm run "
                       "(no compiles) is the one reported")
  ap.add_argument("--width_multiple", type=int, default=-1,
                  help="the encoder's document padding (msa_jax.inference.encode."
                       "padded_widths); -1: the recipe's data.doc_slot_multiple (0 if unset)")
  ap.add_argument("--encode_only", action="store_true",
                  help="stop after encode throughput and MFU (no routing, prefill, decode)")
  args = ap.parse_args()
  from msa_jax.inference import bank as bank_lib
  from msa_jax.inference.encode import Encoder, encode_corpus

  model, params = build_model(args.config, args.checkpoint)
  cfg = model.config
  work = args.workdir or tempfile.mkdtemp(prefix="engine_bench_")
  os.makedirs(work, exist_ok=True)
  corpus, bank_dir = os.path.join(work, "corpus.jsonl"), os.path.join(work, "bank")
  mean_len = doc_lengths_of_recipe(args.config, 4096).mean()
  lengths = doc_lengths_of_recipe(args.config, int(args.tokens / mean_len) + 1)
  width_multiple = (args.width_multiple if args.width_multiple >= 0 else
                    int(_load_config(args.config).data.get("doc_slot_multiple", 0) or 0))
  t0 = time.perf_counter()
  total = write_corpus(corpus, lengths, cfg.vocab_size)
  print(f"corpus: {len(lengths):,} documents, {total:,} tokens ({time.perf_counter() - t0:.0f}s)",
        flush=True)
  # One fingerprint (hashes every parameter: seconds at 4B) and one encoder (its compiles)
  # for all repeats, so a repeat times the encode itself.
  t0 = time.perf_counter()
  fingerprint = bank_lib.model_fingerprint(cfg, params)
  fingerprint_s = time.perf_counter() - t0
  print(f"model fingerprint: {fingerprint_s:.1f}s (once, not in the encode times)", flush=True)
  encoder = Encoder(model, params, batch_tokens=args.batch_tokens,
                    kr_dtype=args.kr_dtype or None, kv_dtype=args.kv_dtype or None,
                    width_multiple=width_multiple, log=print)
  encode_seconds, split = [], {}
  for rep in range(max(1, args.encode_repeats)):
    if rep:
      shutil.rmtree(bank_dir)
    encoder.seconds = {"encode": 0.0, "write": 0.0}
    t0 = time.perf_counter()
    encode_corpus(model, params, corpus, bank_dir, tokenizer=None, prefix_tokens=[1],
                  fingerprint=fingerprint, encoder=encoder,
                  window_tokens=args.window_tokens, batch_tokens=args.batch_tokens,
                  kr_dtype=args.kr_dtype or None, kv_dtype=args.kv_dtype or None,
                  width_multiple=width_multiple)
    encode_seconds.append(time.perf_counter() - t0)
    split = dict(encoder.seconds)
    print(f"encode run {rep + 1}: {total / encode_seconds[-1]:,.0f} tokens/s "
          f"({encode_seconds[-1]:.1f}s: encoder {split['encode']:.1f}s, bank writes "
          f"{split['write']:.1f}s)", flush=True)
  encode_s = encode_seconds[-1]
  bank = bank_lib.open_bank(bank_dir)
  rows = {"model": cfg.to_dict(), "memory_tokens": bank.num_tokens, "num_docs": bank.num_docs,
          "kr_dtype": bank.kr_dtype, "kv_dtype": bank.kv_dtype,
          "num_chunks": bank.num_chunks, "encode_seconds": encode_s,
          "encode_width_multiple": width_multiple,
          "encode_seconds_all_runs": encode_seconds, "fingerprint_seconds": fingerprint_s,
          "encode_seconds_encoder": split["encode"], "encode_seconds_bank_writes": split["write"],
          "encode_tokens_per_s": bank.num_tokens / encode_s,
          **encode_mfu(cfg, lengths, encode_s),
          "bank_bytes": sum(os.path.getsize(os.path.join(bank_dir, f))
                            for f in os.listdir(bank_dir))}
  if args.encode_only:
    print(f"encode: {rows['encode_tokens_per_s']:,.0f} tokens/s, "
          f"{rows['encode_tflops']:.1f} TFLOP/s useful = MFU {rows['encode_mfu_measured']:.1%} "
          f"of the measured bf16 matmul rate ({rows['matmul_tflops']:.0f} TFLOP/s), "
          f"{rows['encode_mfu_vendor']:.1%} of the vendor peak")
    write_json(os.path.join(out_dir(), "engine_encode.json"), rows)
    return
  bw = read_bandwidth_gbs()
  rows["read_bandwidth_gbs"] = bw
  from msa_jax.inference.quantize import is_quantised
  impls = ["xla"] + (["pallas"] if jax.devices()[0].platform == "gpu"
                     and not is_quantised(bank.kr_dtype) else [])
  rng = np.random.default_rng(0)
  for impl in list(impls):
    try:
      bench_impl(impl, bank, model, params, args, rows, bw, rng)
    except Exception as e:  # noqa: BLE001  (a kernel that does not run here is reported)
      print(f"{impl}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
      rows[f"error_{impl}"] = f"{type(e).__name__}: {str(e)[:400]}"
      impls.remove(impl)
  kr_scale = bank.scale(bank.router_layers[0], "kr")
  kr_bytes = bank.kr(bank.router_layers[0]).nbytes + (kr_scale.nbytes if kr_scale is not None
                                                       else 0)
  report(rows, impls, bank, bw, kr_bytes, encode_s)


def bench_impl(impl, bank, model, params, args, rows, bw, rng):
  """Route / prefill / decode timings with one routing implementation."""
  from msa_jax.inference import engine as engine_lib
  from msa_jax.inference.bank_routing import sharded_top_k
  from msa_jax.inference.memory import DeviceBank
  cfg = model.config
  if True:
    placed = DeviceBank.load(bank, kv_placement="device", routing_impl=impl)
    layer = bank.router_layers[0]
    mesh = placed.settings.mesh
    kr_scale = bank.scale(layer, "kr")
    kr_bytes = bank.kr(layer).nbytes + (kr_scale.nbytes if kr_scale is not None else 0)
    for b in (1, 8):
      f = cfg.num_kv_heads * cfg.head_dim
      rq = jnp.asarray(rng.normal(size=(b, args.question_len, f)).astype(np.float32))
      mask = jnp.ones((b, args.question_len), bool)
      route = jax.jit(lambda q, m, kr, doc, sc: sharded_top_k(mesh, q, m, kr, doc, cfg.top_k,
                                                              tile=placed.settings.tile,
                                                              implementation=impl, kr_scale_c=sc,
                                                              max_doc_chunks=placed.settings.max_doc_chunks))
      ms = time_ms(route, rq, mask, placed.kr[layer], placed.chunk_doc,
                   placed.scales["kr"][layer])
      rows[f"route_ms_{impl}_b{b}"] = ms
      rows[f"route_floor_ms_b{b}"] = kr_bytes / bw / 1e6
    eng = engine_lib.Engine(model, params, "bank", placed.settings)
    for b in (1, 8):
      m = 64
      tokens = rng.integers(8, cfg.vocab_size, (b, m)).astype(np.int32)
      q_len = np.full((b,), args.question_len, np.int32)
      start = np.full((b,), engine_lib.active_start(cfg, 1), np.int32)
      prefix = engine_lib.bank_prefix(bank, b)
      pre = lambda: eng.prefill(placed.arrays(), prefix, tokens, q_len, start,
                                route_rows=args.question_len)
      rows[f"prefill_ms_{impl}_b{b}"] = time_ms(lambda: pre()[0], iters=3)
      logits, _, cache = pre()          # neither decode timing consumes the cache
      rows[f"decode_ms_per_token_{impl}_b{b}"] = decode_ms(model, params, cache, q_len, start)
      new = min(16, m + 1 - args.question_len)      # the buffer's room for new tokens
      if new >= 2:
        rows[f"decode_loop_ms_per_token_{impl}_b{b}"] = decode_loop_ms(eng, cache, logits, q_len,
                                                                       start, new)


def encode_mfu(cfg, doc_lengths, seconds: float) -> dict:
  """Useful encode FLOP/s (``flops.encode_flops``) over the measured bf16 matmul rate and
  over the vendor peak."""
  from msa_jax import flops, metrics
  rate = metrics.matmul_rate()
  peak, _ = metrics.device_peak_flops()
  achieved = flops.encode_flops(cfg, doc_lengths) / seconds
  return {"encode_tflops": achieved / 1e12, "matmul_tflops": rate / 1e12,
          "encode_mfu_measured": achieved / rate,
          "encode_mfu_vendor": achieved / peak if peak else float("nan")}


def decode_ms(model, params, cache, q_len_b, start_b, profile_dir: str = "", log=print) -> float:
  """One decoding step from a prefilled KV cache (every row at slot ``q_len_b``), in ms;
  with ``profile_dir``, also logs the step's kernel table (``benchmarks.profile_summary``)."""
  from msa_jax.inference import engine as engine_lib
  tok = jnp.zeros((len(q_len_b),), jnp.int32)
  cur, start = jnp.asarray(q_len_b), jnp.asarray(start_b)
  # The parameters are an argument, not a closure: closed over, they become constants of
  # the program (8 GB at the 4B shape; lowering alone took 17 s on the H200).
  # One compile: the timed and the profiled calls run this executable, whose HLO is printed.
  dec = jax.jit(lambda p, c: engine_lib.decode_step(model, p, c, tok, cur, start)[0]).lower(
      params, cache).compile()
  ms = time_ms(dec, params, cache, iters=5)
  if profile_dir:
    from benchmarks import profile_summary
    profile_summary.profile_calls(lambda: jax.block_until_ready(dec(params, cache)), profile_dir,
                                  calls=3, title=f"decode step, batch {len(q_len_b)}", log=log,
                                  hlo_text=dec.as_text())
  return ms


def decode_loop_ms(eng, cache, logits_bv, q_len_b, start_b, new_tokens: int = 16) -> float:
  """ms per decoding step of ``Engine.decode_tokens``: ``new_tokens`` greedy tokens per row
  sampled in one device loop (no stop token, so every step runs), as ``interleave.generate``
  answers: per-token host work and dispatch are gone from it. The first token comes from
  the prefill's logits, so a call runs ``new_tokens - 1`` decoding steps (and
  ``new_tokens`` samplings): the call's time over ``new_tokens - 1``."""
  if new_tokens < 2:
    raise ValueError(f"new_tokens={new_tokens}: at least 2 (one decoding step)")
  key = jax.random.PRNGKey(0)
  finished = np.zeros((len(q_len_b),), bool)
  run = lambda: eng.decode_tokens(cache, logits_bv, key, q_len_b, start_b, finished,  # noqa: E731
                                  max_new_tokens=new_tokens)[0]
  return time_ms(run, iters=3) / (new_tokens - 1)


def report(rows, impls, bank, bw, kr_bytes, encode_s):
  print(f"\n{device_name()}  bank {rows['memory_tokens']:,} tokens, {rows['num_chunks']:,} "
        f"chunks, {len(bank.router_layers)} router layers")
  print(f"encode: {rows['encode_tokens_per_s']:,.0f} tokens/s ({encode_s:.1f}s)")
  print(f"read bandwidth {bw:,.0f} GB/s; one layer's K̄R {kr_bytes / 1e6:,.1f} MB")
  print(f"{'stage':32s} {'batch 1':>10s} {'batch 8':>10s}")
  for key in ["route_floor_ms"] + [f"{s}_{i}" for i in impls
                                   for s in ("route_ms", "prefill_ms", "decode_ms_per_token",
                                             "decode_loop_ms_per_token")]:
    print(f"{key:32s} {rows.get(key + '_b1', float('nan')):10.3f} "
          f"{rows.get(key + '_b8', float('nan')):10.3f}")
  write_json(os.path.join(out_dir(), "engine.json"), rows)


if __name__ == "__main__":
  main()
