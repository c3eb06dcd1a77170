"""grain input pipeline: Examples -> (shuffle, shard) -> interleave samples -> bucketed MSABatch.

    ds = batch_dataset(smoke_kv_task(seed=0), buckets=[BucketShapes(32, 1, 32, 8, 16)],
                       seed=0, specials=task.tokenizer.specials)
    it = iter(ds)                      # grain DatasetIterator
    batch = next(it)                   # MSABatch of numpy arrays
    state = it.get_state()             # JSON-serialisable dict
    it2 = iter(ds); it2.set_state(state)   # continues with exactly the same batches

Checkpoint with orbax (grain 0.2.18 ships the handler and args)::

    import orbax.checkpoint as ocp, grain
    ckptr = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    ckptr.save(path, args=grain.checkpoint.CheckpointSave(it))
    ckptr.restore(path, args=grain.checkpoint.CheckpointRestore(it))  # sets it's state
    # or, next to model state in a CheckpointManager:
    # mngr.save(step, args=ocp.args.Composite(
    #     state=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it)))

The handler writes ``process_<i>-of-<n>.json`` per process, which matches the
per-process sharding below (``process_index``/``process_count``, e.g.
``jax.process_index()``/``jax.process_count()``).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import grain
import numpy as np

from msa_jax.batch import MSABatch
from msa_jax.data import interleave
from msa_jax.data.collate import (BucketShapes, choose_bucket, collate,
                                   global_position_gaps, size_key)
from msa_jax.data.example import Example
from msa_jax.data.tokenizer import SpecialTokens

ExampleSource = Callable[[int], Example] | Sequence[Example]


def example_dataset(source: ExampleSource, *, seed: int, num_examples: int | None = None,
                    num_epochs: int | None = 1, shuffle: bool = True,
                    process_index: int = 0, process_count: int = 1,
                    shard_options: grain.sharding.ShardOptions | None = None
                    ) -> grain.MapDataset:
  """A ``MapDataset`` of Examples, shuffled by ``seed`` and sharded by process.

  ``source`` is a sequence of Examples (e.g. from ``jsonl``) or a synthetic task
  ``index -> Example``. A task with ``num_examples=None`` is an infinite stream
  (index 0, 1, 2, ...; every example is fresh and already random by its own
  seed, so no shuffle is applied). Otherwise the ``num_examples`` (or
  ``len(source)``) indices are shuffled by ``seed``, differently each epoch,
  repeated ``num_epochs`` times (None: forever). Process p of n takes every
  n-th element starting at p (disjoint shards). ``shard_options`` (grain's, e.g.
  ``grain.sharding.ShardByJaxProcess(drop_remainder=True)``) replaces
  ``process_index``/``process_count``; its ``drop_remainder`` cuts a finite stream to a
  multiple of the shard count so every process reads as many examples.
  """
  if shard_options is None and not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  shard = shard_options or grain.sharding.ShardOptions(process_index, process_count)
  if callable(source) and num_examples is None:
    ds = grain.MapDataset.range(sys.maxsize)
  else:
    n = len(source) if num_examples is None else num_examples
    if n == 0:
      raise ValueError("empty example source; give at least one example")
    ds = grain.MapDataset.range(n)
    if shuffle:
      ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs)
  if shard.drop_remainder:
    ds = ds[:len(ds) - len(ds) % shard.shard_count]
  ds = ds[shard.shard_index::shard.shard_count]
  get = source if callable(source) else source.__getitem__
  return ds.map(get)


class _ExpandInterleave(grain.experimental.FlatMapTransform):
  """Example -> its Memory Interleave samples (or itself when ``enabled`` is False)."""

  def __init__(self, specials: SpecialTokens, enabled: bool, max_fan_out: int,
               answer_positives: bool = True):
    self.specials, self.enabled, self.max_fan_out = specials, enabled, max_fan_out
    self.answer_positives = answer_positives

  def flat_map(self, element: Example) -> list[Example]:
    if not self.enabled:
      return [element]
    return interleave.expand(element, self.specials, self.answer_positives)


def plan_batches(samples: Sequence[Example], buckets: Sequence[BucketShapes],
                 rng: np.random.Generator) -> list[tuple[int, list[Example]]]:
  """Group samples of similar size into batches: ``[(bucket index, samples)]``.

  Samples are sorted by (smallest fitting bucket, size) (with a single bucket: kept in
  stream order) and cut greedily into batches; each batch takes the smallest bucket that fits all its members and
  that bucket's batch size. Only the last batch can be short. The batch order
  is then shuffled by ``rng`` (so sizes are not monotonic in time).
  """
  own = [choose_bucket(s, buckets) for s in samples]
  if len(buckets) == 1:
    # One shape: sorting cannot save padding, and would batch like samples together
    # (e.g. all answer samples of a window apart from all retrieval samples).
    order = list(range(len(samples)))
  else:
    order = sorted(range(len(samples)),
                   key=lambda i: (buckets[own[i]].slots_per_example, size_key(samples[i])))
  ordered = [samples[i] for i in order]
  out, i = [], 0
  while i < len(ordered):
    size = buckets[own[order[i]]].batch
    while True:
      group = ordered[i:i + size]
      b = _bucket_for_group(group, buckets)
      if buckets[b].batch >= len(group):
        break
      size = buckets[b].batch
    out.append((b, group))
    i += len(group)
  perm = rng.permutation(len(out))
  return [out[k] for k in perm]


def _bucket_for_group(group: Sequence[Example], buckets: Sequence[BucketShapes]) -> int:
  fitting = [n for n, b in enumerate(buckets) if all(b.fits(e) for e in group)]
  if not fitting:
    raise ValueError("no single bucket fits this group of samples although each "
                     "fits one; add a bucket covering the largest of every field")
  return min(fitting, key=lambda n: buckets[n].slots_per_example)


class _BucketBatchIterator(grain.DatasetIterator):
  """Reads a window of samples, plans bucketed batches, emits them collated.

  State: the parent's state at the start of the current window, the window
  number and how many of its batches were emitted. Restoring re-reads the
  window (deterministic) and skips the emitted batches.
  """

  def __init__(self, parent, buckets, window, seed, drop_remainder, global_position_span=0):
    super().__init__(parent)
    self._buckets, self._window_size = list(buckets), window
    self._seed, self._drop_remainder = seed, drop_remainder
    self._global_position_span = global_position_span
    self._window = -1
    self._window_start = self._parent.get_state()
    self._planned: list[tuple[int, list[Example]]] = []
    self._emitted = 0

  def _read_window(self) -> None:
    self._window_start = self._parent.get_state()
    samples = []
    for _ in range(self._window_size):
      try:
        samples.append(next(self._parent))
      except StopIteration:
        break
    rng = np.random.default_rng([self._seed, self._window])
    planned = plan_batches(samples, self._buckets, rng)
    if self._drop_remainder:
      planned = [(b, g) for b, g in planned if len(g) == self._buckets[b].batch]
    self._planned, self._emitted = planned, 0

  def __next__(self) -> MSABatch:
    while self._emitted >= len(self._planned):
      self._window += 1
      self._read_window()
      if not self._planned:
        self._window -= 1  # stay at the end; the next state restores here
        raise StopIteration
    b, group = self._planned[self._emitted]
    self._emitted += 1
    batch = collate(group, self._buckets[b])
    if self._global_position_span > 0:
      # Seeded by the batch's place in the stream, so a restored iterator draws the same.
      rng = np.random.default_rng([self._seed, self._window, self._emitted, 0x9A95])
      batch = batch.replace(doc_position_gaps=global_position_gaps(
          batch.doc_mask, self._global_position_span, rng))
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._window_start, "window": self._window,
            "emitted": self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._window = state["window"]
    self._planned, self._emitted = [], 0
    if self._window >= 0:
      self._read_window()
      self._emitted = state["emitted"]


class BucketBatchIterDataset(grain.IterDataset):
  """Length-aware bucketing + collation of a stream of Examples into MSABatch."""

  def __init__(self, parent: grain.IterDataset, buckets: Sequence[BucketShapes], *,
               window_batches: int = 16, seed: int = 0, drop_remainder: bool = False,
               global_position_span: int = 0):
    super().__init__(parent)
    if not buckets:
      raise ValueError("give at least one BucketShapes")
    if global_position_span < 0:
      raise ValueError(f"global_position_span={global_position_span} must be >= 0 (0: off)")
    self._buckets = list(buckets)
    self._window = window_batches * max(b.batch for b in buckets)
    self._seed, self._drop_remainder = seed, drop_remainder
    self._global_position_span = int(global_position_span)

  def __iter__(self) -> _BucketBatchIterator:
    return _BucketBatchIterator(self._parent.__iter__(), self._buckets,
                                self._window, self._seed, self._drop_remainder,
                                self._global_position_span)

  def __str__(self) -> str:
    return f"BucketBatchIterDataset(buckets={self._buckets}, window={self._window})"


def batch_dataset(source: ExampleSource, *, buckets: Sequence[BucketShapes],
                  specials: SpecialTokens, seed: int = 0,
                  num_examples: int | None = None, num_epochs: int | None = 1,
                  shuffle: bool = True, memory_interleave: bool = True,
                  window_batches: int = 16, drop_remainder: bool = False,
                  process_index: int = 0, process_count: int = 1,
                  shard_options: grain.sharding.ShardOptions | None = None,
                  read_options: grain.ReadOptions | None = None,
                  prefetch_batches: int = 0,
                  answer_positives: bool = True,
                  worker_count: int = 0,
                  global_position_span: int = 0) -> grain.IterDataset:
  """The full pipeline: an ``IterDataset`` of ``MSABatch`` (numpy arrays).

  Args:
    source: Examples (sequence) or a synthetic task ``index -> Example``.
    buckets: candidate shapes; each batch uses the smallest that fits its
      samples (an unfittable sample raises; nothing is truncated).
    specials: control token ids (``tokenizer.specials``) for interleave targets.
    seed: shuffling and batch-order seed.
    num_examples, num_epochs, shuffle, process_index, process_count, shard_options:
      see ``example_dataset``.
    memory_interleave: expand each example into its interleave samples
      (SPEC §4); False trains the direct target (ablation).
    window_batches: samples are grouped by size within windows of this many
      (largest) batches; bigger windows waste less padding.
    drop_remainder: drop the short last batch of a finite stream instead of
      padding it with empty rows (rows whose masks are all False).
    read_options: grain threading for example generation (default 2 threads,
      small buffer: the CPU smoke run shares 2 cores with training).
    prefetch_batches: >0 prepares that many batches in a background thread.
    answer_positives: False gives the answer samples no routing positives
      (``interleave.expand``).
    worker_count: > 0 generates examples in that many worker processes (grain's
      ``mp_prefetch``; worker w makes examples w, w + n, ..., merged back in order, so the
      batches and the checkpointed state are those of ``worker_count=0``). A synthetic
      task's examples are pure Python (~0.8 ms each for the tiny recipe's 8-document
      memories), which bounds a small model's step on a GPU.
    global_position_span: > 0 gives each batch random ``doc_position_gaps`` that number
      a shorter memory as if it held this many tokens (global RoPE; ``collate.
      global_position_gaps``). 0: none.
  """
  examples = example_dataset(source, seed=seed, num_examples=num_examples,
                             num_epochs=num_epochs, shuffle=shuffle,
                             process_index=process_index, process_count=process_count,
                             shard_options=shard_options)
  read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
  ds = examples.to_iter_dataset(read_options)
  if worker_count > 0:
    _absl_flags_for_grain()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=64),
                        worker_init_fn=_workers_ignore_sigterm)
  ds = grain.experimental.FlatMapIterDataset(
      ds, _ExpandInterleave(specials, memory_interleave, max_fan_out=64,
                            answer_positives=answer_positives))
  ds = BucketBatchIterDataset(ds, buckets, window_batches=window_batches, seed=seed,
                              drop_remainder=drop_remainder,
                              global_position_span=global_position_span)
  if prefetch_batches > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=prefetch_batches)
  return ds


def _workers_ignore_sigterm(worker_index: int, worker_count: int) -> None:
  """Data workers leave SIGTERM to the trainer, and exit when it is gone.

  ``timeout``, SLURM and Kubernetes signal a job's whole process group; a worker that died
  of it made the trainer's next batch fail before its SIGTERM save (H200, 2026-12-02:
  "Worker process was terminated unexpectedly with exit code -15", no checkpoint). Grain
  stops its workers itself when the iterator closes (a stop event, then SIGKILL); when
  the parent dies without closing it (SIGKILL, or a plain process killed by SIGTERM) the
  workers would live on as orphans, holding their memory and any pipe of the job's output
  (H200, 2026-12-04: a ``timeout ... | tee`` that never ended), so each also watches its
  parent (``exit_with_parent``)."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  exit_with_parent()


def exit_with_parent(poll_s: float = 1.0) -> threading.Thread:
  """Starts a daemon thread that ends this process (``os._exit(1)``) within ``poll_s``
  seconds of its parent's death (its parent pid changes when it is re-parented)."""
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(poll_s)
    os._exit(1)

  thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
  thread.start()
  return thread


def _absl_flags_for_grain() -> None:
  """grain's worker processes read absl flags (their defaults are enough): outside an absl
  app (tests, notebooks) the flags are unparsed and grain raises; mark them parsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def eval_examples(task: Callable[[int], Example], num_examples: int, *,
                  memory_factor: int = 1, base_num_docs: int | None = None) -> list[Example]:
  """The first ``num_examples`` examples of ``task`` at ``memory_factor`` x memory.

  ``task`` needs ``with_num_docs`` and ``config.num_docs`` (all synthetic tasks
  have them). For a given (seed, index) the question, answer and gold documents
  are the same at every factor; only distractors are added.
  """
  n = (base_num_docs or task.config.num_docs) * memory_factor
  scaled = task.with_num_docs(n)
  return [scaled(i) for i in range(num_examples)]
