"""``train_and_evaluate``: the training loop behind ``python -m msa_jax.train``.

State is initialised directly into its sharding (``eval_shape`` → logical
partition specs → mesh shardings → ``jit(init, out_shardings=...)``), the step
is jitted once per batch shape, checkpoints hold the state and the data
iterator, SIGTERM saves and exits cleanly, and a non-finite loss stops the run
before anything bad is saved.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from msa_jax import checkpointing, input_pipeline, metrics as metrics_lib, sharding
from msa_jax.batch import MSABatch
from msa_jax.config import ModelConfig
from msa_jax.distributed import gather_to_host, is_primary, pad_to_common_shape, wait_for_primary
from msa_jax.model import MSAModel
from msa_jax.optimizer import make_optimizer
from msa_jax.train_step import TrainState, init_train_state, train_step


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


def resolve_model_config(cfg) -> ModelConfig:
  """The model config of a training config; ``model.vocab_size=0`` takes the task tokenizer's.

  A vocabulary smaller than the tokenizer's is an error, never a silent clip.
  """
  model = dict(cfg.model)
  data_vocab = None
  if cfg.data.task in input_pipeline.TASKS:   # synthetic word vocab or the JSONL HF tokenizer
    data_vocab = input_pipeline.vocab_size_of(cfg.data)
  if not model.get("vocab_size"):
    if data_vocab is None:
      raise ValueError("model.vocab_size=0 (from the data) needs a synthetic task; set it")
    model["vocab_size"] = -(-data_vocab // 64) * 64
  elif data_vocab is not None and model["vocab_size"] < data_vocab:
    raise ValueError(f"model.vocab_size={model['vocab_size']} is smaller than the task "
                     f"tokenizer's {data_vocab} tokens; raise it or set 0 (derive from data)")
  return ModelConfig.from_dict(model)


def validate_config(cfg) -> ModelConfig:
  """Checks the training config and returns the model config; errors name the fix."""
  if cfg.get("requires_init_from") and not cfg.get("init_from"):
    raise ValueError(
        "this recipe fine-tunes a pretrained Qwen3 checkpoint and needs accelerators: set "
        "--config.init_from=/path/to/Qwen3-4B-Instruct-2507 (a local Hugging Face dir). "
        "For a CPU run use the smoke variant: --config=configs/16k_to_100m.py:smoke")
  model_cfg = resolve_model_config(cfg)
  input_pipeline.validate_data_config(cfg)   # e.g. JSONL eval at memory multipliers > 1
  if cfg.num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {cfg.num_steps}")
  if cfg.batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
  if cfg.optim.warmup_phase_steps > cfg.num_steps:
    raise ValueError(f"optim.warmup_phase_steps ({cfg.optim.warmup_phase_steps}) exceeds "
                     f"num_steps ({cfg.num_steps})")
  return model_cfg


class TrainSetup:
  """Model, optimizer, shardings and the jitted step for one mesh."""

  def __init__(self, cfg, mesh, model_cfg: Optional[ModelConfig] = None):
    self.cfg = cfg
    self.mesh = mesh
    self.rules = sharding.rules_from_config(cfg.get("logical_axis_rules"))
    self.model_cfg = model_cfg or resolve_model_config(cfg)
    self.model = MSAModel(self.model_cfg)
    self.tx = make_optimizer(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    init_boxed = functools.partial(init_train_state, self.model, self.tx)
    with mesh, nn.logical_axis_rules(self.rules):
      abstract = jax.eval_shape(init_boxed, jax.random.PRNGKey(0), ids)
      self.state_shardings = nn.logical_to_mesh_sharding(
          nn.get_partition_spec(abstract), mesh, self.rules)
    self._init = jax.jit(lambda rng: nn.unbox(init_boxed(rng, ids)),
                         out_shardings=self.state_shardings)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract), self.state_shardings)
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    step = functools.partial(train_step, self.model, self.tx, cfg)

    def step_in_rules(state, batch):
      with nn.logical_axis_rules(self.rules):
        return step(state, batch)

    self._step = jax.jit(step_in_rules, out_shardings=(self.state_shardings, None),
                         donate_argnums=(0,))

  def init_state(self, seed: int) -> TrainState:
    with self.mesh:
      return self._init(jax.random.PRNGKey(seed))

  def state_from_params(self, params) -> TrainState:
    """A fresh train state around given (e.g. pretrained) parameters."""
    params = jax.device_put(params, self.state_shardings.params)
    with self.mesh:
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

  def put_batch(self, batch: MSABatch) -> MSABatch:
    """Host numpy batch → global arrays sharded along the batch axis (one shard per process)."""
    batch = pad_to_common_shape(batch)

    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(self.batch_sharding, x)
    return jax.tree.map(put, batch)

  def step(self, state: TrainState, batch: MSABatch):
    with self.mesh:
      return self._step(state, batch)


def count_tokens(batch: MSABatch) -> int:
  """Valid tokens the step processes: documents, prefix and active."""
  return int(np.sum(batch.doc_mask) + np.sum(batch.prefix_mask) + np.sum(batch.active_mask))


def _write_config(cfg, workdir: str, model_cfg: ModelConfig) -> None:
  """``config.json``: the training config with ``model`` as the resolved ``ModelConfig``
  (e.g. ``vocab_size=0`` replaced by the size used), so the workdir loads on its own."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    config = json.loads(cfg.to_json_best_effort())
    config["model"] = model_cfg.to_dict()
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config, f, indent=2)


