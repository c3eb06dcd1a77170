"""``train_and_evaluate``: the training loop behind ``python -m msa_jax.train``.

State is initialised directly into its sharding (``eval_shape`` → logical
partition specs → mesh shardings → ``jit(init, out_shardings=...)``), the step
is jitted once per batch shape, checkpoints hold the state and the data
iterator, SIGTERM saves and exits cleanly. A fresh run initialises its state in
another thread while the step compiles for the first batch (on a fresh GPU machine
each program takes ~1 minute to compile; one waits for the other no longer).

What a failure never does (README "When things go wrong"): the run's
``config.json`` is written once and never rewritten (a resume with a different
config is refused unless accepted, then recorded as ``config.<step>.json``); a
step whose loss, gradients, parameters or update are non-finite, or whose update
explodes (norm above ``optim.max_update_ratio`` × the parameters' norm), is never
saved, and a saved step whose parameters give a non-finite loss at the next step
is moved aside; the stop names the checkpoint that is good.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from msa_jax import checkpointing, flops as flops_lib, metrics as metrics_lib, microbatch
from msa_jax import overlap, run_config, sharding
from msa_jax.data import from_config
from msa_jax.batch import MSABatch
from msa_jax.config import IMPLEMENTATION_FIELDS, ModelConfig
from msa_jax.distributed import gather_to_host, is_primary, pad_to_common_shape, wait_for_primary
from msa_jax.model import MSAModel
from msa_jax.optimizer import main_phase_steps, make_optimizer
from msa_jax.train_step import TrainState, init_train_state, lm_chunk_size, train_step


class NonFiniteLossError(RuntimeError):
  """The loss, gradients, parameters or update became NaN/Inf (or the update exploded);
  nothing bad is kept and the message names the good checkpoint."""


def resolve_model_config(cfg) -> ModelConfig:
  """The model config of a training config; ``model.vocab_size=0`` takes the task tokenizer's.

  A vocabulary smaller than the tokenizer's is an error, never a silent clip.
  """
  model = dict(cfg.model)
  data_vocab = None
  if cfg.data.task in from_config.TASKS:   # synthetic word vocab or the JSONL HF tokenizer
    data_vocab = from_config.vocab_size_of(cfg.data)
  if not model.get("vocab_size"):
    if data_vocab is None:
      raise ValueError("model.vocab_size=0 (from the data) needs a synthetic task; set it")
    model["vocab_size"] = -(-data_vocab // 64) * 64
  elif data_vocab is not None and model["vocab_size"] < data_vocab:
    raise ValueError(f"model.vocab_size={model['vocab_size']} is smaller than the task "
                     f"tokenizer's {data_vocab} tokens; raise it or set 0 (derive from data)")
  return ModelConfig.from_dict(model)


def apply_xla_flags(flags: str, log=print) -> str:
  """Adds ``flags`` (``--name=value`` ...) to ``XLA_FLAGS`` before JAX starts its backends,
  leaving any flag the environment already sets as it is. Returns the resulting
  ``XLA_FLAGS``. After the backends started (a test, a notebook) it only warns: XLA reads
  its flags once."""
  env = os.environ.get("XLA_FLAGS", "").split()
  named = {f.split("=")[0] for f in env}
  missing = [f for f in flags.split() if f.split("=")[0] not in named]
  if not missing:   # nothing to add (none given, or set already: the CLI applies them first)
    return " ".join(env)
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    log(f"xla_flags {flags!r} not applied: JAX's backends already started (set XLA_FLAGS "
        "before the first JAX computation)")
    return " ".join(env)
  os.environ["XLA_FLAGS"] = " ".join(env + missing)
  return os.environ["XLA_FLAGS"]


def use_compilation_cache(directory: str) -> None:
  """Points JAX's persistent compilation cache at ``directory`` ("" leaves it off): a
  restarted run, or another run of the same shapes, loads its compiled steps."""
  if directory:
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    print(f"compilation cache: {directory}", flush=True)


def validate_config(cfg) -> ModelConfig:
  """Checks the training config and returns the model config; errors name the fix."""
  if cfg.get("requires_init_from") and not cfg.get("init_from"):
    raise ValueError(
        "this recipe fine-tunes a pretrained Qwen3 checkpoint and needs accelerators: set "
        "--config.init_from=/path/to/Qwen3-4B-Instruct-2507 (a local Hugging Face dir). "
        "For a CPU run use the smoke variant: --config=configs/16k_to_100m.py:smoke")
  model_cfg = resolve_model_config(cfg)
  from_config.validate_data_config(cfg)   # e.g. JSONL eval at memory multipliers > 1
  if cfg.num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {cfg.num_steps}")
  if cfg.batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
  from_config.batch_stages(cfg.data, cfg.batch_size)   # a bad data.batch_curriculum fails here
  microbatch.microbatches_of(cfg)                      # a bad microbatches fails here
  if cfg.optim.warmup_phase_steps > cfg.num_steps:
    raise ValueError(f"optim.warmup_phase_steps ({cfg.optim.warmup_phase_steps}) exceeds "
                     f"num_steps ({cfg.num_steps})")
  _validate_cadence_and_rates(cfg)
  _check_routing_loss_has_a_term(cfg, model_cfg)
  _check_global_position_span(cfg, model_cfg)
  return model_cfg


def _check_global_position_span(cfg, model_cfg: ModelConfig) -> None:
  """``data.global_position_span`` moves global-RoPE positions; with document-wise RoPE
  it would do nothing, silently, so it is refused there."""
  data = cfg.get("data")
  span = int(data.get("global_position_span", 0) or 0) if data is not None else 0
  if span < 0:
    raise ValueError(f"data.global_position_span must be >= 0 (0: off), got {span}")
  if span and model_cfg.rope_mode != "global":
    raise ValueError(
        f"data.global_position_span={span} spreads a memory's global RoPE positions, but "
        f"model.rope_mode is {model_cfg.rope_mode!r}, whose document positions restart at 0: "
        "set --config.model.rope_mode=global, or --config.data.global_position_span=0")


def _check_routing_loss_has_a_term(cfg, model_cfg: ModelConfig) -> None:
  """A positive routing-loss weight with no router layer in the upper half (SPEC §4: the
  loss covers those only) would train with aux 0 and an untrained router; refuse it."""
  from msa_jax.train_step import aux_loss_layers, oracle_routing
  weighted = max(float(cfg.optim.warmup_aux_weight), float(cfg.optim.main_aux_weight)) > 0
  ids = model_cfg.router_layer_ids
  if weighted and ids and not oracle_routing(cfg) and not aux_loss_layers(model_cfg):
    half = model_cfg.num_layers // 2
    raise ValueError(
        f"model.router_layers {list(ids)} of {model_cfg.num_layers} layers are all below "
        f"layer {half}: the routing loss (SPEC §4: upper-half router layers only) would "
        f"have no term and the router would stay untrained. Put a router layer at index "
        f">= {half} (e.g. --config.model.router_layers=({model_cfg.num_layers - 1},)), or "
        "set --config.optim.warmup_aux_weight=0 --config.optim.main_aux_weight=0 to train "
        "without the routing loss on purpose")


def _validate_cadence_and_rates(cfg) -> None:
  """Step intervals >= 1 and positive finite learning rates (a 0 interval used to fail
  after compiling with a bare ``ZeroDivisionError``; a negative lr trained uphill)."""
  for name, value in (("log_every_steps", cfg.log_every_steps),
                      ("checkpoint.every_steps", cfg.checkpoint.every_steps),
                      ("checkpoint.max_to_keep", cfg.checkpoint.max_to_keep)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}; set --config.{name}=N with N >= 1")
  for name in ("warmup_phase_lr", "main_phase_lr", "final_lr"):
    lr = float(cfg.optim[name])
    floor_ok = lr >= 0 if name == "final_lr" else lr > 0
    if not (np.isfinite(lr) and floor_ok):
      raise ValueError(f"optim.{name} must be a finite number {'>= 0' if name == 'final_lr' else '> 0'}, "
                       f"got {lr}; set --config.optim.{name}")
  decay, main = int(cfg.optim.get("decay_steps", 0)), main_phase_steps(cfg)
  if not 0 <= decay <= main:
    raise ValueError(
        f"optim.decay_steps={decay} must be between 0 (cosine over the whole main phase) "
        f"and the main phase's {main} steps (num_steps {cfg.num_steps} less the warm-up "
        f"phase or the lr ramp); set --config.optim.decay_steps=N with 0 <= N <= {main}")
  ratio = float(cfg.optim.get("max_update_ratio", 1.0))
  if not ratio > 0:
    raise ValueError(f"optim.max_update_ratio must be > 0, got {ratio}")


def _answer_token(cfg) -> Optional[int]:
  """The data's end-of-retrieval id (answer targets start with it), so the step logs the
  answer and retrieval samples' LM losses apart; None when the config has no data."""
  if cfg.get("data") is None or not cfg.data.get("interleave", True):
    return None
  return int(from_config.tokenizer_of(cfg.data).specials.end_of_retrieval)


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
    # Parameters depend neither on the attention implementation nor on remat: initialise
    # through the XLA reference (no GPU kernel calls in the init program) without remat (a
    # lifted transform would keep init_train_state from grouping the layers' draws, which
    # took the 0.6b init program from 2,947 fusions to 1,679 on the CPU: msa_jax.batched_init).
    init_model = MSAModel(self.model_cfg.replace(kernels="xla", remat_policy="none"))
    init_boxed = functools.partial(init_train_state, init_model, self.tx)
    with sharding.mesh_context(mesh), nn.logical_axis_rules(self.rules):
      abstract = jax.eval_shape(init_boxed, jax.random.PRNGKey(0), ids)
      self.state_shardings = nn.logical_to_mesh_sharding(
          nn.get_partition_spec(abstract), mesh, self.rules)
    self._init = jax.jit(lambda rng: nn.unbox(init_boxed(rng, ids)),
                         out_shardings=self.state_shardings)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract), self.state_shardings)
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    step = functools.partial(train_step, self.model, self.tx, cfg,
                             answer_token=_answer_token(cfg))

    def step_in_rules(state, batch):
      with nn.logical_axis_rules(self.rules):
        new_state, metrics = step(state, batch)
      return new_state, {**metrics, **update_norms(state.params, new_state.params)}

    self._step = jax.jit(step_in_rules, out_shardings=(self.state_shardings, None),
                         donate_argnums=(0,))
    self._compiled: dict[Any, Any] = {}   # batch shapes → the step compiled ahead of time

  def compile_step(self, batch: MSABatch) -> float:
    """Compiles the step for ``batch``'s shapes (device arrays from ``put_batch``) ahead of
    its first call and keeps it: :meth:`step` runs it for batches of those shapes.
    Returns the seconds it took (0 when already compiled)."""
    key = _shapes_key(batch)
    if key in self._compiled:
      return 0.0
    t0 = time.perf_counter()
    self._compiled[key] = self.lower_step(batch).compile()
    return time.perf_counter() - t0

  def lower_step(self, batch: MSABatch):
    """The step lowered for ``batch``'s shapes (device arrays from ``put_batch``), traced
    under the mesh like :meth:`step`; ``.compile()`` it to inspect or time it."""
    with sharding.mesh_context(self.mesh):
      return self._step.lower(self.abstract_state, batch)

  def init_state(self, seed: int) -> TrainState:
    with sharding.mesh_context(self.mesh):
      return self._init(jax.random.PRNGKey(seed))

  def state_from_params(self, params) -> TrainState:
    """A fresh train state around given (e.g. pretrained) parameters."""
    params = jax.device_put(params, self.state_shardings.params)
    with sharding.mesh_context(self.mesh):
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
    """One training step: the step compiled by :meth:`compile_step` for these shapes,
    else the jitted step (compiled at its first call for each new shape)."""
    compiled = self._compiled.get(_shapes_key(batch)) if self._compiled else None
    with sharding.mesh_context(self.mesh):
      return (compiled or self._step)(state, batch)


