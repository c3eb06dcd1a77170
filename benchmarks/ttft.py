"""100M tokens of memory on one device: routing vs its read floor, time to first token,
decode speed and peak memory, on a synthetic bank of the model's shape (issue 11).

  python -m benchmarks.ttft --shape=qwen3-4b --tokens=100000000      # one H200
  python -m benchmarks.ttft --shape=tiny --tokens=20000              # CPU smoke check

RANDOM WEIGHTS AND RANDOM KEYS: the model is random-initialised at the shape and the bank
is synthesised in device memory in the bank's layout (``benchmarks.synth_bank``: random
unit-norm K̄R, normal K̄/V̄, document lengths drawn from the shape's recipe task, each
precision quantised as an encode would). Routing, fetch and attention cost depend on how
many keys there are and how they are stored, not on their values; the answers mean nothing.

Measures, medians after warm-up (``benchmarks.time_ms``):
  * route: one router layer's top-k over 1M / 10M / 100M tokens (capped at ``--tokens``)
    for each ``--kr_dtypes`` precision and each ``--route_impls`` implementation
    (``xla``: the tiled scan, float32 HIGHEST scores; ``xla-bf16``: bfloat16 operands with
    float32 accumulation; on a GPU only: ``pallas``, the route as the engine runs it
    (``engine_block_sizes``: since 2026-12-04 the unfused chunk-score kernel, bf16 keys
    with bf16 wgmma, fp8/int8 codes with fp8/int8 wgmma against per-column quantised
    queries, then the top-k from the chunk scores' row maxima), ``pallas-nolayout`` (the
    same, chunk runs rebuilt in every call); the fused kernel's variants (bank layout
    built once; two programs per SM, 256-feature steps for int8 keys): ``pallas-fold`` /
    ``pallas-nofold`` (batch 8 folded into the query columns, or one pass per example),
    ``pallas-fused`` / ``pallas-unfused`` (the fused block top-k
    kernel, or chunk scores + the XLA top-k over the chunk scores' row maxima,
    ``block_routing.run_top_k``), ``pallas-unfused-segmax`` (the unfused route through a
    segment max over every document before its top-k, as before 2026-12-04), ``pallas-noskip`` (every
    tile merged, ``BlockSizes.skip_beaten=False``), ``pallas-f256`` (256-feature pipeline
    steps for every key dtype), ``pallas-fp8q1`` (fp8 keys against one-term e4m3 queries,
    ``BlockSizes.fp8_query_terms=1``; the unfused route's default since 2026-12-05),
    ``pallas-unfused-fp8q2`` (the unfused route with two query terms, the code and its
    e4m3 residual); any of them with ``:FIELD=VALUE`` overrides of
    ``BlockSizes``, e.g. ``pallas:features=128:programs_per_sm=1``, the route before
    2026-12-01T23Z), beside its read floor: bytes of K̄R codes + scales over the
    pure-read bandwidth measured in this run (``benchmarks.read_bandwidth_gbs``), and a
    pure read of the same K̄R arrays timed the same way (``read_ms``; with
    ``--route_profile`` also both device times, ``x_read_device``);
  * time to first token of a ``--question_len``-token question at batch 1 (and 8) on the
    full bank (``--kr_dtype``/``--kv_dtype``, K̄/V̄ on the device) at each size: the whole
    prefill, and its parts timed alone: routing in every router layer, the fetch of the
    selected documents' chunks (with dequantisation), the rest (the question's forward
    through every layer, by difference); floor: every layer's K̄R plus the weights, read once;
    and every router layer's K̄R read in one program (``read_all_layers_ms``), the routing's
    floor as the engine pays it (one program's start for all layers);
  * decode ms/token from the KV cache at batch 1 and 8;
  * one question end to end through ``MemoryEngine.generate`` (wall time, tokens);
  * peak device memory (``memory_stats``) and peak host RSS.
Prints a table and writes ``ttft.json`` (``ttft_route.json`` / ``ttft_ttft.json`` with
``--stages``) to ``--out`` (default ``$OUT`` or benchmarks/results). On a GPU let JAX use
most of the memory: ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` (a 100M-token Qwen3-4B bank at
fp8/int8 is ~113 GB with the recipe's 100-token documents, plus 8 GB of bf16 weights).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import resource
import time

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from benchmarks import (device_memory_stat, device_name, gpu_kernel_times, out_dir,
                        read_bandwidth_gbs, time_ms, write_json)
from benchmarks import synth_bank
from benchmarks.engine import decode_loop_ms, decode_ms

SIZES = (1_000_000, 10_000_000, 100_000_000)


def random_model(shape: str, kernels: str = ""):
  """The shape's model, random-initialised, parameters in the compute dtype; ``kernels``
  overrides the recipe's attention implementation (auto | pallas | xla)."""
  import flax.linen as nn
  from msa_jax.model import MSAModel
  base = synth_bank.model_config_of(shape)
  cfg = base.replace(param_dtype=base.dtype, remat=False, kernels=kernels or base.kernels)
  model = MSAModel(cfg)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                   jnp.zeros((1, 8), jnp.int32))["params"])
  return model, random_params(shapes)


