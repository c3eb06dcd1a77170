r"""Cost against memory length (issue 14 item 4): the training step of MSA and of full
attention over the same tokens, from 4K tokens upward.

  python -m benchmarks.memory_cost [--config=configs/16k_to_100m.py:tiny]
      [--tokens=4096,8192,...,1048576] [--steps=3] [--budget_s=240] [--out=DIR]

For each length L (ascending) and the recipe's model (random weights: cost does not
depend on them), one example of the recipe's task with an L-token memory:
  msa   the real training step (``msa_jax.trainer.TrainSetup``: forward_train with routing,
        LM + aux loss, AdamW) on that example's answer-round sample, batch 1;
  full  the plain model on the SAME tokens concatenated into one causal sequence
        (prefix, every document, question and target: ``model.apply(vars, input_ids)``),
        LM loss on every next token, AdamW, batch 1. Its attention is the model's
        ``msa_jax.attention.attend`` (XLA; head_dim 32 has no Pallas kernel), which
        materialises the [L, L] scores: quadratic memory as well as time.
Per (method, L): compile seconds, median step seconds over ``--steps`` timed steps after a
warm-up, tokens/s, XLA's planned memory of the compiled step (``memory_analysis``:
arguments + outputs + temporaries − aliased), and the device's peak bytes in use so far
(monotone over the run; None on CPU). A method stops at its first length that does not
fit (out of memory, or planned memory over the device's limit) or that would overrun
``--budget_s`` (predicted from its previous length, 4× for full attention, 2.5× for MSA);
the other goes on. Writes ``memory_cost.json`` (after every measurement) and
``memory_cost.png`` to ``--out`` (default ``$OUT`` or benchmarks/results).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

DEFAULT_TOKENS = ",".join(str(4096 << i) for i in range(9))   # 4K .. 1M


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/16k_to_100m.py:tiny")
  p.add_argument("--tokens", default=DEFAULT_TOKENS, help="memory lengths, ascending")
  p.add_argument("--methods", default="msa,full")
  p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
  p.add_argument("--budget_s", type=float, default=240.0)
  p.add_argument("--model", default="", help="model overrides k=v,... (tests: a toy width)")
  p.add_argument("--out", default="")
  return p.parse_args(argv)


def msa_sample(cfg, model_cfg, memory_tokens: int):
  """The answer-round sample (question + injected gold document + answer: the longest
  active part) of example 0 of the recipe's task at ``memory_tokens``, as a batch of 1."""
  from msa_jax.data import collate as collate_lib, from_config, interleave
  task = from_config.make_task(cfg.data, cfg.seed, memory_tokens)
  ex = task(0)
  samples = interleave.expand(ex, task.tokenizer.specials) if cfg.data.interleave else [ex]
  s = max(samples, key=lambda e: e.active_length)
  p = model_cfg.pooling_chunk_size
  shapes = collate_lib.BucketShapes(1, max(1, len(s.prefix)), len(s.docs),
                                    -(-s.max_doc_length // p) * p, -(-s.active_length // 8) * 8)
  return collate_lib.collate([s], shapes)


def concatenated(batch):
  """The valid tokens of an MSABatch row 0 as one sequence ``[1, T]``: prefix, documents in
  memory order, then the active tokens (question and target)."""
  import numpy as np
  parts = [np.asarray(batch.prefix_tokens[0])[np.asarray(batch.prefix_mask[0])]]
  docs, mask = np.asarray(batch.doc_tokens[0]), np.asarray(batch.doc_mask[0])
  parts += [docs[n][mask[n]] for n in range(docs.shape[0]) if mask[n].any()]
  parts.append(np.asarray(batch.active_tokens[0])[np.asarray(batch.active_mask[0])])
  return np.concatenate(parts).astype(np.int32)[None]


def _planned_gib(compiled) -> float | None:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  if mem is None:
    return None
  from benchmarks import compiled_need_bytes   # jax loads only when measuring
  return compiled_need_bytes(compiled) / 2 ** 30


def _device_peak_gib():
  from benchmarks import device_memory_stat
  peak = device_memory_stat("peak_bytes_in_use")
  return peak / 2 ** 30 if peak is not None else None


def _timed(run, steps: int) -> float:
  """Median seconds of ``steps`` calls of ``run()`` (each blocks) after one warm-up."""
  run()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure_msa(cfg, model_cfg, batch, steps: int) -> dict:
  """Compile and time the real training step on ``batch``."""
  import jax
  from msa_jax import sharding, trainer
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])   # one device, batch 1
  setup = trainer.TrainSetup(cfg, mesh, model_cfg)
  dev = setup.put_batch(batch)
  t0 = time.perf_counter()
  compiled = setup.lower_step(dev).compile()
  compile_s = time.perf_counter() - t0
  planned = _planned_gib(compiled)
  _check_fits(planned)
  state = [setup.init_state(cfg.seed)]

  def run():
    state[0], m = compiled(state[0], dev)
    jax.block_until_ready(m["loss"])
  step_s = _timed(run, steps)
  return {"compile_s": compile_s, "step_s": step_s, "planned_gib": planned}