def _shapes_key(batch: MSABatch):
  """What a compiled step is specific to: the batch's structure, shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(batch)
  return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves, scaled by their largest magnitude first so that huge but
  finite values (an lr of 1e30 gives ~1e29) do not overflow float32 to inf."""
  leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(tree)]
  peak = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
  scale = jnp.where((peak > 0) & jnp.isfinite(peak), peak, 1.0)
  return scale * jnp.sqrt(sum(jnp.sum(jnp.square(x / scale)) for x in leaves))


def update_norms(old_params, new_params) -> dict[str, jax.Array]:
  """Norms of what a step saves: the new parameters, the update, and their ratio (traced)."""
  update = global_norm(jax.tree.map(lambda a, b: b.astype(jnp.float32) - a, old_params,
                                    new_params))
  return {"param_norm": global_norm(new_params), "update_norm": update,
          "update_ratio": update / jnp.maximum(global_norm(old_params), 1e-12)}


def count_tokens(batch: MSABatch) -> int:
  """Valid tokens the step processes: documents, prefix and active."""
  return int(np.sum(batch.doc_mask) + np.sum(batch.prefix_mask) + np.sum(batch.active_mask))


# What the recipe decides when it starts from a checkpoint (the MSA design, numerics and
# implementation); every other field (the shapes) must be the checkpoint's own.
_RECIPE_FIELDS = ("router_layers", "pooling_chunk_size", "top_k", "rope_mode", "routing_tokens",
                  "routing_score", "remat_policy", "scan_layers", "kernels")
