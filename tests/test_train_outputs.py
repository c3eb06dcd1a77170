"""What a training run leaves behind, and how it stops on a non-finite loss.

* ``metrics.jsonl``: one row per logged step with the SPEC §4 telemetry (losses,
  router recall@1/5/10 and precision@k, tokens/s, MFU) and the schedule columns
  (``learning_rate``, ``lm_weight``, ``aux_weight``) that follow
  ``msa_jax.optimizer`` step by step; TensorBoard events; ``config.json``.
* ``msa_jax.from_pretrained(workdir)`` loads the trained params from the newest
  trainer checkpoint; its logits equal those of the params the run ended with.
* A NaN loss raises ``NonFiniteLossError`` naming the step and the kept
  checkpoint; nothing bad is saved, and the kept checkpoint resumes the run.

All runs use ``train_common.small_cfg`` (12 steps, warm-up phase ends after
step 4) and share its compiled step through ``train_common.shared_train_setups``.
"""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from msa_jax import checkpointing, sharding
from msa_jax.data import from_config
from msa_jax.optimizer import learning_rate_schedule, loss_weights
from msa_jax.trainer import (NonFiniteLossError, TrainSetup, resolve_model_config,
                             train_and_evaluate)
from train_common import (NUM_STEPS, WARMUP, shared_train_setups, read_rows,  # noqa: F401
                          saved_steps, small_cfg)

NAN_AT, SAVE_EVERY = 7, 5
REQUIRED = ("step", "loss", "lm_loss", "aux_loss", "router_recall@1", "router_recall@5",
            "router_recall@10", "router_precision@k", "tokens_per_sec", "mfu", "learning_rate",
            "lm_weight", "aux_weight", "grad_norm")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_train_setups):
  """A full run with TensorBoard on and the end-of-run eval replaced by a probe that
  keeps the final (model, params) the trainer hands to evaluation."""
  cfg = small_cfg()
  cfg.tensorboard = True
  cfg.eval.at_end = True
  workdir = str(tmp_path_factory.mktemp("run"))
  final = {}

  def fake_eval(cfg_, workdir_, *, model, params):
    final.update(model=model, params=jax.device_get(params), workdir=workdir_)

  with pytest.MonkeyPatch.context() as mp:
    from msa_jax import evaluate
    mp.setattr(evaluate, "run", fake_eval)
    last = train_and_evaluate(cfg, workdir)
  return dict(cfg=cfg, workdir=workdir, last=last, final=final)


# ----------------------------------------------------------------------------- files


def test_metrics_rows_have_the_spec_telemetry(trained):
  rows = read_rows(trained["workdir"])
  assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
  for r in rows:
    missing = [k for k in REQUIRED if k not in r]
    assert not missing, f"step {r['step']} lacks {missing}"
    assert np.isfinite(r["loss"]) and r["lm_loss"] > 0 and r["aux_loss"] > 0
    for k in ("router_recall@1", "router_recall@5", "router_recall@10", "router_precision@k"):
      assert 0.0 <= r[k] <= 1.0, (k, r[k])
    assert r["router_recall@1"] <= r["router_recall@5"] <= r["router_recall@10"]
    assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
    assert len(r["router_recall@1_per_layer"]) == 1      # one router layer
    assert r["loss"] == pytest.approx(r["lm_weight"] * r["lm_loss"]
                                      + r["aux_weight"] * r["aux_loss"], rel=1e-5)
  assert trained["last"] == {"step": NUM_STEPS, **{k: v for k, v in rows[-1].items()
                                                   if k != "step"}}