def random_params(shapes, seed: int = 0, std: float = 0.02):
  """Parameters of the ``jax.ShapeDtypeStruct`` tree ``shapes``: normal(0, ``std``) matrices
  and embeddings, ones for vectors (the norms' scales), as the model's init draws them.

  Not ``jax.jit(model.init)``: at the 4B shape that one program of 36 unrolled layers
  took minutes to compile on the H200; here one small program per distinct shape does.
  """
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  out = [_random_leaf(tuple(x.shape), jnp.dtype(x.dtype), std)(k) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def _random_leaf(shape: tuple, dtype, std: float):
  if len(shape) < 2:
    return jax.jit(lambda key: jnp.ones(shape, dtype))
  return jax.jit(lambda key: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype))


def nbytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree) if x is not None))


def host_peak_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def sizes_for(tokens: int, sizes: str) -> list[int]:
  return sorted({min(int(s), tokens) for s in sizes.split(",")})


ROUTE_IMPLS = ("xla", "xla-bf16", "pallas", "pallas-fold", "pallas-nofold", "pallas-nolayout",
               "pallas-fp8q1", "pallas-fused", "pallas-unfused", "pallas-unfused-fp8q1",
               "pallas-unfused-fp8q2", "pallas-noskip", "pallas-f256", "pallas-unfused-segmax")


def split_impl(impl: str) -> tuple[str, dict]:
  """``"pallas-f256:programs_per_sm=2:stages=3"`` → ``("pallas-f256", {"programs_per_sm": 2,
  "stages": 3})``: a ``ROUTE_IMPLS`` name, then ``BlockSizes`` fields to override (ints,
  true/false, or words such as ``tail_method=sort``), each after a colon."""
  from pallas_kernels.block_routing import BlockSizes
  name, *opts = impl.split(":")
  if name not in ROUTE_IMPLS:
    raise ValueError(f"route implementation {name!r}: choose from {', '.join(ROUTE_IMPLS)}")
  fields = {fl.name for fl in dataclasses.fields(BlockSizes)}
  overrides = {}
  for opt in opts:
    key, _, value = opt.partition("=")
    if key not in fields or not value:
      raise ValueError(f"route implementation {impl!r}: {opt!r} is not FIELD=VALUE with a "
                       f"BlockSizes field ({', '.join(sorted(fields))})")
    if name.startswith("xla"):
      raise ValueError(f"route implementation {impl!r}: BlockSizes options need a pallas route")
    lowered = value.lower()
    overrides[key] = ({"true": True, "false": False}[lowered] if lowered in ("true", "false")
                      else int(value) if value.lstrip("-").isdigit() else value)
  return name, overrides


def route_impl_args(impl: str, f: int, layouts, key_dtype: str = "bfloat16") -> dict:
  """``sharded_top_k`` keyword arguments of a ``--route_impls`` name (see module doc and
  :func:`split_impl`)."""
  impl, overrides = split_impl(impl)
  if impl.startswith("xla"):
    return {"implementation": "xla",
            "score_dtype": "bfloat16" if impl == "xla-bf16" else "float32"}
  from msa_jax.inference.bank_routing import engine_block_sizes
  # the fused kernel's options name the fused kernel; "pallas" / "pallas-nolayout" are the
  # engine's default route (unfused since 2026-12-04)
  fused = {"pallas-fused": True, "pallas-fold": True, "pallas-nofold": True,
           "pallas-fp8q1": True, "pallas-noskip": True, "pallas-f256": True,
           "pallas-unfused": False, "pallas-unfused-fp8q1": False,
           "pallas-unfused-fp8q2": False, "pallas-unfused-segmax": False}
  named = {"fold_batch": {"pallas-fold": True, "pallas-nofold": False}.get(impl),
           # the engine's default terms (one for the unfused fp8 route) unless named
           **({"fp8_query_terms": 1} if impl.endswith("fp8q1") else
              {"fp8_query_terms": 2} if impl.endswith("fp8q2") else {}),
           "skip_beaten": impl != "pallas-noskip",
           **({"features": 256} if impl == "pallas-f256" else {}),
           **({"fused": fused[impl]} if impl in fused else {})}
  # An explicit FIELD=VALUE wins over the name's default (e.g. pallas:fp8_query_terms=1).
  bs = engine_block_sizes(f, key_dtype, **{**named, **overrides})
  return {"implementation": "pallas", "block_sizes": bs,
          "layouts": None if impl == "pallas-nolayout" else layouts,
          **({"max_doc_chunks": None} if impl == "pallas-unfused-segmax" else {})}


