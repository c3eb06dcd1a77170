"""What a training failure must never do (issue 9, README "When things go wrong"):

- keep a checkpoint from a non-finite or exploding update, or one whose parameters
  give a non-finite loss at the next step; the stop names the good step and a sane
  learning rate trains on from it;
- rewrite the run's config.json on a resume, or resume with a changed config
  without being asked (a refused resume leaves the workdir byte-identical);
- bury a restore failure: the error names the step, the path and the cause (both
  shapes of a mismatch), as the last lines of the CLI output; an older complete
  step is used only with ``restore_fallback``;
- write metrics.jsonl rows twice for one step after a resume.

One 12-step run of ``train_common.small_cfg`` (checkpoints at 6 and 12) is shared;
the compiled step is shared with the other training tests (compilation cache).
"""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import msa_jax
from msa_jax.export import CheckpointError

from msa_jax import checkpointing, metrics, run_config
from msa_jax.data import from_config
from msa_jax.trainer import (NonFiniteLossError, _SaveGuard, step_problem, train_and_evaluate,
                             validate_config)
from train_common import (CONFIG_FILE, NUM_STEPS, REPO, shared_train_setups,  # noqa: F401
                          get_config, read_rows, saved_steps, small_cfg)

EVERY = 6


def tree_digest(workdir) -> dict[str, str]:
  """sha256 of every file under ``workdir`` (relative path → digest)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _cfg(**top):
  cfg = small_cfg()
  cfg.checkpoint.every_steps = EVERY
  for k, v in top.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_train_setups):
  """A finished 12-step run with checkpoints at steps 6 and 12."""
  workdir = str(tmp_path_factory.mktemp("run"))
  train_and_evaluate(_cfg(), workdir)
  assert saved_steps(workdir) == [EVERY, NUM_STEPS]
  return workdir


def _copy(run, tmp_path, name="copy"):
  dst = str(tmp_path / name)
  shutil.copytree(run, dst)
  return dst


# ----------------------------------------------------------------------------- config on resume


def test_resume_with_another_width_is_refused_and_changes_nothing(run, tmp_path):
  workdir = _copy(run, tmp_path)
  before = tree_digest(workdir)
  cfg = _cfg()
  cfg.model.hidden_size = 128
  with pytest.raises(run_config.ConfigChangeError) as e:
    train_and_evaluate(cfg, workdir)
  assert "model.hidden_size: saved 64 -> now 128" in str(e.value)
  assert "--allow_config_change" in str(e.value)
  assert tree_digest(workdir) == before
  # Accepted, the restore itself fails on the shapes: named, with both shapes, nothing changed.
  with pytest.raises(checkpointing.CheckpointRestoreError) as e:
    train_and_evaluate(cfg, workdir, allow_config_change=True)
  msg = str(e.value)
  assert f"checkpoint step {NUM_STEPS} from {workdir}/checkpoints/{NUM_STEPS}" in msg
  assert "shape mismatch: params/embed_tokens/embedding: checkpoint (" in msg
  assert ", 64), this config (" in msg and ", 128)" in msg
  assert "--restore_fallback" not in msg           # a config mismatch is not a corrupt step
  assert tree_digest(workdir) == before


def test_shape_compatible_change_needs_the_flag_and_is_recorded(run, tmp_path):
  workdir = _copy(run, tmp_path)
  before = tree_digest(workdir)
  cfg = _cfg(seed=7)
  cfg.model.top_k = 2
  with pytest.raises(run_config.ConfigChangeError) as e:
    train_and_evaluate(cfg, workdir)
  assert "model.top_k: saved 1 -> now 2" in str(e.value) and "seed: saved 0 -> now 7" in str(e.value)
  assert tree_digest(workdir) == before
  train_and_evaluate(cfg, workdir, allow_config_change=True)   # at num_steps: nothing to train
  after = tree_digest(workdir)
  assert after["config.json"] == before["config.json"]
  recorded = json.load(open(os.path.join(workdir, f"config.{NUM_STEPS}.json")))
  assert recorded["model"]["top_k"] == 2 and recorded["seed"] == 7
  # The next resume compares with the newest record: the same config goes ahead unasked.
  train_and_evaluate(cfg, workdir)
  # from_pretrained (and evaluate) load the run with its newest recorded config.
  model, _ = msa_jax.from_pretrained(workdir)
  assert model.config.top_k == 2


def test_fields_that_may_change_on_resume_go_ahead_and_are_recorded(run, tmp_path):
  workdir = _copy(run, tmp_path)
  config_before = open(os.path.join(workdir, "config.json")).read()
  cfg = _cfg(log_every_steps=3)
  cfg.checkpoint.max_to_keep = 5
  cfg.model.rope_tables = True          # a compute switch: the same function, another way
  train_and_evaluate(cfg, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == config_before
  recorded = json.load(open(os.path.join(workdir, f"config.{NUM_STEPS}.json")))
  assert recorded["log_every_steps"] == 3 and recorded["model"]["rope_tables"] is True


def test_fields_from_another_code_version_are_recorded_not_refused(run, tmp_path):
  """A run started before a config key existed (here optim.max_update_ratio) resumes; the
  added key is recorded in config.<step>.json."""
  workdir = _copy(run, tmp_path)
  path = os.path.join(workdir, "config.json")
  saved = json.load(open(path))
  del saved["optim"]["max_update_ratio"]
  with open(path, "w") as f:
    json.dump(saved, f)
  diffs = run_config.check_resume(workdir, {**saved, "optim": {**saved["optim"],
                                                               "max_update_ratio": 1.0}},
                                  allow_change=False)
  assert diffs == [("optim.max_update_ratio", "(absent)", 1.0)]
  train_and_evaluate(_cfg(), workdir)
  assert json.load(open(os.path.join(workdir, f"config.{NUM_STEPS}.json")))["optim"][
      "max_update_ratio"] == 1.0


def test_may_change_list():
  assert run_config.may_change("num_steps") and run_config.may_change("eval.num_examples")
  assert run_config.may_change("checkpoint.every_steps") and run_config.may_change("microbatches")
  assert not run_config.may_change("optim.main_phase_lr")
  assert not run_config.may_change("model.top_k") and not run_config.may_change("evaluation")
  # kernel switches compute the same function another way; the router's gradient into the
  # trunk changes what training does
  for name in ("model.kernels", "model.attention_short_persistent_bwd", "model.rope_tables",
               "model.remat_policy", "model.qk_norm_rope_vjp"):
    assert run_config.may_change(name), name
  assert not run_config.may_change("model.router_trunk_grad")


# ----------------------------------------------------------------------------- restore errors


def _corrupt_newest(workdir) -> str:
  """Truncates the array data files of the newest step's state (its metadata stays
  readable, so the restore starts and fails in orbax's asynchronous reads)."""
  state = os.path.join(workdir, "checkpoints", str(NUM_STEPS), "state")
  hit = 0
  for root, _, files in os.walk(state):
    for name in files:
      path = os.path.join(root, name)
      if os.path.basename(root) == "d" and os.path.getsize(path) > 1000:
        with open(path, "r+b") as f:
          f.truncate(16)
        hit += 1
  assert hit, f"no array data file found under {state}"
  return state


