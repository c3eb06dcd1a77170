r"""The training step at the recipes' real shapes: compile time, step time, tokens/s, MFU,
peak memory, and the largest batch that fits.

For each variant (``configs/16k_to_100m.py``: ``0.6b``, ``4b``) and memory size
(``--memory``, memory tokens per example), a real batch of the recipe's data (the kv
task at that memory size, its one bucket shape) is cut to each ``--batches`` size in
turn, ascending; for each size the jitted step of ``msa_jax.trainer.TrainSetup`` (the
one training runs) is lowered and compiled (compile time, ``memory_analysis``), then run
``--steps`` times after one warm-up step (median step time, tokens/s, device peak
memory). The search stops at the first size that does not fit (compile-time estimate
above the device's memory, or an out-of-memory error when run). Parameters are random
(``requires_init_from`` is lifted): speed and memory do not depend on their values.

MFU = useful training FLOPs per second (``msa_jax.flops.step_flops``: valid tokens,
causal attention, LM head on target tokens, forward + backward; remat recompute not
counted) over (a) the vendor bf16 peak and (b) a bf16 matmul rate measured on the
device at start-up (``msa_jax.metrics.matmul_rate``). XLA's own count
(``cost_analysis``) is printed beside the padded count ``executed``; XLA counts a
``lax.scan`` body once, so it is low by the LM-loss chunks after the first and, with
``model.scan_layers`` (on in the 0.6b and 4b recipes), by every layer of a run after the
first (compare with ``--scan_layers off``); it is per device on a mesh.

Runs:
  python -m benchmarks.train_step                              # one H200: 0.6b and 4b, 16K and 64K
  python -m benchmarks.train_step --variants 0.6b --memory 16384 --batches 16,32,48,64
  python -m benchmarks.train_step --tiny --cpu_devices 8 --mesh 2,2,2   # sharding check on CPU
  python -m benchmarks.train_step --buckets                    # bucket shapes and padding only
  python -m benchmarks.train_step --tiny --compile_layers 2,4,8,16 --scan_layers both
                                                               # compile time vs depth
  python -m benchmarks.train_step --variants 0.6b --memory 16384 --batches 1,2 --memory_analysis 2,4
                                                               # temp memory, compile only (CPU)
Prints a table and writes ``train_step.json`` and ``train_step.png`` (``train_step_cpu.*``
on a CPU; the JSON after every measured batch, so a command stopped by a time limit keeps
its rows) to ``$OUT`` (or benchmarks/results).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", default="0.6b,4b")
  p.add_argument("--memory", default="16384,65536", help="memory tokens per example")
  p.add_argument("--batches", default="8,16,32,48,64",
                 help="batch sizes to try, ascending; stops at the first that does not fit")
  p.add_argument("--steps", type=int, default=5,
                 help="timed steps per batch size (0: compile only, report memory_analysis)")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (-1: the rest)")
  p.add_argument("--tiny", action="store_true",
                 help="the variants' structure at a small width and memory (CPU checks)")
  p.add_argument("--cpu_devices", type=int, default=0,
                 help="force this many CPU devices (set before JAX starts its backend)")
  p.add_argument("--buckets", action="store_true",
                 help="only print each variant's bucket shapes and padding at 1, 2, 4 levels")
  p.add_argument("--compile_layers", default="",
                 help="only measure compile time of one step vs num_layers, e.g. 2,4,8")
  p.add_argument("--scan_layers", default="recipe", choices=("recipe", "on", "off", "both"),
                 help="model.scan_layers: the recipe's, forced on or off, or (with "
                      "--compile_layers) both, off first")
  p.add_argument("--flop_check", action="store_true",
                 help="compare the executed FLOP count with XLA's cost_analysis at the "
                      "recipe's shape (compile only; unrolled, no remat; runs on a CPU)")
  p.add_argument("--memory_analysis", default="",
                 help="only compile (no run) the loss gradient at these num_layers, e.g. 2,4, "
                      "and report XLA's memory_analysis for the chunked LM loss and the old "
                      "full-logits one (kernels forced to xla: the CPU has no Pallas)")
  p.add_argument("--remat_policy", default="",
                 help="override model.remat_policy (none | full | dots | mlp_input); default "
                      "the recipe's")
  p.add_argument("--rms_norm_vjp", default="",
                 help="override model.rms_norm_vjp (autodiff | lean); default the recipe's")
  p.add_argument("--qk_norm_rope_vjp", default="",
                 help="override model.qk_norm_rope_vjp (autodiff | fused | fused_bf16 | pallas); "
                      "default the recipe's")
  p.add_argument("--embed_grad", default="",
                 help="override model.embed_grad (autodiff | f32_scatter | sorted)")
  p.add_argument("--attention_pad_free", action=argparse.BooleanOptionalAction,
                 default=None, help="model.attention_pad_free (the Pallas attention without "
                 "pads); --no-attention_pad_free turns it off; default: the recipe's")
  p.add_argument("--attention_short_persistent", action=argparse.BooleanOptionalAction,
                 default=None, help="model.attention_short_persistent (the documents' "
                 "attention forward as one persistent kernel); --no-... turns it off; "
                 "default: the recipe's")
  p.add_argument("--attention_short_persistent_bwd", action=argparse.BooleanOptionalAction,
                 default=None, help="model.attention_short_persistent_bwd (the documents' "
                 "attention backward as persistent dQ and dK/dV kernels); default: the "
                 "recipe's")
  p.add_argument("--rope_tables", action=argparse.BooleanOptionalAction, default=None,
                 help="model.rope_tables (RoPE's cos/sin computed once a stream, read by "
                 "every layer); default: the recipe's")
  p.add_argument("--compare", default="",
                 help="';'-separated sets of model switches timed one after another in this "
                 "process on the same batch, each on top of the command line's: e.g. "
                 "'base;qk_norm_rope_vjp=fused;rope_tables=true,qk_norm_rope_vjp=fused' "
                 "('base': none; values true/false or a string; 'microbatches=N' sets the "
                 "train config's slices for that set); rows carry the set and the "
                 "step time's ratio to the first set's")
  p.add_argument("--microbatches", type=int, default=1,
                 help="config.microbatches: gradient accumulation over this many slices of "
                      "each batch (e.g. 4 with --remat_policy dots at batch 32)")
  p.add_argument("--compilation_cache_dir", default="",
                 help="JAX's persistent compilation cache (a later command reuses compiles)")
  p.add_argument("--profile_dir", default="",
                 help="profile two more steps per batch size here and print the kernel table")
  p.add_argument("--overlap_init", action="store_true",
                 help="initialise the state (its program compiles for 60-145 s on a fresh "
                      "GPU machine) in another thread while the step compiles: saves that "
                      "time; the step's compile_s then shares the host's cores with it")
  p.add_argument("--out", default="", help="JSON path (default $OUT or benchmarks/results)")
  return p.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
if ARGS.cpu_devices:   # before any JAX backend starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={ARGS.cpu_devices}")
  os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import (compiled_need_bytes, device_memory_stat, device_name, out_dir,
                        write_json)  # noqa: E402
from msa_jax import flops as flops_lib, metrics, sharding, trainer  # noqa: E402
from msa_jax.data import buckets as bucket_lib  # noqa: E402
from msa_jax.data import from_config  # noqa: E402
from msa_jax.train_step import lm_chunk_size  # noqa: E402
from benchmarks.step_compare import add_compare_ratios, compare_sets  # noqa: E402
from benchmarks import train_step_plots  # noqa: E402

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "16k_to_100m.py")


def recipe(variant: str, memory_tokens: int, tiny: bool, mesh: str, scan: str = "recipe",
           **model_overrides):
  """The recipe's config at ``memory_tokens`` per example, random init, one stage;
  ``scan`` "on"/"off" and each given ``model_overrides`` field (:func:`cli_model_overrides`'
  fields; empty or None: the recipe's) override the recipe's model."""
  from msa_jax.run_config import load_config_file
  cfg = load_config_file(f"{CONFIG_FILE}:{variant}")
  cfg.requires_init_from = False
  cfg.init_from = ""
  cfg.tensorboard = False
  cfg.data.memory_curriculum = cfg.data.facts_curriculum = ()   # the recipe's own task shape
  cfg.data.batch_curriculum = ()                                 # at the batch asked for
  cfg.data.memory_tokens = memory_tokens
  cfg.mesh_shape = tuple(int(s) for s in mesh.split(","))
  if tiny:   # same structure (router layers in the upper half, remat, kernels), small sizes
    cfg.model.update(dict(vocab_size=0, hidden_size=64, intermediate_size=128,
                          num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                          pooling_chunk_size=8, top_k=2, router_layers=(2, 3)))
    cfg.data.memory_tokens = min(memory_tokens, 1024)
  if scan in ("on", "off"):
    cfg.model.scan_layers = scan == "on"
  cfg.model.update({k: v for k, v in model_overrides.items() if v not in ("", None)})
  return cfg


def cli_model_overrides(args) -> dict:
  """The model fields the command line overrides (empty or None: the recipe's)."""
  return dict(remat_policy=args.remat_policy, rms_norm_vjp=args.rms_norm_vjp,
              qk_norm_rope_vjp=args.qk_norm_rope_vjp,
              attention_pad_free=args.attention_pad_free, embed_grad=args.embed_grad,
              attention_short_persistent=args.attention_short_persistent,
              attention_short_persistent_bwd=args.attention_short_persistent_bwd,
              rope_tables=args.rope_tables)


def host_batch(cfg, model_cfg, batch_size: int):
  """One batch of the recipe's training stream (its first bucket shape)."""
  it = from_config.make_train_iterator(cfg.data, seed=cfg.seed, batch_size=batch_size,
                                       chunk_size=model_cfg.pooling_chunk_size, verbose=False)
  return next(it)


def take_rows(batch, n: int):
  return jax.tree.map(lambda x: np.asarray(x)[:n], batch)


def _compile(setup, dev_batch, init_beside: bool):
  """``(compiled step, row)``: the step compiled for ``dev_batch`` with its compile time,
  XLA's memory analysis and FLOP count; raises ``MemoryError`` (the row attached as
  ``partial_row``) when it needs more than the device has. ``init_beside``: the state is
  initialising in another thread meanwhile (said in the row and the printout)."""
  t0 = time.perf_counter()
  compiled = setup.lower_step(dev_batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  need = compiled_need_bytes(compiled)
  row = {"compile_s": compile_s, "temp_gib": mem.temp_size_in_bytes / 2 ** 30,
         "args_gib": mem.argument_size_in_bytes / 2 ** 30, "needs_gib": need / 2 ** 30,
         "overlap_init": init_beside}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row["xla_flops"] = float(cost.get("flops", 0.0))
  print(f"    compiled in {compile_s:.1f} s"
        f"{' (the state initialising beside it)' if init_beside else ''}; "
        f"memory_analysis {need / 2 ** 30:.1f} GiB", flush=True)
  limit = device_memory_stat("bytes_limit")
  if limit and need > limit:
    err = MemoryError(f"memory_analysis needs {need / 2 ** 30:.1f} GiB of "
                      f"{limit / 2 ** 30:.1f} GiB")
    err.partial_row = row   # a batch that does not fit still reports its compile time
    raise err
  return compiled, row


def measure(cfg, model_cfg, batch, mesh, steps: int, peaks: dict, profile_dir: str = "",
            overlap_init: bool = False) -> dict:
  """Compile and time the training step on ``batch``; raises on out-of-memory. With
  ``profile_dir``, also profiles two more steps and adds the kernel table
  (``benchmarks.profile_summary``). ``overlap_init``: the state is initialised (its program
  compiled: 60-145 s on a fresh GPU machine) in another thread while the step compiles,
  which saves that time but shares the host's cores with the step's compile
  (``compile_s`` then counts both; the row says so)."""
  setup = trainer.TrainSetup(cfg, mesh, model_cfg)
  dev_batch = setup.put_batch(batch)
  overlap = overlap_init and steps > 0
  t0 = time.perf_counter()
  if overlap:   # the trainer's own overlap (msa_jax.trainer.init_beside)
    state, (compiled, row) = trainer.init_beside(setup, cfg.seed,
                                                 lambda: _compile(setup, dev_batch, True))
  else:
    compiled, row = _compile(setup, dev_batch, False)
    if steps == 0:      # compile only: what XLA's memory_analysis says the step needs
      return row
    t0 = time.perf_counter()
    state = jax.block_until_ready(setup.init_state(cfg.seed))
  init_s = max(0.0, time.perf_counter() - t0 - (row["compile_s"] if overlap else 0.0))
  print(f"    state initialised in {init_s:.1f} s"
        f"{' more after the compile' if overlap else ''}; {steps} timed steps "
        f"after one warm-up", flush=True)
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    state, m = compiled(state, dev_batch)
    jax.block_until_ready(m["loss"])
    dt = time.perf_counter() - t0
    print(f"    step {i}{' (warm-up)' if not i else ''}: {dt * 1e3:,.0f} ms", flush=True)
    if i:
      times.append(dt)
  step_s = statistics.median(times)
  n_dev = jax.device_count()
  useful = flops_lib.step_flops(model_cfg, batch, lm_chunk_size=lm_chunk_size(cfg))
  executed = flops_lib.step_flops(model_cfg, batch, lm_chunk_size=lm_chunk_size(cfg),
                                  mode="executed")
  peak = device_memory_stat("peak_bytes_in_use")
  row.update(step_s=step_s, tokens_per_s=trainer.count_tokens(batch) / step_s,
             useful_tflops=useful["train"] / 1e12, executed_tflops=executed["executed_total"] / 1e12,
             mfu_vendor=useful["train"] / step_s / (peaks["vendor"] * n_dev),
             mfu_measured=useful["train"] / step_s / (peaks["measured_bf16"] * n_dev),
             loss=float(m["loss"]),
             device_peak_gib=peak / 2 ** 30 if peak is not None else None)
  if profile_dir:
    from benchmarks import profile_summary
    holder = {"state": state}

    def one_step():
      holder["state"], out = compiled(holder["state"], dev_batch)
      jax.block_until_ready(out["loss"])
    row["profile"] = profile_summary.profile_calls(
        one_step, os.path.join(profile_dir, f"b{len(batch.active_tokens)}"), calls=2,
        title=f"train step, batch {len(batch.active_tokens)}", hlo_text=compiled.as_text())
  return row


def _oom(err: BaseException) -> bool:
  text = str(err)
  return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text \
      or "out of memory" in text


def compare_fields(args) -> list[str]:
  """The fields a ``--compare`` set may name: the model switches, and ``microbatches``."""
  return [*cli_model_overrides(args), "microbatches"]


def run_shapes(args, save=None) -> dict:
  peak, source = metrics.device_peak_flops()
  peaks = {"vendor": peak, "vendor_source": source, "measured_bf16": metrics.matmul_rate()}
  print(f"{device_name()} x{jax.device_count()}: vendor {peak / 1e12:.1f} TFLOP/s ({source}), "
        f"measured bf16 matmul {peaks['measured_bf16'] / 1e12:.1f} TFLOP/s", flush=True)
  batches = sorted(int(b) for b in args.batches.split(","))
  results = []
  scans = ("off", "on") if args.scan_layers == "both" else (args.scan_layers,)
  overrides = cli_model_overrides(args)
  sets = compare_sets(args.compare, compare_fields(args))
  host_batches = {}   # (variant, memory): one batch for every compared set
  for variant, memory, scan, (label, extra) in (
      (v, int(m), s, c) for v in args.variants.split(",") for m in args.memory.split(",")
      for s in scans for c in sets):
    extra = dict(extra)
    slices = int(extra.pop("microbatches", args.microbatches))   # a train field, not a model one
    cfg = recipe(variant, memory, args.tiny, args.mesh, scan, **{**overrides, **extra})
    cfg.microbatches = slices
    model_cfg = trainer.resolve_model_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh_shape)
    print(f"{variant} memory {cfg.data.memory_tokens}"
          f"{' [' + label + ']' if label else ''}: batch of {batches[-1]} "
          f"(scan_layers {model_cfg.scan_layers}, remat_policy {model_cfg.remat_policy}, "
          f"microbatches {slices})...", flush=True)
    if (variant, memory) not in host_batches:
      host_batches[(variant, memory)] = host_batch(cfg, model_cfg, batches[-1])
    full = host_batches[(variant, memory)]
    shape = full.shape_summary
    largest = None
    for b in batches:
      if b % (mesh.shape["data"] * mesh.shape["fsdp"] * slices):
        continue
      cfg.batch_size = b
      entry = {"variant": variant, "memory_tokens": cfg.data.memory_tokens,
               "batch": b, "scan_layers": model_cfg.scan_layers,
               "microbatches": slices, "compare": label,
               **{k: getattr(model_cfg, k) for k in overrides},
               **{k: v for k, v in shape.items() if k != "batch"}}
      print(f"  batch {b}: compiling...", flush=True)
      gc.collect()   # the previous set's state and executable, before this one's
      try:
        entry.update(measure(cfg, model_cfg, take_rows(full, b), mesh, args.steps, peaks,
                             args.profile_dir, overlap_init=args.overlap_init))
      except Exception as err:  # noqa: BLE001 — an OOM ends the search, anything else raises
        if not _oom(err):
          raise
        entry.update(getattr(err, "partial_row", {}))
        entry["fits"] = False
        entry["error"] = str(err).splitlines()[0][:300]
        results.append(entry)
        print(f"  batch {b}: does not fit ({entry['error']})", flush=True)
        break
      entry["fits"] = True
      largest = b
      results.append(entry)
      print("  " + _row_text(entry), flush=True)
      if save is not None:   # a command stopped by a time limit keeps what it measured
        save({"peaks": peaks, "rows": results, "partial": True})
    for e in results:
      if (e["variant"], e["memory_tokens"], e["scan_layers"], e["compare"]) == (
          variant, cfg.data.memory_tokens, model_cfg.scan_layers, label):
        e["largest_batch_that_fits"] = largest
  add_compare_ratios(results)
  return {"peaks": peaks, "rows": results, "mesh": args.mesh, "tiny": args.tiny,
          "devices": jax.device_count()}


def _row_text(e: dict) -> str:
  if "step_s" not in e:   # --steps 0
    return (f"{e['variant']} batch {e['batch']}: compiled only ({e['compile_s']:.1f} s), "
            f"memory_analysis {e['needs_gib']:.1f} GiB (temp {e['temp_gib']:.1f})")
  peak = f"{e['device_peak_gib']:.1f}" if e.get("device_peak_gib") is not None else "-"
  ratio = f", {e['step_vs_first']:.3f} x the first" if "step_vs_first" in e else ""
  compared = f"[{e['compare']}{ratio}] " if e.get("compare") else ""
  return (f"{compared}{e['variant']:>5} mem {e['memory_tokens']:>6} B {e['batch']:>3} "
          f"scan {'on' if e['scan_layers'] else 'off'} remat {e['remat_policy']} "
          f"{'mb ' + str(e['microbatches']) + ' ' if e.get('microbatches', 1) > 1 else ''}"
          f"(N {e['docs']} L {e['doc_len']} M {e['active']}) | compile {e['compile_s']:6.1f} s | "
          f"step {e['step_s'] * 1e3:8.1f} ms | {e['tokens_per_s']:>11,.0f} tok/s | "
          f"MFU {e['mfu_vendor']:6.1%} vendor {e['mfu_measured']:6.1%} measured | "
          f"memory_analysis {e['needs_gib']:.1f} GiB (temp {e['temp_gib']:.1f}) peak {peak} GiB"
          f" | flops useful {e['useful_tflops']:.2f}T executed {e['executed_tflops']:.2f}T "
          f"xla per device {e['xla_flops'] / 1e12:.2f}T")


def run_buckets(args) -> dict:
  """Bucket shapes and padding of each variant's data at 1, 2 and 4 active levels."""
  rows = []
  for variant in args.variants.split(","):
    for memory in (int(x) for x in args.memory.split(",")):
      cfg = recipe(variant, memory, args.tiny, args.mesh, args.scan_layers,
                   remat_policy=args.remat_policy)
      model_cfg = trainer.resolve_model_config(cfg)
      src = from_config.make_source(cfg.data, cfg.seed, cfg.data.memory_tokens)
      for levels in (1, 2, 4):
        bs = bucket_lib.buckets_for(
            src, 8, model_cfg.pooling_chunk_size, memory_interleave=cfg.data.interleave,
            **dict(bucket_lib.bucket_levels(cfg.data), active_levels=levels))
        waste = bucket_lib.padding_waste_of(src, bs, memory_interleave=cfg.data.interleave)
        row = {"variant": variant, "memory_tokens": cfg.data.memory_tokens,
               "active_levels": levels,
               "buckets": [dataclasses.astuple(b)[1:] for b in bs], "padding": waste}
        rows.append(row)
        print(f"{variant} mem {row['memory_tokens']} active_levels {levels}: "
              f"{len(bs)} bucket(s) (prefix, docs, doc_len, active) {row['buckets']}; "
              f"padding total {waste['total']:.1%} active {waste['active']:.1%}", flush=True)
  return {"buckets": rows}


def run_compile_layers(args) -> dict:
  """Compile time of one training step vs depth, with the layers unrolled and/or scanned
  (``--scan_layers``): the whole step, and the loss gradient alone (the model's part,
  without the optimizer's per-parameter updates and norms). Wall and process CPU seconds
  (the CPU seconds are steadier on a shared machine)."""
  import jax.numpy as jnp
  from msa_jax.train_step import compute_losses
  rows = []
  variant = args.variants.split(",")[0]
  memory = int(args.memory.split(",")[0])
  scans = ("off", "on") if args.scan_layers == "both" else (args.scan_layers,)
  for scan, layers in ((s, int(x)) for s in scans for x in args.compile_layers.split(",")):
    cfg = recipe(variant, memory, args.tiny, args.mesh, scan, **cli_model_overrides(args))
    cfg.model.num_layers = layers
    cfg.model.router_layers = tuple(range(layers // 2, layers))
    cfg.batch_size = int(args.batches.split(",")[0])
    model_cfg = trainer.resolve_model_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh_shape)
    batch = host_batch(cfg, model_cfg, cfg.batch_size)
    setup = trainer.TrainSetup(cfg, mesh, model_cfg)
    dev_batch = setup.put_batch(batch)
    t0 = time.perf_counter()
    lowered = setup.lower_step(dev_batch)
    lower_s = time.perf_counter() - t0
    c0 = time.process_time()
    lowered.compile()
    compile_cpu = time.process_time() - c0
    total = time.perf_counter() - t0

    def loss(params, b):
      with nn.logical_axis_rules(setup.rules):
        return compute_losses(setup.model, params, b, jnp.int32(0), cfg)[0]
    t1, c1 = time.perf_counter(), time.process_time()
    with sharding.mesh_context(mesh):
      jax.jit(jax.grad(loss)).lower(setup.abstract_state.params, dev_batch).compile()
    grad_s, grad_cpu = time.perf_counter() - t1, time.process_time() - c1
    rows.append({"num_layers": layers, "scan_layers": model_cfg.scan_layers,
                 "remat_policy": model_cfg.remat_policy, "trace_lower_s": lower_s,
                 "compile_s": total - lower_s, "compile_cpu_s": compile_cpu, "total_s": total,
                 "grad_only_compile_s": grad_s, "grad_only_compile_cpu_s": grad_cpu})
    print(f"{layers} layers, scan_layers {model_cfg.scan_layers}: step trace+lower "
          f"{lower_s:.1f} s, compile {total - lower_s:.1f} s ({compile_cpu:.1f} CPU s); loss "
          f"gradient alone: trace+lower+compile {grad_s:.1f} s ({grad_cpu:.1f} CPU s)",
          flush=True)
  return {"compile_layers": rows, "variant": variant, "tiny": args.tiny}


def run_flop_check(args) -> dict:
  """``msa_jax.flops.step_flops`` (executed) against XLA's ``cost_analysis`` of the loss
  gradient at the recipe's full shape: unrolled layers and no remat (XLA counts a scan
  or while body once), the XLA reference attention (it computes the masked slots the
  executed count includes), the LM loss in one chunk. Compile only: runs on a CPU."""
  import jax.numpy as jnp
  from msa_jax.model import MSAModel
  from msa_jax.train_step import compute_losses
  rows = []
  for variant in args.variants.split(","):
    for memory in (int(x) for x in args.memory.split(",")):
      cfg = recipe(variant, memory, args.tiny, args.mesh, "off", remat_policy="none")
      cfg.model.kernels = "xla"
      cfg.loss.lm_chunk_size = 1 << 20               # one chunk: XLA counts it whole
      model_cfg = trainer.resolve_model_config(cfg)
      model = MSAModel(model_cfg)
      full = host_batch(cfg, model_cfg, max(int(b) for b in args.batches.split(",")))
      params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                       jnp.zeros((1, 8), jnp.int32)))["params"]
      for b in sorted(int(x) for x in args.batches.split(",")):
        batch = take_rows(full, b)
        grad = jax.grad(lambda p, bb: compute_losses(
            model, p, bb, jnp.int32(cfg.optim.warmup_phase_steps), cfg)[0])
        t0 = time.perf_counter()
        cost = jax.jit(grad).lower(params, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla = float(cost["flops"])
        ours = flops_lib.step_flops(model_cfg, batch, lm_chunk_size=lm_chunk_size(cfg),
                                    mode="executed")["executed_total"]
        useful = flops_lib.step_flops(model_cfg, batch, lm_chunk_size=lm_chunk_size(cfg))
        row = {"variant": variant, "memory_tokens": cfg.data.memory_tokens, "batch": b,
               "num_layers": model_cfg.num_layers, "xla_flops": xla, "executed_flops": ours,
               "useful_flops": useful["train"], "executed_over_xla": ours / xla,
               "compile_s": time.perf_counter() - t0,
               **{k: v for k, v in full.shape_summary.items() if k != "batch"}}
        rows.append(row)
        print(f"{variant} mem {row['memory_tokens']} B {b} ({row['num_layers']} layers, "
              f"unrolled, no remat): executed count {ours / 1e12:.2f} TFLOP, XLA "
              f"{xla / 1e12:.2f} TFLOP: ratio {ours / xla:.3f} (useful {useful['train'] / 1e12:.2f}"
              f"; compiled in {row['compile_s']:.0f} s)", flush=True)
  return {"flop_check": rows}


def run_memory_analysis(args) -> dict:
  """Temporary memory of the loss gradient (no optimizer) by XLA's ``memory_analysis``,
  the chunked LM loss of the training step against the full ``[B, M, vocab]`` logits."""
  import jax.numpy as jnp
  from msa_jax import losses
  from msa_jax.model import MSAModel
  from msa_jax.train_step import compute_losses
  rows = []
  for variant in args.variants.split(","):
    for memory in (int(x) for x in args.memory.split(",")):
      for layers in (int(x) for x in args.memory_analysis.split(",")):
        cfg = recipe(variant, memory, args.tiny, args.mesh, args.scan_layers,
                   remat_policy=args.remat_policy)
        cfg.model.num_layers = layers
        cfg.model.router_layers = tuple(range(layers // 2, layers))
        cfg.model.kernels = "xla"
        model_cfg = trainer.resolve_model_config(cfg)
        model = MSAModel(model_cfg)
        full = host_batch(cfg, model_cfg, max(int(b) for b in args.batches.split(",")))
        for b in sorted(int(x) for x in args.batches.split(",")):
          batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[:0] + (b,)
                                                              + np.shape(x)[1:], x.dtype),
                               take_rows(full, b))
          params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                           jnp.zeros((1, 8), jnp.int32)))["params"]

          def chunked(p, bb):
            return compute_losses(model, p, bb, jnp.int32(cfg.optim.warmup_phase_steps), cfg)[0]

          def full_logits(p, bb):
            out = model.apply({"params": p}, bb)
            return losses.lm_loss(out.logits_bmv, bb.targets, bb.loss_mask)[0]
          row = {"variant": variant, "memory_tokens": cfg.data.memory_tokens,
                 "num_layers": layers, "batch": b, **{k: v for k, v in full.shape_summary.items()
                                                      if k != "batch"}}
          for name, fn in (("chunked", chunked), ("full_logits", full_logits)):
            t0 = time.perf_counter()
            mem = jax.jit(jax.grad(fn)).lower(params, batch).compile().memory_analysis()
            row[f"{name}_temp_gib"] = mem.temp_size_in_bytes / 2 ** 30
            row[f"{name}_compile_s"] = time.perf_counter() - t0
          rows.append(row)
          print(f"{variant} mem {row['memory_tokens']} layers {layers} B {b} (N {row['docs']} "
                f"L {row['doc_len']} M {row['active']}): temp chunked "
                f"{row['chunked_temp_gib']:.2f} GiB, full logits {row['full_logits_temp_gib']:.2f}"
                f" GiB", flush=True)
  return {"memory_analysis": rows}