# Not compared with the checkpoint's: what the recipe sets, how it computes (the 4b and
# 0.6b recipes' kernel switches differ from a Hugging Face checkpoint's defaults), dtypes.
_NOT_COMPARED = _RECIPE_FIELDS + IMPLEMENTATION_FIELDS + ("dtype", "param_dtype",
                                                          "initializer_range")


def load_pretrained(init_from: str, model_cfg: ModelConfig):
  """Parameters of ``init_from`` (a Hugging Face Qwen3 or MSA-4B dir, an msa_jax checkpoint
  or a trainer workdir; ``msa_jax.export.convert.from_pretrained``) for a run of
  ``model_cfg``: the recipe's MSA fields (router layers, P, k, ...) and dtypes applied, the
  checkpoint's shapes checked against the recipe's, an error naming each field that differs.
  """
  from msa_jax.export.convert import from_pretrained
  model, params = from_pretrained(
      init_from, dtype=model_cfg.param_dtype, compute_dtype=model_cfg.dtype,
      **{f: getattr(model_cfg, f) for f in _RECIPE_FIELDS})
  differ = {f.name: (getattr(model.config, f.name), getattr(model_cfg, f.name))
            for f in dataclasses.fields(ModelConfig) if f.name not in _NOT_COMPARED
            and getattr(model.config, f.name) != getattr(model_cfg, f.name)}
  if differ:
    listed = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in differ.items())
    raise ValueError(f"--config.init_from={init_from}: the checkpoint's model differs from the "
                     f"config's ({listed}); set --config.model.<field> to the checkpoint's "
                     "values (model.vocab_size=0 derives it from the data, so set it "
                     "explicitly), or start from a checkpoint of the recipe's shape")
  return params


