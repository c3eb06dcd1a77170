"""SIGTERM mid-run saves state + data iterator; a second ``train_and_evaluate`` on the
same workdir resumes and reproduces the uninterrupted run bitwise (CPU).

Run A: 12 steps uninterrupted. Run B: the same config, SIGTERM sent from the
``on_step`` callback at step 3 (so the handler fires while the trainer is
logging, the hardest moment), then B is resumed to step 12. The resumed part
crosses the warm-up → main phase boundary (after step 4). Checkpoints use the
config default (async save); ``checkpoint.every_steps`` is larger than the run,
so the only saves are the SIGTERM save and the final one.

A, B and resumed B share one compiled step (``train_common.shared_train_setups``), so
only A pays for compiling.
"""
import os
import signal
import time

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
import pytest

from msa_jax import checkpointing
from msa_jax.data import from_config
from msa_jax.trainer import train_and_evaluate
from train_common import (NUM_STEPS, shared_train_setups, read_rows,  # noqa: F401 (fixture)
                          saved_steps, small_cfg)

SIGTERM_AT = 3
LOSSES = ("loss", "lm_loss", "aux_loss")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_train_setups):
  cfg = small_cfg()
  handler_before = signal.getsignal(signal.SIGTERM)
  assert cfg.checkpoint.async_save, "the default (async) save is what this test pins"
  a = str(tmp_path_factory.mktemp("A"))
  b = str(tmp_path_factory.mktemp("B"))
  last_a = train_and_evaluate(cfg, a)

  seen = []

  def kill_at(step, row):
    seen.append(step)
    if step == SIGTERM_AT:
      os.kill(os.getpid(), signal.SIGTERM)

  last_b1 = train_and_evaluate(cfg, b, on_step=kill_at)
  handler_after = signal.getsignal(signal.SIGTERM)
  rows_b1 = read_rows(b)
  steps_b1 = saved_steps(b)
  last_b2 = train_and_evaluate(cfg, b, on_step=lambda step, row: seen.append(step))
  return dict(cfg=cfg, a=a, b=b, last_a=last_a, last_b1=last_b1, last_b2=last_b2,
              rows_b1=rows_b1, steps_b1=steps_b1, seen=seen,
              handler_before=handler_before, handler_after=handler_after)


def test_sigterm_saves_and_returns_early(runs):
  assert runs["last_b1"]["stopped_early"] is True
  assert runs["last_b1"]["step"] == SIGTERM_AT
  assert runs["steps_b1"] == [SIGTERM_AT]
  assert [r["step"] for r in runs["rows_b1"]] == list(range(1, SIGTERM_AT + 1))
  # The trainer's handler is removed again when it returns.
  assert runs["handler_after"] == runs["handler_before"]


def test_resume_continues_after_the_saved_step(runs):
  assert runs["seen"] == list(range(1, NUM_STEPS + 1))
  assert "stopped_early" not in runs["last_b2"]
  assert runs["last_b2"]["step"] == NUM_STEPS
  assert [r["step"] for r in read_rows(runs["b"])] == list(range(1, NUM_STEPS + 1))


def test_only_the_sigterm_and_final_checkpoints_are_saved(runs):
  assert saved_steps(runs["a"]) == [NUM_STEPS]
  assert saved_steps(runs["b"]) == [SIGTERM_AT, NUM_STEPS]


def test_resumed_losses_equal_the_uninterrupted_run_bitwise(runs):
  rows_a, rows_b = read_rows(runs["a"]), read_rows(runs["b"])
  assert len(rows_a) == len(rows_b) == NUM_STEPS
  for ra, rb in zip(rows_a, rows_b):
    assert ra["step"] == rb["step"]
    for k in LOSSES + ("router_recall@1", "grad_norm", "learning_rate", "lm_weight",
                       "aux_weight", "target_tokens"):
      assert rb[k] == ra[k], f"step {ra['step']} {k}: resumed {rb[k]!r} vs {ra[k]!r}"
  # The resumed part spans both phases, so the comparison covers the switch.
  resumed = rows_b[SIGTERM_AT:]
  assert sorted({round(r["lm_weight"], 6) for r in resumed}) == [0.1, 1.0]
  # Losses move from step to step: equal rows are not equal by being constant.
  assert len({r["lm_loss"] for r in rows_a}) == NUM_STEPS


def _batch_after(cfg, steps_served):
  it = from_config.make_train_iterator(cfg.data, seed=cfg.seed, batch_size=cfg.batch_size,
                                          chunk_size=cfg.model.pooling_chunk_size)
  for _ in range(steps_served):
    next(it)
  return it


def test_data_iterator_resumes_at_the_next_batch(runs):
  cfg = runs["cfg"]
  fresh = _batch_after(cfg, 0)
  manager = checkpointing.make_manager(runs["b"], 3, 1000, async_save=False)
  manager.restore(SIGTERM_AT, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(fresh)))
  expected = _batch_after(cfg, SIGTERM_AT)
  assert fresh.get_state() == expected.get_state()
  got, want = next(fresh), next(expected)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert x.shape == y.shape and (x == y).all()
  # And it is not simply the first batch again.
  first = next(_batch_after(cfg, 0))
  assert any(x.shape != y.shape or (x != y).any()
             for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(first)))
  manager.close()


def test_data_workers_outlive_a_sigterm_to_the_process_group(tmp_path, shared_train_setups,
                                                            monkeypatch):
  """A SIGTERM to every process of the job (``timeout``, SLURM) reaches the data workers
  too; they ignore it and the trainer, which saves and exits on its own SIGTERM, keeps its
  data. Here only the workers are signalled (at step 2): they must be alive a second
  later and the run must finish all its steps (a worker killed by the signal fails the
  next batch once the buffers run dry: 'Worker process was terminated unexpectedly')."""
  import multiprocessing
  monkeypatch.setattr(from_config.os, "cpu_count", lambda: 8)   # 2 workers on a 2-core CI
  cfg = small_cfg()
  cfg.data.worker_count = 2
  signalled = []

  def term_workers(step, row):
    if step == 2:
      workers = multiprocessing.active_children()
      assert workers, "the data workers should be this process's children"
      for w in workers:
        os.kill(w.pid, signal.SIGTERM)
      time.sleep(1.0)
      signalled.extend(w.is_alive() for w in workers)

  last = train_and_evaluate(cfg, str(tmp_path), on_step=term_workers)
  assert signalled and all(signalled), "a data worker died of SIGTERM"
  assert last["step"] == NUM_STEPS and "stopped_early" not in last
  assert [r["step"] for r in read_rows(str(tmp_path))] == list(range(1, NUM_STEPS + 1))