def _write(args, name: str, result: dict) -> str:
  path = args.out or os.path.join(out_dir(), name)
  write_json(path, dict(result, command="python -m benchmarks.train_step " + " ".join(sys.argv[1:])))
  return path


def main(args) -> dict:
  # the recipes' XLA flags (the trainer applies them too; XLA_FLAGS set outside win)
  from msa_jax.run_config import load_config_file
  trainer.apply_xla_flags(load_config_file(CONFIG_FILE).get("xla_flags", ""))
  if args.compilation_cache_dir:
    trainer.use_compilation_cache(args.compilation_cache_dir)
  if args.buckets:
    result, name = run_buckets(args), "train_step_buckets.json"
  elif args.flop_check:
    result, name = run_flop_check(args), "train_step_flop_check.json"
  elif args.memory_analysis:
    result, name = run_memory_analysis(args), "train_step_memory_analysis.json"
  elif args.compile_layers:
    result, name = run_compile_layers(args), "train_step_compile_layers.json"
  else:
    name = "train_step.json" if jax.devices()[0].platform != "cpu" else "train_step_cpu.json"
    result = run_shapes(args, save=lambda partial: _write(args, name, partial))
    print("\n" + "\n".join(_row_text(e) for e in result["rows"] if "step_s" in e), flush=True)
  path = _write(args, name, result)
  if "rows" in result and any("mfu_vendor" in r for r in result["rows"]):   # timed rows
    train_step_plots.batches(result["rows"], path[:-len(".json")] + ".png")
  if result.get("compile_layers"):
    train_step_plots.compile_layers(result["compile_layers"], path[:-len(".json")] + ".png")
  print(f"wrote {path}", flush=True)
  return result


if __name__ == "__main__":
  main(ARGS)