def _load_pretrained(cfg, setup: TrainSetup):
  from msa_jax.export.convert import from_pretrained
  _, params = from_pretrained(cfg.init_from, model_config=setup.model_cfg)
  return params


def _check_finite(step_metrics, step: int, manager) -> None:
  """Raises ``NonFiniteLossError`` (before anything is saved) when the step's loss is NaN/Inf."""
  loss = float(step_metrics["loss"])
  if np.isfinite(loss):
    return
  manager.wait_until_finished()
  kept = manager.latest_step()
  where = (f"the last good checkpoint (step {kept}) in {manager.directory} is kept"
           if kept is not None else f"no checkpoint was saved yet in {manager.directory}")
  raise NonFiniteLossError(
      f"loss is {loss} at step {step}; stopping. {where[0].upper()}{where[1:]}; lower the "
      "learning rate or check the data before resuming.")


def train_and_evaluate(cfg, workdir: str, *,
                       on_step: Optional[Callable[[int, dict], None]] = None) -> dict[str, Any]:
  """Trains per ``cfg``, resuming from ``workdir`` if it holds a checkpoint, then evaluates.

  Returns the last logged metrics (plus ``stopped_early`` when SIGTERM ended the run).
  ``on_step(step, metrics)`` is called after every logged step (tests use it).
  """
  model_cfg = validate_config(cfg)
  mesh = sharding.make_mesh(cfg.mesh_shape)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.batch_size % batch_shards:
    raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of {batch_shards} (the "
                     f"data × fsdp mesh axes of mesh {dict(mesh.shape)}); change batch_size "
                     "or config.mesh_shape")
  _write_config(cfg, workdir, model_cfg)
  setup = TrainSetup(cfg, mesh, model_cfg)
  data_iter = input_pipeline.make_train_iterator(
      cfg.data, seed=cfg.seed, batch_size=cfg.batch_size,
      chunk_size=model_cfg.pooling_chunk_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  manager = checkpointing.make_manager(workdir, cfg.checkpoint.max_to_keep,
                                       cfg.checkpoint.every_steps, cfg.checkpoint.async_save)
  restored = checkpointing.restore_latest(manager, setup.abstract_state, data_iter)
  if restored is not None:
    start_step, state = restored
    print(f"resumed from {manager.directory} at step {start_step}", flush=True)
  elif cfg.get("init_from"):
    state = setup.state_from_params(_load_pretrained(cfg, setup))
    start_step = 0
  else:
    state = setup.init_state(cfg.seed)
    start_step = 0

  writer = metrics_lib.MetricsWriter(workdir, cfg.get("tensorboard", True))
  progress = metrics_lib.Progress(cfg.num_steps, start_step)
  peak_flops, peak_source = metrics_lib.device_peak_flops()
  print(f"training {cfg.num_steps} steps on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), mesh {dict(mesh.shape)}; MFU against {peak_source} "
        f"{peak_flops / 1e12:.2f} TFLOP/s per device", flush=True)

  stop = {"sigterm": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
  last: dict[str, Any] = {}
  tokens_since, t_since, logged_at = 0, time.perf_counter(), start_step
  step = start_step
  try:
    while step < cfg.num_steps:
      host_batch = next(data_iter)
      # This process's tokens × processes: the global count, as the shards are alike.
      tokens_since += count_tokens(host_batch) * jax.process_count()
      state, step_metrics = setup.step(state, setup.put_batch(host_batch))
      step += 1
      log_now = step % cfg.log_every_steps == 0 or step == cfg.num_steps or stop["sigterm"]
      if log_now:
        _check_finite(step_metrics, step, manager)
        elapsed = time.perf_counter() - t_since
        row = {k: v for k, v in metrics_lib.to_python(step_metrics).items()}
        row["tokens_per_sec"] = tokens_since / max(elapsed, 1e-9)
        row["tokens_per_step"] = tokens_since / max(step - logged_at, 1)   # sweeps sum it
        flops = metrics_lib.model_flops_per_token(
            model_cfg, int(np.shape(host_batch.doc_tokens)[-1])) * row["tokens_per_sec"]
        row["mfu"] = flops / (peak_flops * jax.device_count())
        row["router_precision@k"] = row.get("router_precision@k")
        writer.write(step, row)
        progress.report(step, row)
        last = {"step": step, **row}
        if on_step is not None:
          on_step(step, row)
        tokens_since, t_since, logged_at = 0, time.perf_counter(), step
      # Read the flag once, after logging: a SIGTERM that arrived while logging (or from
      # on_step) is still saved at this step rather than dropped.
      stopping = stop["sigterm"]
      if manager.should_save(step) or step == cfg.num_steps or stopping:
        _check_finite(step_metrics, step, manager)
        checkpointing.save(manager, step, state, data_iter, force=True)
      if stopping:
        print(f"SIGTERM: saved step {step} to {manager.directory}; exiting cleanly.", flush=True)
        last["stopped_early"] = True
        break
  finally:
    manager.wait_until_finished()
    signal.signal(signal.SIGTERM, previous)
    writer.close()

  if not last.get("stopped_early") and cfg.get("eval") and cfg.eval.get("at_end", True):
    from msa_jax import evaluate
    params = gather_to_host(state.params)   # multi-host: every host has them all
    if is_primary():
      evaluate.run(cfg, workdir, model=setup.model, params=params)
    wait_for_primary("msa_jax_eval_done")
  return last
