"""Tests of the grain pipeline: determinism, bucketing, sharding, checkpoint/resume."""
import json
import os

import numpy as np
import pytest

from msa_jax.data import pipeline
from msa_jax.data.collate import BucketShapes, WasteMeter, global_position_gaps
from msa_jax.data.synthetic import KVConfig, KVRetrievalTask, smoke_kv_task

SMOKE_BUCKET = BucketShapes(batch=8, prefix=1, docs=32, doc_len=8, active=16)


def _same(a, b):
  return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


def _smoke_ds(**kw):
  task = smoke_kv_task(seed=0)
  kw.setdefault("buckets", [SMOKE_BUCKET])
  return pipeline.batch_dataset(task, specials=task.tokenizer.specials, seed=1,
                                window_batches=2, **kw)


def test_smoke_batches_are_full_and_deterministic():
  it1, it2 = iter(_smoke_ds()), iter(_smoke_ds())
  meter = WasteMeter()
  for _ in range(5):
    b1, b2 = next(it1), next(it2)
    assert _same(b1, b2)
    assert b1.shape_summary == dict(batch=8, prefix=1, docs=32, doc_len=8, active=16)
    assert b1.active_mask.any(-1).all()       # no padding rows
    assert (b1.positive_docs.sum(-1) == 1).all()
    meter.update(b1)
  waste = meter.summary()
  assert waste["doc_tokens"] == 0.0 and waste["prefix"] == 0.0
  assert waste["active"] < 0.4  # interleave samples of 7 and 14 tokens in 16 slots


def _assert_resumes(make_ds, reference=None, skip: int = 3, count: int = 4) -> list:
  """Reads ``skip`` batches of ``make_ds()`` (stopping mid-window: a window is 2 batches),
  saves its state through JSON (as orbax does), and checks that a fresh ``make_ds()`` set
  to it gives the next ``count`` batches of ``reference`` (default: the first iterator);
  returns those batches."""
  it = iter(make_ds())
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(reference or it) for _ in range(count)]
  resumed = iter(make_ds())
  resumed.set_state(state)
  for e in expected:
    assert _same(next(resumed), e)
  return expected


def test_resume_from_state_gives_same_batches():
  _assert_resumes(_smoke_ds)


def test_finite_epoch_sharding_and_remainder():
  task = smoke_kv_task(seed=0)
  source = [task(i) for i in range(10)]  # 20 interleave samples
  def ids(pi, pc, **kw):
    ds = pipeline.batch_dataset(source, buckets=[SMOKE_BUCKET], seed=3,
                                specials=task.tokenizer.specials, window_batches=2,
                                process_index=pi, process_count=pc, **kw)
    return [b for b in ds]
  full = ids(0, 1)
  assert [b.active_mask.any(-1).sum() for b in full] in ([8, 8, 4], [8, 4, 8], [4, 8, 8])
  assert sum(int(b.active_mask.any(-1).sum()) for b in ids(0, 1, drop_remainder=True)) == 16
  # two process shards: disjoint questions covering all 10 examples
  q = lambda bs: {tuple(r[m].tolist()) for b in bs
                  for r, m in zip(b.active_tokens, b.question_mask) if m.sum() == 2}
  s0, s1 = q(ids(0, 2)), q(ids(1, 2))
  assert not s0 & s1 and len(s0 | s1) == 10
  # shuffling: the order depends on the seed, the content does not
  ex = pipeline.example_dataset(source, seed=3)
  assert sorted(map(id, ex)) == sorted(map(id, source)) and list(ex) != source


def test_buckets_group_by_size():
  small = KVRetrievalTask(KVConfig(num_docs=4), seed=0)
  big = KVRetrievalTask(KVConfig(num_docs=16), seed=0)
  source = [(small if i % 2 else big)(i) for i in range(16)]
  buckets = [BucketShapes(4, 1, 16, 8, 16), BucketShapes(4, 1, 4, 8, 16)]
  ds = pipeline.batch_dataset(source, buckets=buckets, seed=0, window_batches=8,
                              specials=small.tokenizer.specials)
  sizes = sorted(b.shape_summary["docs"] for b in ds)
  assert sizes == [4] * 4 + [16] * 4  # 16 small + 16 big samples, never mixed
  with pytest.raises(ValueError, match="fits no bucket"):
    next(iter(pipeline.batch_dataset(source, buckets=buckets[1:], seed=0,
                                     specials=small.tokenizer.specials)))


def test_eval_examples_at_memory_factor():
  task = smoke_kv_task(seed=0)
  one = pipeline.eval_examples(task, 3)
  four = pipeline.eval_examples(task, 3, memory_factor=4)
  assert [len(e.docs) for e in four] == [128] * 3
  assert [(e.question, e.target) for e in one] == [(e.question, e.target) for e in four]