def step_problem(step_metrics, max_update_ratio: float) -> Optional[str]:
  """Why the state a step produced must not be saved, or None when it is sane: a
  non-finite loss or gradient (computed with the previous parameters), non-finite
  new parameters or update, or an update larger than ``max_update_ratio`` × the
  previous parameters' norm (finite, but exploding: e.g. lr 1e30)."""
  values = {k: float(np.asarray(step_metrics[k])) for k in
            ("loss", "grad_norm", "param_norm", "update_norm", "update_ratio")
            if k in step_metrics}
  bad = [f"{k} is {v}" for k, v in values.items() if not np.isfinite(v)]
  if bad:
    return ", ".join(bad)
  ratio = values.get("update_ratio", 0.0)
  if ratio > max_update_ratio:
    return (f"the update exploded: its norm {values['update_norm']:.3g} is {ratio:.3g}x the "
            f"parameters' norm (optim.max_update_ratio={max_update_ratio:g}; parameter norm "
            f"now {values['param_norm']:.3g})")
  return None


def stop_unhealthy(problem: str, step: int, manager, *, unverified: Optional[int] = None,
                   resume_hint: str = "") -> None:
  """Raises ``NonFiniteLossError`` for a bad ``step``. ``unverified``: a step saved just
  before whose parameters produced this step's loss; it is moved aside (never deleted)
  when this step's loss is itself non-finite. The message names the good checkpoint."""
  manager.wait_until_finished()
  moved = ""
  if unverified is not None and unverified in manager.all_steps():
    path = checkpointing.set_aside(manager, unverified, "nonfinite")
    moved = (f" Checkpoint {unverified} (whose parameters gave this loss) was moved to "
             f"{path}.")
  kept = manager.latest_step()
  where = (f"The last good checkpoint is step {kept} in {manager.directory}"
           if kept is not None else f"No good checkpoint is left in {manager.directory}")
  raise NonFiniteLossError(
      f"training stopped at step {step}: {problem}; that state was not saved.{moved} "
      f"{where}. To train on from it, resume with a lower learning rate (or check the data): "
      f"{resume_hint}--config.optim.main_phase_lr=... --allow_config_change (the change is "
      "recorded as config.<step>.json).")