def test_corrupt_newest_step_is_named_and_fallback_only_when_asked(run, tmp_path):
  workdir = _copy(run, tmp_path)
  _corrupt_newest(workdir)
  before = tree_digest(workdir)
  with pytest.raises(checkpointing.CheckpointRestoreError) as e:
    train_and_evaluate(_cfg(), workdir)
  msg = str(e.value)
  assert f"could not restore checkpoint step {NUM_STEPS} from {workdir}/checkpoints/" in msg
  assert "missing or corrupt" in msg and "--restore_fallback" in msg
  assert "\n" not in e.value.cause                  # one line, no TensorStore spec dump
  assert tree_digest(workdir) == before             # nothing moved without the flag
  # from_pretrained (what evaluate loads through) names the step dir and the cause too.
  with pytest.raises(CheckpointError) as e:
    msa_jax.from_pretrained(workdir)
  assert str(e.value).startswith(f"{workdir}/checkpoints/{NUM_STEPS}/state: cannot restore "
                                 f"(step {NUM_STEPS}): ")
  assert "corrupt" in str(e.value)
  assert "\n" not in str(e.value)
  rows = []
  train_and_evaluate(_cfg(), workdir, restore_fallback=True,
                     on_step=lambda step, row: rows.append(step))
  assert rows == list(range(EVERY + 1, NUM_STEPS + 1))   # resumed from step 6
  aside = os.listdir(os.path.join(workdir, checkpointing.SET_ASIDE_DIR))
  assert len(aside) == 1 and aside[0].startswith(f"{NUM_STEPS}.unreadable.")
  steps = [r["step"] for r in read_rows(workdir)]
  assert steps == list(range(1, NUM_STEPS + 1))      # no step twice after the resume
  superseded = os.path.join(workdir, metrics.SUPERSEDED_FILE)
  assert [json.loads(l)["step"] for l in open(superseded)] == list(range(EVERY + 1, NUM_STEPS + 1))