def full_attention_step(model, tx):
  """``(params, opt_state, tokens [B, T]) -> (params, opt_state, loss)``: one AdamW step of
  the plain causal LM on ``tokens`` (loss on every next token)."""
  import jax
  import jax.numpy as jnp
  import optax
  from msa_jax import losses

  def loss_fn(params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    mask = jnp.ones(tokens[:, 1:].shape, bool)
    return losses.lm_loss(logits, tokens[:, 1:], mask)[0]

  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def measure_full(cfg, model_cfg, tokens, steps: int) -> dict:
  """Compile and time ``full_attention_step`` on ``tokens``."""
  import jax
  import jax.numpy as jnp
  from msa_jax.model import MSAModel
  from msa_jax.optimizer import make_optimizer
  model, tx = MSAModel(model_cfg), make_optimizer(cfg)
  params = jax.jit(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"])(
      jax.random.PRNGKey(cfg.seed))
  opt_state = tx.init(params)
  tokens = jnp.asarray(tokens)
  step = jax.jit(full_attention_step(model, tx), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, tokens).compile()
  compile_s = time.perf_counter() - t0
  planned = _planned_gib(compiled)
  _check_fits(planned)
  state = [params, opt_state]

  def run():
    state[0], state[1], loss = compiled(state[0], state[1], tokens)
    jax.block_until_ready(loss)
  step_s = _timed(run, steps)
  return {"compile_s": compile_s, "step_s": step_s, "planned_gib": planned}


def _check_fits(planned_gib) -> None:
  from benchmarks import device_memory_stat
  limit = device_memory_stat("bytes_limit")
  if limit and planned_gib is not None and planned_gib * 2 ** 30 > limit:
    raise MemoryError(f"planned {planned_gib:.1f} GiB > device limit {limit / 2 ** 30:.1f} GiB")


def _is_oom(err: BaseException) -> bool:
  text = str(err)
  return (isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text
          or "out of memory" in text.lower())


def plot(rows, path: str, title: str) -> None:
  from msa_jax import plots
  fig, (a, b) = plots.subplots(1, 2, figsize=(10, 4))
  for method, style in (("msa", "o-"), ("full", "s--")):
    ok = [r for r in rows if r["method"] == method and "step_s" in r]
    if not ok:
      continue
    x = [r["tokens"] for r in ok]
    a.plot(x, [r["step_s"] * 1e3 for r in ok], style, label=method)
    b.plot(x, [r["planned_gib"] for r in ok], style, label=f"{method} (XLA plan)")
  for ax, ylabel in ((a, "training step (ms), batch 1"), (b, "memory of the step (GiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens (memory + question + answer)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  a.set_title(title, fontsize=9)
  plots.save(fig, path, dpi=110)


def run(args) -> dict:
  import jax
  from benchmarks import device_name, out_dir, write_json
  from msa_jax import trainer
  from msa_jax.run_config import load_config_file
  cfg = load_config_file(args.config)
  cfg.requires_init_from, cfg.init_from, cfg.tensorboard = False, "", False
  cfg.data.memory_curriculum, cfg.data.facts_curriculum, cfg.data.num_docs = (), (), 0
  cfg.batch_size, cfg.mesh_shape = 1, (1, 1, 1)
  for kv in filter(None, args.model.split(",")):
    k, v = kv.split("=")
    cfg.model[k] = type(cfg.model[k])(v) if cfg.model[k] is not None else int(v)
  model_cfg = trainer.resolve_model_config(cfg)
  out = args.out or out_dir()
  os.makedirs(out, exist_ok=True)
  suffix = "" if jax.default_backend() == "gpu" else "_" + jax.default_backend()
  json_path = os.path.join(out, f"memory_cost{suffix}.json")
  methods = [m for m in args.methods.split(",") if m]
  result = {"device": device_name(), "jax": jax.__version__, "config": args.config,
            "model": {k: getattr(model_cfg, k) for k in ("hidden_size", "num_layers",
                                                         "pooling_chunk_size", "top_k",
                                                         "dtype", "kernels")},
            "argv": sys.argv, "rows": []}
  deadline = time.time() + args.budget_s
  growth = {"msa": 2.5, "full": 4.0}   # per doubling, conservative (compile included)
  last_s = {}
  stopped = set()
  for tokens in (int(t) for t in args.tokens.split(",")):
    batch = None
    for method in methods:
      if method in stopped:
        continue
      row = {"method": method, "memory_tokens": tokens}
      left = deadline - time.time()
      if method in last_s and last_s[method] * growth[method] > left:
        row["skipped"] = f"predicted {last_s[method] * growth[method]:.0f}s > {left:.0f}s left"
        stopped.add(method)
        result["rows"].append(row)
        print(f"{method} {tokens:,}: {row['skipped']}; stopping {method}", flush=True)
        continue
      if batch is None:
        batch = msa_sample(cfg, model_cfg, tokens)
      t0 = time.perf_counter()
      try:
        if method == "msa":
          row["tokens"] = trainer.count_tokens(batch)
          row.update(measure_msa(cfg, model_cfg, batch, args.steps))
        else:
          seq = concatenated(batch)
          row["tokens"] = int(seq.shape[1])
          row.update(measure_full(cfg, model_cfg, seq, args.steps))
      except Exception as err:  # noqa: BLE001 - an out-of-memory ends this method
        if not _is_oom(err):
          raise
        row["fits"] = False
        row["error"] = str(err).splitlines()[0][:300]
        stopped.add(method)
      else:
        row["fits"] = True
        row["tokens_per_s"] = row["tokens"] / row["step_s"]
      row["device_peak_gib_so_far"] = _device_peak_gib()
      last_s[method] = time.perf_counter() - t0
      result["rows"].append(row)
      if row["fits"]:
        planned = f"{row['planned_gib'] * 1024:.1f} MiB" if row["planned_gib"] is not None else "-"
        print(f"{method:>4} {row['tokens']:>9,} tokens | step {row['step_s'] * 1e3:9.1f} ms | "
              f"{row['tokens_per_s']:>11,.0f} tok/s | planned {planned} | compile "
              f"{row['compile_s']:.1f}s | {deadline - time.time():.0f}s left", flush=True)
      else:
        print(f"{method:>4} {tokens:,}: does not fit ({row['error']})", flush=True)
      write_json(json_path, result)
    if len(stopped) == len(methods):
      break
  for method in methods:   # the step-time ratio between the longest and shortest length
    ok = [r for r in result["rows"] if r["method"] == method and r.get("fits")]
    if len(ok) >= 2:
      result[f"{method}_step_ratio_longest_to_shortest"] = {
          "tokens": [ok[0]["tokens"], ok[-1]["tokens"]],
          "token_ratio": ok[-1]["tokens"] / ok[0]["tokens"],
          "step_ratio": ok[-1]["step_s"] / ok[0]["step_s"]}
  write_json(json_path, result)
  plot(result["rows"], json_path.replace(".json", ".png"),
       f"{args.config} on {result['device']}")
  print(f"wrote {json_path} and .png", flush=True)
  return result


def main(argv=None):
  return run(_parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  main()