def test_schedule_columns_follow_the_two_phases(trained):
  """Row ``s`` is the step taken from state.step = s - 1."""
  cfg = trained["cfg"]
  schedule = learning_rate_schedule(cfg)
  rows = read_rows(trained["workdir"])
  for r in rows:
    i = r["step"] - 1
    lm_w, aux_w = loss_weights(cfg, i)
    assert r["learning_rate"] == pytest.approx(float(schedule(i)), rel=1e-6, abs=0)
    assert (r["lm_weight"], r["aux_weight"]) == (float(lm_w), float(aux_w))
  by_step = {r["step"]: r for r in rows}
  # warm-up: 0.1·LM + aux, lr ramp 0 → 3e-3 over 2 steps, then flat
  for s in range(1, WARMUP + 1):
    assert (by_step[s]["lm_weight"], by_step[s]["aux_weight"]) == pytest.approx((0.1, 1.0))
  assert [by_step[s]["learning_rate"] for s in (1, 2, 3, 4)] == pytest.approx(
      [0.0, 1.5e-3, 3e-3, 3e-3])
  # main: LM + 0.1·aux, cosine from 3e-3 to final_lr 1e-4 at num_steps
  for s in range(WARMUP + 1, NUM_STEPS + 1):
    assert (by_step[s]["lm_weight"], by_step[s]["aux_weight"]) == pytest.approx((1.0, 0.1))
  main = [by_step[s]["learning_rate"] for s in range(WARMUP + 1, NUM_STEPS + 1)]
  assert main[0] == pytest.approx(3e-3)
  assert all(a > b for a, b in zip(main, main[1:]))
  assert float(schedule(NUM_STEPS)) == pytest.approx(1e-4)


def test_tensorboard_events_and_config_json(trained):
  workdir = trained["workdir"]
  events = [f for f in os.listdir(os.path.join(workdir, "tensorboard"))
            if f.startswith("events.out.tfevents")]
  assert events and os.path.getsize(os.path.join(workdir, "tensorboard", events[0])) > 100
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["num_steps"] == NUM_STEPS and config["variant"] == "smoke"
  assert config["optim"]["warmup_phase_steps"] == WARMUP
  # ``model`` is the resolved ModelConfig (the smoke recipe's vocab_size=0 → the tokenizer's).
  model = msa_jax.ModelConfig.from_dict(config["model"])
  assert config["model"] == resolve_model_config(trained["cfg"]).to_dict()
  assert model == trained["final"]["model"].config
  assert model.num_layers == 1 and model.router_layers == (0,)
  assert model.vocab_size >= from_config.vocab_size_of(trained["cfg"].data) > 0


def test_tensorboard_off_writes_no_events(tmp_path, shared_train_setups):
  cfg = small_cfg()
  assert cfg.tensorboard is False
  stop_at_1 = lambda step, row: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731 (a short run)
  assert train_and_evaluate(cfg, str(tmp_path), on_step=stop_at_1)["stopped_early"]
  assert not (tmp_path / "tensorboard").exists()
  assert [r["step"] for r in read_rows(tmp_path)] == [1]
  assert (tmp_path / "config.json").is_file()


def test_missing_tensorboardx_warns_and_keeps_jsonl(tmp_path, monkeypatch, caplog):
  # The GPU image lacks tensorboardX: the writer must fall back to metrics.jsonl, loudly.
  import sys
  from msa_jax import metrics as metrics_lib
  monkeypatch.setitem(sys.modules, "tensorboardX", None)          # import → ImportError
  with caplog.at_level("WARNING"):
    writer = metrics_lib.MetricsWriter(str(tmp_path), enable_tensorboard=True)
  writer.write(3, {"lm_loss": 1.5})
  writer.close()
  assert "tensorboardX is not installed" in caplog.text
  assert not (tmp_path / "tensorboard").exists()
  assert read_rows(tmp_path) == [{"step": 3, "lm_loss": 1.5}]


# ----------------------------------------------------------------------------- from_pretrained


def test_from_pretrained_on_a_trainer_workdir(trained):
  workdir = trained["workdir"]
  assert saved_steps(workdir) == [NUM_STEPS]
  model, params = msa_jax.from_pretrained(workdir)
  assert model.config == trained["final"]["model"].config
  final = trained["final"]["params"]
  assert jax.tree.structure(params) == jax.tree.structure(final)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(final)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 16)),
                    jnp.int32)
  got = np.asarray(jax.jit(model.apply)({"params": params}, ids))
  want = np.asarray(jax.jit(trained["final"]["model"].apply)({"params": final}, ids))
  assert got.shape == (2, 16, model.config.vocab_size)
  np.testing.assert_array_equal(got, want)
  # Not the initial params: training moved them.
  cfg = trained["cfg"]
  init = TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape)).init_state(cfg.seed).params
  assert np.max(np.abs(np.asarray(init["layers_0"]["q_proj"]["kernel"])
                       - np.asarray(params["layers_0"]["q_proj"]["kernel"]))) > 1e-3