class _SaveGuard:
  """The health checks around saving: a step is saved only when ``step_problem`` finds
  nothing, and a step saved in this session stays unverified until the next step's loss
  (computed with its parameters) is finite."""

  def __init__(self, manager, max_update_ratio: float, resume_hint: str):
    self.manager, self.max_update_ratio = manager, max_update_ratio
    self.resume_hint = resume_hint
    self.unverified: Optional[int] = None

  def check(self, step: int, step_metrics, *, force: bool = False) -> None:
    """Raises on a bad step. Checks every ``force`` (log/save) step and the step after a save."""
    if not force and self.unverified is None:
      return
    problem = step_problem(step_metrics, self.max_update_ratio)
    if problem is None:
      self.unverified = None
      return
    loss_bad = not np.isfinite(float(np.asarray(step_metrics["loss"])))
    stop_unhealthy(problem, step, self.manager, resume_hint=self.resume_hint,
                   unverified=self.unverified if loss_bad else None)

  def saved(self, step: int) -> None:
    self.unverified = step


def _restore_or_init(cfg, setup: TrainSetup, manager, data_iter, *, fallback: bool):
  """``(start_step, state, first_batch)``: the newest checkpoint, else pretrained or fresh
  parameters. Each is made in another thread while the step compiles for the first batch
  (:func:`msa_jax.overlap.beside`), so a run waits for the longer of the two, not their
  sum; ``first_batch`` is that batch, drawn from ``data_iter`` at the run's position (the
  data order does not change), or None when no step is left to run."""
  def first_compile(start_step):
    if start_step >= cfg.num_steps:
      return None
    t0 = time.perf_counter()
    first = next(data_iter)
    return first, setup.compile_step(setup.put_batch(first)), t0

  restored = checkpointing.restore_latest_beside(manager, setup.abstract_state, data_iter,
                                                 first_compile, fallback=fallback)
  if restored is not None:
    step, state, compiled = restored
    _say_first_compile(f"resumed from {manager.directory} at step {step}", compiled)
    return step, state, None if compiled is None else compiled[0]
  if cfg.get("init_from"):
    if not os.path.isdir(cfg.init_from):   # said now, not after the step's compile
      raise ValueError(f"--config.init_from={cfg.init_from}: not a directory (give a local "
                       "Hugging Face Qwen3 dir, an msa_jax checkpoint or a trainer workdir)")

    def make_state():
      return setup.state_from_params(load_pretrained(cfg.init_from, setup.model_cfg))
    what = f"parameters loaded from {cfg.init_from}"
  else:
    def make_state():
      return setup.init_state(cfg.seed)
    what = "state initialised"
  state, compiled = overlap.beside(make_state, lambda: first_compile(0))
  _say_first_compile(what, compiled)
  return 0, state, None if compiled is None else compiled[0]


def _say_first_compile(what: str, compiled) -> None:
  """Prints how long the state and the first step's compile took together (and the
  compile alone); ``compiled``: ``first_compile``'s ``(batch, compile s, start)`` or None."""
  if compiled is None:
    print(what, flush=True)
    return
  _, compile_s, t0 = compiled
  print(f"{what}; the state and the first step's compile took {time.perf_counter() - t0:.1f} s "
        f"(the compile alone {compile_s:.1f} s)", flush=True)