def test_cli_failure_ends_with_the_cause(run, tmp_path):
  """The corrupt-step failure through ``python -m msa_jax.train``: the cause is the last
  line, and no asynchronous-checkpointer noise follows it."""
  workdir = _copy(run, tmp_path)
  _corrupt_newest(workdir)
  cmd = [sys.executable, "-m", "msa_jax.train", f"--config={CONFIG_FILE}:smoke",
         f"--workdir={workdir}", "--config.model.num_layers=1", "--config.model.router_layers=0",
         "--config.batch_size=8", f"--config.num_steps={NUM_STEPS}", "--config.log_every_steps=1",
         "--config.tensorboard=False", "--config.eval.at_end=False",
         "--config.optim.warmup_phase_steps=4", "--config.optim.warmup_lm_weight=0.1",
         "--config.optim.lr_ramp_steps=2", f"--config.checkpoint.every_steps={EVERY}"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 1, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("msa_jax.train failed: CheckpointRestoreError: could not restore "
                         f"checkpoint step {NUM_STEPS}"), out.stderr[-3000:]
  assert "Event loop is closed" not in out.stderr and "meta_path" not in out.stderr
  assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 3


# ----------------------------------------------------------------------------- NaN / explosion


def _metrics(loss=1.0, grad_norm=1.0, param_norm=10.0, update_norm=0.1, update_ratio=0.01):
  return dict(loss=loss, grad_norm=grad_norm, param_norm=param_norm,
              update_norm=update_norm, update_ratio=update_ratio)


@pytest.mark.parametrize("bad, expect", [
    ({}, None),
    (dict(loss=math.nan), "loss is nan"),
    (dict(grad_norm=math.inf), "grad_norm is inf"),
    (dict(param_norm=math.inf, update_norm=math.inf, update_ratio=math.inf), "param_norm is inf"),
    (dict(param_norm=8.7e29, update_norm=8.7e29, update_ratio=8.7e28), "the update exploded"),
])
def test_step_problem(bad, expect):
  problem = step_problem(_metrics(**bad), max_update_ratio=1.0)
  if expect is None:
    assert problem is None
  else:
    assert expect in problem


def test_save_followed_by_a_nonfinite_loss_is_set_aside(tmp_path):
  """A step saved in this session is unverified until the next step's loss (computed with
  its parameters) is finite; a NaN there moves it aside and names the previous step."""
  cfg = get_config("smoke")
  it = from_config.make_train_iterator(cfg.data, seed=0, batch_size=4, chunk_size=2,
                                       verbose=False)
  manager = checkpointing.make_manager(str(tmp_path), 3, 10, async_save=True)
  state = {"w": jax.numpy.ones((3,))}
  guard = _SaveGuard(manager, 1.0, resume_hint="")
  for step in (10, 20):
    guard.check(step, _metrics(), force=True)
    checkpointing.save(manager, step, state, it, force=True)
    guard.saved(step)
    if step == 10:
      guard.check(11, _metrics())                   # finite: step 10 is good
  with pytest.raises(NonFiniteLossError) as e:
    guard.check(21, _metrics(loss=math.nan))
  msg = str(e.value)
  assert "training stopped at step 21: loss is nan" in msg
  assert "Checkpoint 20 (whose parameters gave this loss) was moved to" in msg
  assert "The last good checkpoint is step 10" in msg and "--allow_config_change" in msg
  assert manager.all_steps() == [10]
  assert os.listdir(tmp_path / checkpointing.SET_ASIDE_DIR)[0].startswith("20.nonfinite.")
  manager.close()


def test_exploding_update_is_not_saved_and_resume_trains_on(run, tmp_path):
  """The explosion path on the shared compiled step: a tiny ``optim.max_update_ratio``
  (host-side, not compiled in) flags the first non-zero update (step 2; step 1's lr is 0);
  step 1 is saved, step 2 is not, and the recipe's ratio resumes and trains to the end."""
  workdir = str(tmp_path / "run")
  strict = _cfg()
  strict.checkpoint.every_steps = 1
  strict.optim.max_update_ratio = 1e-9
  with pytest.raises(NonFiniteLossError) as e:
    train_and_evaluate(strict, workdir)
  assert "training stopped at step 2: the update exploded" in str(e.value)
  assert "The last good checkpoint is step 1" in str(e.value)
  assert saved_steps(workdir) == [1]
  last = train_and_evaluate(_cfg(), workdir, allow_config_change=True)
  assert last["step"] == NUM_STEPS
  assert [r["step"] for r in read_rows(workdir)] == list(range(1, NUM_STEPS + 1))
  assert all(0 <= r["update_ratio"] < 1.0 and np.isfinite(r["param_norm"])
             for r in read_rows(workdir))
  assert json.load(open(os.path.join(workdir, "config.1.json")))["optim"]["max_update_ratio"] == 1.0


@pytest.mark.slow   # compiles the step a second time (lr 1e30 is a constant of the program)
def test_exploding_lr_stops_before_saving_and_a_sane_lr_trains_on(tmp_path, shared_train_setups):
  """lr 1e30 in the main phase (from step 5): the update of step 5 explodes the parameters
  (finite, ~1e29); that state is not saved, the stop names step 4, and resuming with the
  recipe's lr (accepted as a config change) trains on to the end with finite losses."""
  workdir = str(tmp_path / "run")
  bad = _cfg()
  bad.checkpoint.every_steps = 4
  bad.optim.main_phase_lr = 1e30
  with pytest.raises(NonFiniteLossError) as e:
    train_and_evaluate(bad, workdir)
  msg = str(e.value)
  assert "training stopped at step 5: the update exploded" in msg
  assert "The last good checkpoint is step 4" in msg
  assert saved_steps(workdir) == [4]
  config_before = open(os.path.join(workdir, "config.json")).read()
  sane = _cfg()
  sane.checkpoint.every_steps = 4
  with pytest.raises(run_config.ConfigChangeError, match="optim.main_phase_lr: saved 1e"):
    train_and_evaluate(sane, workdir)
  last = train_and_evaluate(sane, workdir, allow_config_change=True)
  assert last["step"] == NUM_STEPS and np.isfinite(last["loss"])
  rows = read_rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
  assert all(np.isfinite(r["loss"]) and r["update_ratio"] < 1.0 for r in rows)
  assert open(os.path.join(workdir, "config.json")).read() == config_before
  assert os.path.exists(os.path.join(workdir, "config.4.json"))


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("field, value, message", [
    ("checkpoint.every_steps", 0, "checkpoint.every_steps must be >= 1, got 0"),
    ("log_every_steps", 0, "log_every_steps must be >= 1, got 0"),
    ("optim.main_phase_lr", -1e-3, "optim.main_phase_lr must be a finite number > 0"),
    ("optim.warmup_phase_lr", 0.0, "optim.warmup_phase_lr must be a finite number > 0"),
    ("optim.final_lr", -1.0, "optim.final_lr must be a finite number >= 0"),
    ("data.max_doc_len", -1, "data.max_doc_len must be >= 0"),
])
def test_bad_cadence_and_rates_are_rejected_up_front(tmp_path, field, value, message):
  cfg = get_config("smoke")
  section, _, name = field.rpartition(".")
  setattr(cfg[section] if section else cfg, name, value)
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    validate_config(cfg)


def test_metrics_rewind_moves_rows_after_the_resume_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
  assert metrics.rewind_rows(str(path), 2) == 3
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
  moved = (tmp_path / metrics.SUPERSEDED_FILE).read_text().splitlines()
  assert moved[:2] == ['{"step": 3}', '{"step": 4}'] and moved[2].startswith('{"step": 5')
  assert metrics.rewind_rows(str(path), 2) == 0