def test_from_pretrained_step_and_errors(trained, tmp_path):
  with pytest.raises(msa_jax.export.CheckpointError,
                     match=rf"no checkpoint for step 3; steps: \[{NUM_STEPS}\]"):
    msa_jax.from_pretrained(trained["workdir"], step=3)
  model, _ = msa_jax.from_pretrained(trained["workdir"], step=NUM_STEPS)
  assert model.config.top_k == trained["cfg"].model.top_k
  # A workdir whose run has not saved yet says so.
  (tmp_path / "config.json").write_text(json.dumps({"model": trained["cfg"].model.to_dict()}))
  with pytest.raises(msa_jax.export.CheckpointError, match="without checkpoints"):
    msa_jax.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- NaN


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory, shared_train_setups):
  """Step NAN_AT returns a NaN loss and NaN params (as a diverged step would)."""
  cfg = small_cfg()
  cfg.checkpoint.every_steps = SAVE_EVERY
  workdir = str(tmp_path_factory.mktemp("nan"))
  real_step = TrainSetup.step
  calls = []

  def diverging_step(self, state, batch):
    state, metrics = real_step(self, state, batch)
    calls.append(1)
    if len(calls) == NAN_AT:
      nan = jnp.float32(jnp.nan)
      state = state.replace(params=jax.tree.map(lambda p: p * nan, state.params))
      metrics = {**metrics, "loss": metrics["loss"] * nan}
    return state, metrics

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(TrainSetup, "step", diverging_step)
    with pytest.raises(NonFiniteLossError) as e:
      train_and_evaluate(cfg, workdir)
  return dict(cfg=cfg, workdir=workdir, error=str(e.value), steps=saved_steps(workdir),
              rows=read_rows(workdir))


def test_nan_names_the_step_and_the_kept_checkpoint(nan_run):
  msg = nan_run["error"]
  ckpts = os.path.join(os.path.abspath(nan_run["workdir"]), "checkpoints")
  assert msg.startswith(f"training stopped at step {NAN_AT}: loss is nan")
  assert "that state was not saved" in msg
  assert f"The last good checkpoint is step {SAVE_EVERY} in {ckpts}" in msg
  assert "lower learning rate" in msg and "--allow_config_change" in msg


def test_nan_step_is_neither_saved_nor_logged(nan_run):
  assert nan_run["steps"] == [SAVE_EVERY]
  assert [r["step"] for r in nan_run["rows"]] == list(range(1, NAN_AT))
  assert all(np.isfinite(r["loss"]) for r in nan_run["rows"])


def test_kept_checkpoint_restores_finite_and_resumes(nan_run, trained):
  cfg, workdir = nan_run["cfg"], nan_run["workdir"]
  setup = TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape))
  manager = checkpointing.make_manager(workdir, 3, SAVE_EVERY, async_save=False)
  data = from_config.make_train_iterator(cfg.data, seed=cfg.seed, batch_size=cfg.batch_size,
                                            chunk_size=cfg.model.pooling_chunk_size)
  step, state = checkpointing.restore_latest(manager, setup.abstract_state, data)
  manager.close()
  assert step == SAVE_EVERY and int(state.step) == SAVE_EVERY
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))
  # Resuming from it (without the fault) finishes the run exactly as an unbroken run.
  last = train_and_evaluate(cfg, workdir)
  assert last["step"] == NUM_STEPS and "stopped_early" not in last
  rows = read_rows(workdir)
  # The rows the failed attempt logged after the kept step moved to metrics.superseded.jsonl.
  assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
  superseded = os.path.join(workdir, "metrics.superseded.jsonl")
  assert [json.loads(l)["step"] for l in open(superseded)] == list(range(SAVE_EVERY + 1, NAN_AT))
  reference = {r["step"]: r for r in read_rows(trained["workdir"])}
  for r in rows:
    for k in ("loss", "lm_loss", "aux_loss"):
      assert r[k] == reference[r["step"]][k], (r["step"], k)