def read_keys(kr, scale):
  """A pure read of one layer's K̄R codes (and scales): the route's floor as a program of
  its own. The codes are read as 32-bit words summed as integers (one scalar written), the
  same reduce for every precision: summing 8-bit codes as floats ran at ~2.9 TB/s on the
  H200 (2026-12-05), a convert per byte, against ~4.5 TB/s for bf16."""
  words = kr.reshape(*kr.shape[:-1], -1, 4 // kr.dtype.itemsize)
  total = jnp.sum(lax.bitcast_convert_type(words, jnp.uint32), dtype=jnp.uint32)
  total = total.astype(jnp.float32)      # a scalar: the layers' reads add up (read_all)
  return total if scale is None else total + jnp.sum(scale, dtype=jnp.float32)


def bench_route(cfg, lengths, n_tokens, kr_dtypes, question_len, bw, rows, log,
                impls=ROUTE_IMPLS, profile: bool = False, iters: int = 5):
  """One router layer at ``n_tokens`` for each K̄R precision and implementation
  (``profile``: each batch-1 route's kernels and their device time, from the profiler).

  Each route is compared with two floors: the layer's bytes over the read bandwidth of
  ``bw`` (``floor_ms``), and a pure read of the same K̄R arrays timed the same way
  (``read_ms``, ``time_ms`` with ``iters`` calls a sample: a sample's first dispatch and
  last synchronisation are shared by its calls, so more ``iters`` amortise them; with
  ``profile`` also the read's device time, ``read_device_us``)."""
  from msa_jax.inference.bank_routing import sharded_layouts, sharded_top_k
  on_gpu = jax.devices()[0].platform == "gpu"
  if not on_gpu and any(i.startswith("pallas") for i in impls):
    log("route: pallas rows need a GPU (the Mosaic GPU kernel); timing the xla rows only")
    impls = [i for i in impls if not i.startswith("pallas")]
  one_layer = cfg.replace(router_layers=(cfg.router_layer_ids[0],))
  sub = lengths[:int(np.searchsorted(np.cumsum(lengths), n_tokens) + 1)]
  f = cfg.num_kv_heads * cfg.head_dim
  rng = np.random.default_rng(0)
  for kr_dtype in kr_dtypes:
    placed = synth_bank.synthetic_device_bank(one_layer, sub, kr_dtype=kr_dtype,
                                              kv_dtype=cfg.dtype, with_kv=False, log=log)
    layer = placed.bank.router_layers[0]
    kr, scale = placed.kr[layer], placed.scales["kr"][layer]
    key_bytes = placed.bank.num_chunks * f * np.dtype(jnp.dtype(kr_dtype)).itemsize
    scale_bytes = 4 * placed.bank.num_chunks if scale is not None else 0
    floor = (key_bytes + scale_bytes) / bw / 1e6
    read_fn = jax.jit(read_keys)
    read_ms = time_ms(read_fn, kr, scale, iters=iters)
    read_dev = (sum(t for _, t in gpu_kernel_times(read_fn, kr, scale))
                if profile and on_gpu else None)
    log(f"route: a pure read of the layer's {(key_bytes + scale_bytes) / 1e9:.2f} GB of "
        f"{kr_dtype} K̄R {read_ms:.3f} ms ({(key_bytes + scale_bytes) / read_ms / 1e6:,.0f} GB/s)"
        + (f", device {read_dev:.1f} us" if read_dev is not None else ""))
    layouts = None
    if any(i.startswith("pallas") for i in impls):   # a bank property: built once, timed
      t0 = time.perf_counter()
      layouts = jax.block_until_ready(sharded_layouts(placed.settings.mesh, placed.chunk_doc))
      log(f"route: fused-kernel bank layouts built in {time.perf_counter() - t0:.2f} s "
          "(once per bank, compile included)")
    for impl in impls:
      for b in (1, 8):
        if impl.startswith(("pallas-fold", "pallas-nofold")) and b == 1:
          continue            # one example: nothing to fold
        if split_impl(impl)[0].endswith(("fp8q1", "fp8q2")) and kr_dtype != "float8_e4m3fn":
          continue            # e4m3 query terms: fp8 keys only
        rq = jnp.asarray(rng.normal(size=(b, question_len, f)).astype(np.float32))
        mask = jnp.ones((b, question_len), bool)
        kw = route_impl_args(impl, f, layouts, kr_dtype)
        lay = kw.pop("layouts", None)
        kw.setdefault("max_doc_chunks", placed.settings.max_doc_chunks)   # as the engine
        fn = jax.jit(lambda q, m, kr, doc, sc, lay, kw=kw: sharded_top_k(
            placed.settings.mesh, q, m, kr, doc, cfg.top_k, kr_scale_c=sc, layouts=lay, **kw))
        try:
          ms = time_ms(fn, rq, mask, kr, placed.chunk_doc, scale, lay, iters=iters)
        except Exception as e:  # noqa: BLE001  (a kernel that does not run here is reported)
          log(f"route {kr_dtype} {impl}: failed: {type(e).__name__}: {str(e)[:300]}")
          rows.append({"stage": "route", "tokens": int(sub.sum()), "kr_dtype": kr_dtype,
                       "impl": impl, "batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"})
          continue
        row = {"stage": "route", "tokens": int(sub.sum()), "chunks": placed.bank.num_chunks,
               "kr_dtype": kr_dtype, "impl": impl, "batch": b, "ms": ms,
               "floor_ms": floor, "x_floor": ms / floor, "key_bytes": key_bytes,
               "scale_bytes": scale_bytes, "read_ms": read_ms, "x_read": ms / read_ms,
               "timing_iters": iters}
        rows.append(row)
        log(f"route {int(sub.sum()):>12,} tokens {kr_dtype:14s} {impl:15s} b{b}: {ms:8.3f} ms "
            f"(floor {floor:.3f} ms, {ms / floor:.2f}x; read {read_ms:.3f} ms, "
            f"{ms / read_ms:.2f}x)")
        if profile and b == 1:
          ker = gpu_kernel_times(fn, rq, mask, kr, placed.chunk_doc, scale, lay)
          row["device_us"] = sum(t for _, t in ker)
          row["kernels_us"] = ker[:16]
          if read_dev:
            row["read_device_us"] = read_dev
            row["x_read_device"] = row["device_us"] / read_dev
          log(f"    device {row['device_us']:.1f} us"
              + (f" ({row['device_us'] / read_dev:.3f}x the read's {read_dev:.1f})"
                 if read_dev else "") + f" in {len(ker)} kernels: "
              + "; ".join(f"{n[:32]} {t:.1f}" for n, t in ker[:16]))
    del placed, kr, scale, layouts
    gc.collect()


def ttft_routing(cfg, args) -> str:
  """What ``MemoryEngine.load(routing="auto")`` would pick for this bank."""
  from msa_jax.inference.memory_engine import default_routing
  if args.routing != "auto":
    return args.routing
  return default_routing(cfg.top_k, cfg.num_kv_heads * cfg.head_dim, args.kr_dtype)


def end_to_end(model, params, placed, question: list[int], new_tokens: int = 16) -> dict:
  """One question answered through ``MemoryEngine.generate`` (Memory Interleave, sampling
  on the host): wall time, tokens generated and the engine's own stage timings. Random
  weights: the answer means nothing and may end early (a random id is not in the bank)."""
  from msa_jax.data.tokenizer import SpecialTokens
  from msa_jax.inference.memory_engine import MemoryEngine
  specials = SpecialTokens(pad=0, eos=1, id_end=2, end_of_retrieval=3)
  engine = MemoryEngine(model, params, placed, None, specials, batch_size=1, max_rounds=1)
  row = {"question_tokens": question}
  engine.generate([row], max_new_tokens=new_tokens)              # compile
  t0 = time.perf_counter()
  (out,) = engine.generate([row], max_new_tokens=new_tokens)
  wall = 1e3 * (time.perf_counter() - t0)
  answer = out.get("answer_tokens") or []
  return {"e2e_wall_ms": wall, "e2e_new_tokens": len(answer), "e2e_timings_ms": out["timings_ms"],
          "e2e_failure": out.get("failure")}


def bench_ttft(model, params, lengths, n_tokens, args, bw, rows, log):
  """Time to first token (with its parts) and decode on the full bank at ``n_tokens``."""
  from msa_jax import routing
  from msa_jax.inference import engine as engine_lib
  from msa_jax.inference.bank_routing import sharded_top_k
  from msa_jax.inference.memory import _device_gather, _host_gather
  cfg = model.config
  sub = lengths[:int(np.searchsorted(np.cumsum(lengths), n_tokens) + 1)]
  placed = synth_bank.synthetic_device_bank(cfg, sub, kr_dtype=args.kr_dtype,
                                            kv_dtype=args.kv_dtype,
                                            routing_impl=ttft_routing(cfg, args),
                                            score_dtype=args.score_dtype,
                                            route_fused=args.engine_route != "unfused",
                                            kv_placement=args.kv_placement, log=log)
  bank, s = placed.bank, placed.settings
  if args.route_options:
    s = dataclasses.replace(s, route_options=args.route_options)
    log(f"engine route: {s.route_block_sizes(cfg.num_kv_heads * cfg.head_dim, args.kr_dtype)}")
  kr_bytes = nbytes(placed.kr) + nbytes(placed.scales["kr"])
  kv_bytes = nbytes(placed.k) + nbytes(placed.v) + nbytes(placed.scales["k"]) \
      + nbytes(placed.scales["v"]) + nbytes(bank.host_kv)
  w_bytes = nbytes(params)
  eng = engine_lib.Engine(model, params, "bank", s)
  f = cfg.num_kv_heads * cfg.head_dim
  rng = np.random.default_rng(1)
  q, decode_room = args.question_len, 16
  row = {"stage": "ttft", "tokens": bank.num_tokens, "chunks": bank.num_chunks,
         "routing": s.routing, "score_dtype": s.score_dtype,
         "kr_dtype": args.kr_dtype, "kv_dtype": args.kv_dtype, "kv_placement": args.kv_placement,
         "kr_bytes": kr_bytes,
         "kv_bytes": kv_bytes, "weight_bytes": w_bytes,
         "floor_ms": (kr_bytes + w_bytes) / bw / 1e6}
  # the routing's floor as the engine pays it: every router layer's K̄R read in one program
  read_all = jax.jit(lambda a: sum(read_keys(a["kr"][i], a["scales"]["kr"][i])
                                   for i in bank.router_layers))
  row["read_all_layers_ms"] = time_ms(read_all, placed.arrays(), iters=3)
  for b in args.ttft_batches:
    tokens = rng.integers(8, cfg.vocab_size, (b, q + decode_room)).astype(np.int32)
    q_len = np.full((b,), q, np.int32)
    start = np.full((b,), engine_lib.active_start(cfg, len(bank.prefix_tokens)), np.int32)
    prefix = engine_lib.bank_prefix(bank, b)
    arrays = placed.arrays()
    pre = lambda: eng.prefill(arrays, prefix, tokens, q_len, start, route_rows=q)
    t0 = time.perf_counter()
    row[f"ttft_ms_b{b}"] = time_ms(lambda: pre()[0], iters=3)
    log(f"ttft b{b}: prefill {row[f'ttft_ms_b{b}']:.2f} ms (compile and timing "
        f"{time.perf_counter() - t0:.0f} s)")
    if args.profile_dir:
      from benchmarks import profile_summary
      # the compiled prefill itself, so the kernel names are the printed program's
      exe = eng._prefill.lower(eng.params, arrays, prefix, tokens, q_len, start, None,
                               route_rows=q).compile()
      row[f"profile_b{b}"] = profile_summary.profile_calls(
          lambda: jax.block_until_ready(exe(eng.params, arrays, prefix, tokens, q_len, start,
                                            None)[0]),
          os.path.join(args.profile_dir, f"prefill_{bank.num_tokens}_b{b}"), calls=3,
          title=f"prefill, {bank.num_tokens:,} tokens, batch {b}", log=log,
          hlo_text=exe.as_text())
    # routing alone, every router layer (queries: random; the cost does not depend on them)
    rq = jnp.asarray(rng.normal(size=(b, q, f)).astype(np.float32))
    mask = jnp.ones((b, q), bool)
    layers = bank.router_layers

    def route_all(rq, mask, arrays):
      out = []
      for i in layers:
        out.append(sharded_top_k(s.mesh, rq, mask, arrays["kr"][i], arrays["chunk_doc"],
                                 cfg.top_k, tile=s.tile, implementation=s.routing,
                                 kr_scale_c=arrays["scales"]["kr"][i],
                                 score_dtype=s.score_dtype,
                                 layouts=arrays["route_layouts"],
                                 block_sizes=s.route_block_sizes(f, args.kr_dtype),
                                 max_doc_chunks=s.max_doc_chunks)[1])
      return out
    row[f"route_all_layers_ms_b{b}"] = time_ms(jax.jit(route_all), rq, mask, arrays, iters=3)
    log(f"ttft b{b}: routing in {len(layers)} layers {row[f'route_all_layers_ms_b{b}']:.2f} ms "
        f"({row[f'route_all_layers_ms_b{b}'] / row['read_all_layers_ms']:.3f}x a read of their "
        f"K̄R in one program, {row['read_all_layers_ms']:.2f} ms)")
    # the fetch of k selected documents' chunks (dequantised), every router layer
    docs = jnp.asarray(np.sort(rng.choice(bank.num_docs, (b, cfg.top_k), replace=False), 1)
                       .astype(np.int32))
    sel = routing.Selection(docs, jnp.ones(docs.shape, bool))

    def fetch_all(arrays, sel):
      out = []
      for i in layers:
        if s.host_fetch is not None:     # host K̄/V̄: a host callback per layer, as the engine
          out.append(_host_gather(s.host_fetch, i, sel, s.max_doc_chunks, b, s.compute_dtype))
          continue
        out.append(_device_gather(s.mesh, arrays["k"][i], arrays["v"][i], arrays["doc_shard"],
                                  arrays["doc_row"], arrays["doc_chunks"], sel,
                                  s.max_doc_chunks, s.compute_dtype, arrays["scales"]["k"][i],
                                  arrays["scales"]["v"][i]))
      return out
    row[f"fetch_all_layers_ms_b{b}"] = time_ms(jax.jit(fetch_all), arrays, sel, iters=3)
    log(f"ttft b{b}: fetch in {len(layers)} layers {row[f'fetch_all_layers_ms_b{b}']:.2f} ms")
    row[f"forward_rest_ms_b{b}"] = (row[f"ttft_ms_b{b}"] - row[f"route_all_layers_ms_b{b}"]
                                    - row[f"fetch_all_layers_ms_b{b}"])
    logits_b, _, cache_b = pre()     # neither decode timing consumes the cache
    row[f"decode_ms_per_token_b{b}"] = decode_ms(
        model, params, cache_b, q_len, start, log=log, profile_dir=args.profile_dir and
        os.path.join(args.profile_dir, f"decode_{bank.num_tokens}_b{b}"))
    log(f"ttft b{b}: decode {row[f'decode_ms_per_token_b{b}']:.2f} ms/token")
    row[f"decode_loop_ms_per_token_b{b}"] = decode_loop_ms(eng, cache_b, logits_b, q_len, start,
                                                           decode_room)
    log(f"ttft b{b}: decode {row[f'decode_loop_ms_per_token_b{b}']:.2f} ms/token in the "
        f"engine's device loop ({decode_room} greedy tokens, {decode_room - 1} decoding steps "
        "a call)")
  nan = float("nan")
  row.update({"e2e_wall_ms": nan, "e2e_new_tokens": 0, "e2e_failure": "not run (--no_e2e)"})
  if args.e2e:
    row.update(end_to_end(model, params, placed, rng.integers(8, cfg.vocab_size, q).tolist()))
  row["device_peak_bytes"] = device_memory_stat("peak_bytes_in_use")
  row["host_peak_bytes"] = host_peak_bytes()
  rows.append(row)
  g = lambda key: row.get(key, nan)  # noqa: E731  (batches not run)
  log(f"ttft {bank.num_tokens:,} tokens: b1 {g('ttft_ms_b1'):.2f} ms (route "
      f"{g('route_all_layers_ms_b1'):.2f}, fetch {g('fetch_all_layers_ms_b1'):.2f}, rest "
      f"{g('forward_rest_ms_b1'):.2f}; floor {row['floor_ms']:.2f}); decode b1 "
      f"{g('decode_ms_per_token_b1'):.2f} ms/token ({g('decode_loop_ms_per_token_b1'):.2f} in "
      f"the device loop), b8 {g('decode_ms_per_token_b8'):.2f} "
      f"({g('decode_loop_ms_per_token_b8'):.2f}); "
      f"end to end {row['e2e_wall_ms']:.1f} ms for {row['e2e_new_tokens']} tokens "
      f"({row['e2e_failure'] or 'no failure'})")
  del placed, eng, arrays
  gc.collect()


def report(result: dict) -> None:
  print(f"\n{result['device']}  shape {result['shape']}  read bandwidth "
        f"{result['read_bandwidth_gbs']:,.0f} GB/s  (random weights, synthetic bank)")
  print(f"{'route one layer':32s} {'tokens':>12s} {'batch':>5s} {'ms':>9s} {'floor':>9s} "
        f"{'x floor':>8s} {'read':>9s} {'x read':>7s} {'x read (device)':>16s}")
  for r in result["route"]:
    if "ms" in r:
      print(f"  {r['kr_dtype'] + ' ' + r['impl']:30s} {r['tokens']:>12,} {r['batch']:>5d} "
            f"{r['ms']:9.3f} {r['floor_ms']:9.3f} {r['x_floor']:8.2f} "
            f"{r.get('read_ms', float('nan')):9.3f} {r.get('x_read', float('nan')):7.2f} "
            f"{r.get('x_read_device', float('nan')):16.3f}")
  print(f"\n{'time to first token':22s} {'tokens':>12s} {'TTFT b1':>9s} {'route':>8s} "
        f"{'fetch':>8s} {'rest':>8s} {'floor':>8s} {'TTFT b8':>9s} {'dec b1':>8s} {'dec b8':>8s}"
        f" {'dev peak GB':>11s} {'host GB':>8s}")
  for r in result["ttft"]:
    dev = r["device_peak_bytes"]
    r = {k: r.get(k, float("nan")) for k in (*r, *(f"{p}_b{b}" for b in (1, 8) for p in (
        "ttft_ms", "route_all_layers_ms", "fetch_all_layers_ms", "forward_rest_ms",
        "decode_ms_per_token")))}
    print(f"  K̄R {r['kr_dtype']:9s} K̄V̄ {r['kv_dtype']:5s} {r['tokens']:>12,} "
          f"{r['ttft_ms_b1']:9.2f} {r['route_all_layers_ms_b1']:8.2f} "
          f"{r['fetch_all_layers_ms_b1']:8.2f} {r['forward_rest_ms_b1']:8.2f} "
          f"{r['floor_ms']:8.2f} {r['ttft_ms_b8']:9.2f} {r['decode_ms_per_token_b1']:8.2f} "
          f"{r['decode_ms_per_token_b8']:8.2f} "
          f"{(dev / 1e9 if dev else float('nan')):11.1f} {r['host_peak_bytes'] / 1e9:8.1f}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="qwen3-4b", choices=sorted(synth_bank.SHAPES))
  ap.add_argument("--tokens", type=int, default=100_000_000, help="the largest bank")
  ap.add_argument("--route_sizes", default=",".join(map(str, SIZES)))
  ap.add_argument("--ttft_sizes", default=",".join(map(str, SIZES)))
  ap.add_argument("--kr_dtypes", default="bfloat16,float8_e4m3fn,int8",
                  help="K̄R precisions timed in the one-layer routing benchmark")
  ap.add_argument("--kr_dtype", default="float8_e4m3fn", help="K̄R of the TTFT bank")
  ap.add_argument("--kv_dtype", default="int8", help="K̄/V̄ of the TTFT bank")
  ap.add_argument("--doc_lengths", default="recipe", help="recipe | lognormal:MEDIAN:SIGMA")
  ap.add_argument("--question_len", type=int, default=64)
  ap.add_argument("--routing", default="auto", choices=["auto", "xla", "pallas"],
                  help="routing of the TTFT bank (auto: as MemoryEngine.load picks)")
  ap.add_argument("--score_dtype", default="float32", choices=["float32", "bfloat16"],
                  help="XLA routing scores of the TTFT bank (the engine's default: float32)")
  ap.add_argument("--route_impls", default=",".join(ROUTE_IMPLS),
                  help="routing implementations timed in the route stage (each is described "
                       f"in the module docstring): {', '.join(ROUTE_IMPLS)}")
  ap.add_argument("--stages", default="route,ttft",
                  help="route and/or ttft (split them when one call has a time limit)")
  ap.add_argument("--kv_placement", default="device", choices=["device", "host"],
                  help="the ttft stage's K̄/V̄: on the device, or in host memory fetched per "
                       "router layer through a host callback (DeviceBank.load's 'host')")
  ap.add_argument("--engine_route_options", default="",
                  help="BlockSizes overrides of the engine's Pallas route in the ttft stage, "
                       "FIELD=VALUE joined by colons (e.g. features=256:programs_per_sm=2)")
  ap.add_argument("--engine_route", default="unfused", choices=["fused", "unfused"],
                  help="the engine's Pallas route for the TTFT stage (BankSettings."
                       "route_fused): the unfused chunk-score kernel + XLA top-k (the "
                       "engine's default since 2026-12-04) or the fused block top-k kernel")
  ap.add_argument("--ttft_batches", default="1,8", help="batch sizes of the TTFT stage")
  ap.add_argument("--timing_iters", type=int, default=5,
                  help="route stage: calls launched back to back per timing sample (the "
                       "sample's first dispatch and final sync are shared by them)")
  ap.add_argument("--route_profile", action="store_true",
                  help="route stage: each batch-1 route's kernels and device time (profiler)")
  ap.add_argument("--profile_dir", default="",
                  help="profile 3 prefills per batch size here; print their kernel table")
  ap.add_argument("--kernels", default="", choices=["", "auto", "pallas", "xla"],
                  help="the model's attention implementation (default: the recipe's)")
  ap.add_argument("--no_e2e", dest="e2e", action="store_false",
                  help="skip the end-to-end MemoryEngine.generate question (its own compile)")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  log = lambda msg: print(msg, flush=True)
  t0 = time.perf_counter()
  stages = args.stages.split(",")
  args.ttft_batches = [int(b) for b in args.ttft_batches.split(",")]
  if not set(stages) <= {"route", "ttft"}:
    raise SystemExit(f"--stages={args.stages!r}: choose from route, ttft")
  impls = args.route_impls.split(",")
  try:
    for impl in impls:
      split_impl(impl)
    args.route_options = tuple(sorted(split_impl(
        "pallas:" + args.engine_route_options)[1].items())) if args.engine_route_options else ()
  except ValueError as e:
    raise SystemExit(f"--route_impls={args.route_impls!r} / --engine_route_options="
                     f"{args.engine_route_options!r}: {e}") from None
  cfg = synth_bank.model_config_of(args.shape)
  lengths = synth_bank.doc_lengths(args.shape, args.tokens, args.doc_lengths)
  size = synth_bank.bank_bytes(cfg, lengths, args.kr_dtype, args.kv_dtype)
  log(f"{args.shape}: {args.tokens:,}-token bank = {len(lengths):,} documents, "
      f"{size['chunks']:,} chunks; K̄R {args.kr_dtype} {size['kr'] / 1e9:.2f} GB, K̄/V̄ "
      f"{args.kv_dtype} {size['kv'] / 1e9:.2f} GB")
  bw = read_bandwidth_gbs()
  log(f"read bandwidth {bw:,.0f} GB/s")
  result = {"shape": args.shape, "model": cfg.to_dict(), "kernels": args.kernels or cfg.kernels, "stages": stages, "random_weights": True,
            "synthetic_bank": True, "doc_lengths": args.doc_lengths,
            "question_len": args.question_len, "read_bandwidth_gbs": bw,
            "route": [], "ttft": []}
  if "route" in stages:
    for n in sizes_for(args.tokens, args.route_sizes):
      bench_route(cfg, lengths, n, args.kr_dtypes.split(","), args.question_len, bw,
                  result["route"], log, impls, args.route_profile, args.timing_iters)
  if "ttft" in stages:
    model, params = random_model(args.shape, args.kernels)
    result["weight_bytes"] = nbytes(params)
    log(f"model: random weights, {nbytes(params) / 1e9:.2f} GB")
    for n in sizes_for(args.tokens, args.ttft_sizes):
      bench_ttft(model, params, lengths, n, args, bw, result["ttft"], log)
  result["seconds"] = time.perf_counter() - t0
  report(dict(result, device=device_name()))
  name = "ttft.json" if len(stages) == 2 else f"ttft_{stages[0]}.json"
  path = os.path.join(args.out or out_dir(), name)
  write_json(path, result)
  log(f"wrote {path}")


if __name__ == "__main__":
  main()