def test_orbax_checkpoint_roundtrip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  it = iter(_smoke_ds())
  next(it)
  ckptr = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  ckptr.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(it))
  expected = next(it)
  restored = iter(_smoke_ds())
  ckptr.restore(tmp_path / "data", args=grain.checkpoint.CheckpointRestore(restored))
  assert _same(next(restored), expected)


@pytest.mark.slow   # ~40 s on the CI CPU
def test_example_workers_give_the_same_batches_and_resume():
  """``worker_count`` moves example generation to worker processes without changing the
  batches, and the iterator's state resumes there as in-process."""
  in_process = iter(_smoke_ds())
  workers = iter(_smoke_ds(worker_count=2))
  for _ in range(3):
    assert _same(next(in_process), next(workers))
  _assert_resumes(lambda: _smoke_ds(worker_count=2), reference=in_process, skip=3, count=3)


def test_example_workers_are_capped_by_the_cpu_cores(monkeypatch):
  from msa_jax.data import from_config
  monkeypatch.setattr(from_config.os, "cpu_count", lambda: 16)
  assert from_config.example_workers(8, verbose=False) == 8
  assert from_config.example_workers(12, verbose=False) == 8
  monkeypatch.setattr(from_config.os, "cpu_count", lambda: 2)
  assert from_config.example_workers(8, verbose=False) == 0   # 1 usable: in-process
  with pytest.raises(ValueError, match="worker_count"):
    from_config.example_workers(-1)


def _mask(doc_lens_bn, l=8):
  return np.arange(l)[None, None, :] < np.asarray(doc_lens_bn)[..., None]


def test_global_position_gaps_fill_the_span_on_documents_and_the_question_only():
  rng = np.random.default_rng(0)
  gaps = global_position_gaps(_mask([[5, 3, 0, 0], [8, 8, 8, 8], [0, 0, 0, 0]]), 20, rng)
  assert gaps.shape == (3, 5) and gaps.dtype == np.int32 and (gaps >= 0).all()
  assert gaps[0].sum() == 20 - 8                  # the question starts at prefix + span
  assert gaps[0, 2:4].tolist() == [0, 0]          # padding slots get no gap
  assert gaps[1].tolist() == [0] * 5              # 32 tokens: already over the span
  assert gaps[2].tolist() == [0] * 5              # an empty (padding) row


def test_global_position_gaps_are_uniform_spacings():
  """The free positions are cut at sorted uniform points: each of the k + 1 parts has
  mean free / (k + 1), so a document is as likely near the question as far from it."""
  rng = np.random.default_rng(1)
  parts = np.stack([global_position_gaps(_mask([[1, 1, 1]]), 303, rng)[0] for _ in range(4000)])
  np.testing.assert_array_equal(parts.sum(1), 300)
  np.testing.assert_allclose(parts.mean(0), 75.0, rtol=0.05)
  assert parts.min() == 0 and parts.max() > 200


def test_global_position_span_draws_gaps_that_resume_and_fill_the_span():
  assert next(iter(_smoke_ds())).doc_position_gaps is None   # off by default
  expected = _assert_resumes(lambda: _smoke_ds(global_position_span=1000), count=3)
  for batch in expected:
    doc_tokens_b = batch.doc_mask.sum((1, 2))
    rows = doc_tokens_b > 0
    np.testing.assert_array_equal(batch.doc_position_gaps[rows].sum(1), 1000 - doc_tokens_b[rows])
  assert not np.array_equal(expected[0].doc_position_gaps, expected[1].doc_position_gaps)


def test_negative_global_position_span_is_refused():
  with pytest.raises(ValueError, match="global_position_span=-1 must be >= 0"):
    _smoke_ds(global_position_span=-1)


def _alive(pid: int) -> bool:
  """Whether process ``pid`` runs (a zombie waiting for its reaper counts as ended)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_worker_exits_when_its_parent_dies():
  """``exit_with_parent`` (every data worker runs it): a child whose parent is killed
  without closing it ends within a poll, where an orphan would run on."""
  import subprocess
  import sys
  import time
  child = ("from msa_jax.data.pipeline import exit_with_parent; import time; "
           "exit_with_parent(0.1); print('up', flush=True); time.sleep(60)")
  orphan = "import time; print('up', flush=True); time.sleep(60)"
  pids = {}
  for name, code in (("watched", child), ("orphan", orphan)):
    parent = ("import subprocess, sys, os; "
              f"p = subprocess.Popen([sys.executable, '-c', {code!r}], stdout=subprocess.PIPE, "
              "stderr=subprocess.DEVNULL, text=True); p.stdout.readline(); "
              "print(p.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    pids[name] = int(out.stdout.split()[-1])
  try:
    deadline = time.time() + 10
    while _alive(pids["watched"]) and time.time() < deadline:
      time.sleep(0.1)
    assert not _alive(pids["watched"])
    assert _alive(pids["orphan"])      # without the watch, the child outlives its parent
  finally:
    for pid in pids.values():
      try:
        os.kill(pid, 9)
      except ProcessLookupError:
        pass