def init_beside(setup: TrainSetup, seed: int, work: Callable[[], Any]):
  """``(fresh state, work())``: :func:`msa_jax.overlap.beside` with ``setup.init_state(seed)``."""
  return overlap.beside(lambda: setup.init_state(seed), work)


def _record_config(workdir: str, config: dict, diffs, start_step: int) -> None:
  """After a successful restore (or a fresh start): ``config.json`` for a new run, or the
  accepted changes as ``config.<start_step>.json``; ``config.json`` is never rewritten."""
  if jax.process_index() != 0:
    return
  if not run_config.write_initial(workdir, config) and diffs:
    run_config.record_change(workdir, start_step, config, diffs)


def train_and_evaluate(cfg, workdir: str, *,
                       on_step: Optional[Callable[[int, dict], None]] = None,
                       allow_config_change: bool = False,
                       restore_fallback: bool = False) -> dict[str, Any]:
  """Trains per ``cfg``, resuming from ``workdir`` if it holds a checkpoint, then evaluates.

  Returns the last logged metrics (plus ``stopped_early`` when SIGTERM ended the run).
  ``on_step(step, metrics)`` is called after every logged step (tests use it).
  ``allow_config_change``: accept a resume whose config differs from the run's saved one
  (``run_config``); ``restore_fallback``: resume from the previous complete checkpoint
  when the newest cannot be read (it is moved aside). Without them both are errors.
  """
  model_cfg = validate_config(cfg)
  apply_xla_flags(cfg.get("xla_flags", ""))
  use_compilation_cache(cfg.get("compilation_cache_dir", ""))
  mesh = sharding.make_mesh(cfg.mesh_shape)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  stages = from_config.batch_stages(cfg.data, cfg.batch_size)
  for start, size in stages:
    if size % batch_shards:
      where = ("batch_size" if size == cfg.batch_size
               else f"data.batch_curriculum (from batch {start})")
      raise ValueError(f"{where} {size} must be a multiple of {batch_shards} (the data × fsdp "
                       f"mesh axes of mesh {dict(mesh.shape)}); change it or config.mesh_shape")
  microbatch.check_microbatches(cfg, [size for _, size in stages], batch_shards)
  config = run_config.run_config_dict(cfg, model_cfg)
  diffs = run_config.check_resume(workdir, config, allow_change=allow_config_change)
  setup = TrainSetup(cfg, mesh, model_cfg)
  data_iter = from_config.make_train_iterator(
      cfg.data, seed=cfg.seed, batch_size=cfg.batch_size,
      chunk_size=model_cfg.pooling_chunk_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  manager = checkpointing.make_manager(workdir, cfg.checkpoint.max_to_keep,
                                       cfg.checkpoint.every_steps, cfg.checkpoint.async_save)
  try:
    start_step, state, first_batch = _restore_or_init(cfg, setup, manager, data_iter,
                                                      fallback=restore_fallback)
  except BaseException:
    manager.close()
    raise
  _record_config(workdir, config, diffs, start_step)
  last, state = _train_loop(cfg, workdir, setup, model_cfg, manager, data_iter, state,
                            start_step, on_step, first_batch)
  if is_primary():   # recall / precision per router layer over the run: router_health.png
    from msa_jax import router_health
    router_health.plot(workdir, list(model_cfg.router_layer_ids))
  if not last.get("stopped_early") and cfg.get("eval") and cfg.eval.get("at_end", True):
    from msa_jax import evaluate
    params = gather_to_host(state.params)   # multi-host: every host has them all
    if is_primary():
      evaluate.run(cfg, workdir, model=setup.model, params=params)
    wait_for_primary("msa_jax_eval_done")
  return last


def _train_loop(cfg, workdir, setup: TrainSetup, model_cfg, manager, data_iter, state,
                start_step: int, on_step, first_batch=None) -> tuple[dict[str, Any], TrainState]:
  """Steps from ``start_step`` to ``cfg.num_steps``: logs, saves (guarded), handles SIGTERM.
  ``first_batch``: the first step's host batch when already drawn from ``data_iter``."""
  writer = metrics_lib.MetricsWriter(workdir, cfg.get("tensorboard", True),
                                     resume_step=start_step)
  progress = metrics_lib.Progress(cfg.num_steps, start_step)
  peak_flops, peak_source = metrics_lib.device_peak_flops()
  measured_flops = metrics_lib.matmul_rate(jnp.bfloat16)
  mesh = setup.mesh
  slices = microbatch.microbatches_of(cfg)
  print(f"training {cfg.num_steps} steps on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), mesh {dict(mesh.shape)}"
        + (f", each batch in {slices} microbatches" if slices > 1 else "")
        + f"; MFU against {peak_source} "
        f"{peak_flops / 1e12:.2f} TFLOP/s per device (mfu) and a measured bf16 matmul "
        f"{measured_flops / 1e12:.2f} TFLOP/s (mfu_measured)", flush=True)
  guard = _SaveGuard(manager, float(cfg.optim.get("max_update_ratio", 1.0)),
                     resume_hint=f"python -m msa_jax.train --workdir={workdir} <same flags> ")

  stop = {"sigterm": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
  last: dict[str, Any] = {}
  tokens_since, t_since, logged_at = 0, time.perf_counter(), start_step
  flops_since = 0.0
  step = start_step
  try:
    while step < cfg.num_steps:
      host_batch, first_batch = (first_batch if first_batch is not None
                                 else next(data_iter)), None
      # This process's tokens × processes: the global count, as the shards are alike.
      tokens_since += count_tokens(host_batch) * jax.process_count()
      flops_since += flops_lib.step_flops(model_cfg, host_batch,
                                          lm_chunk_size=lm_chunk_size(cfg))["train"] \
          * jax.process_count()
      state, step_metrics = setup.step(state, setup.put_batch(host_batch))
      step += 1
      log_now = step % cfg.log_every_steps == 0 or step == cfg.num_steps or stop["sigterm"]
      # Before logging: a bad step is neither logged nor saved.
      guard.check(step, step_metrics, force=log_now or manager.should_save(step))
      if log_now:
        # The interval ends when this step's work does, not when it was dispatched.
        jax.block_until_ready(step_metrics)
        elapsed = time.perf_counter() - t_since
        row = {k: v for k, v in metrics_lib.to_python(step_metrics).items()}
        # A batch without answer (or retrieval) samples has no such loss: not logged as 0.
        for loss, count in (("lm_loss_answer", "answer_samples"),
                            ("lm_loss_retrieval", "retrieval_samples")):
          if row.get(count) == 0:
            row.pop(loss, None)
        row["tokens_per_sec"] = tokens_since / max(elapsed, 1e-9)
        row["tokens_per_step"] = tokens_since / max(step - logged_at, 1)   # sweeps sum it
        # Useful model FLOPs (msa_jax.flops: valid tokens, causal attention, LM head on
        # targets, forward + backward; remat recompute not counted) per second.
        row["model_tflops_per_sec"] = flops_since / max(elapsed, 1e-9) / 1e12
        row["mfu"] = row["model_tflops_per_sec"] * 1e12 / (peak_flops * jax.device_count())
        row["mfu_measured"] = (row["model_tflops_per_sec"] * 1e12
                               / (measured_flops * jax.device_count()))
        row["router_precision@k"] = row.get("router_precision@k")
        writer.write(step, row)
        progress.report(step, row)
        last = {"step": step, **row}
        if on_step is not None:
          on_step(step, row)
        tokens_since, t_since, logged_at = 0, time.perf_counter(), step
        flops_since = 0.0
      # Read the flag once, after logging: a SIGTERM that arrived while logging (or from
      # on_step) is still saved at this step rather than dropped.
      stopping = stop["sigterm"]
      save_now = manager.should_save(step) or step == cfg.num_steps or stopping
      if save_now:
        guard.check(step, step_metrics, force=True)
        checkpointing.save(manager, step, state, data_iter, force=True)
        guard.saved(step)
      if stopping:
        print(f"SIGTERM: saved step {step} to {manager.directory}; exiting cleanly.", flush=True)
        last["stopped_early"] = True
        break
  finally:
    manager.wait_until_finished()
    manager.close()
    signal.signal(signal.SIGTERM, previous)
    writer.close()
  return last, state
