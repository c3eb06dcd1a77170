"""From ``config.data`` to a checkpointable iterator of ``MSABatch`` (training) and eval sets.

The task (synthetic or JSONL), its tokenizer, the bucket shapes and the memory
curriculum are read from the config here; the grain machinery itself lives in
``msa_jax.data.pipeline``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from msa_jax.batch import MSABatch
from msa_jax.data import interleave
from msa_jax.data.collate import BucketShapes
from msa_jax.data.pipeline import batch_dataset
from msa_jax.data.synthetic import KVConfig, KVRetrievalTask

EVAL_SEED_OFFSET = 1_000_003   # eval questions come from another seed than training's


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def make_task(data_cfg, seed: int, memory_tokens: int | None = None):
  """The synthetic task of ``data_cfg`` at a memory size (docs or token budget)."""
  if data_cfg.task not in ("kv", "multihop"):
    raise ValueError(
        f"data.task={data_cfg.task!r} is not wired into training yet; use 'kv' or 'multihop' "
        "(the NIAH suite and JSONL corpora are available in msa_jax.data for evaluation)")
  kv = dict(data_cfg.kv)
  if data_cfg.task == "multihop" and kv.get("hops", 1) < 2:
    kv["hops"] = 2
  task = KVRetrievalTask(KVConfig(num_docs=max(int(data_cfg.num_docs), kv.get("hops", 1)), **kv),
                         seed=seed)
  if data_cfg.num_docs:
    return task
  budget = int(memory_tokens if memory_tokens is not None else data_cfg.memory_tokens)
  return task.with_memory_tokens(budget)


def vocab_size_of(data_cfg) -> int:
  """Tokens the task's tokenizer can emit (the model's vocab must be at least this)."""
  return make_task(data_cfg, 0).tokenizer.vocab_size


def buckets_for(task, batch_size: int, chunk_size: int, probe: int = 64) -> list[BucketShapes]:
  """Bucket shapes that fit every interleave sample of ``task``, with little padding.

  The memory shape is the largest seen (rounded to whole chunks); active lengths
  get one bucket per multiple of 8 that occurs, so short id-generation samples
  don't pay for the long answer samples.
  """
  specials = task.tokenizer.specials
  samples = [s for i in range(probe) for s in interleave.expand(task(i), specials)]
  prefix = max(len(s.prefix) for s in samples)
  docs = max(len(s.docs) for s in samples)
  doc_len = _round_up(max(s.max_doc_length for s in samples), chunk_size)
  actives = sorted({_round_up(s.active_length, 8) for s in samples})
  actives[-1] += 8   # slack for longer answers than the probe saw
  return [BucketShapes(batch_size, max(prefix, 1), docs, doc_len, m) for m in actives]


class CurriculumIterator(grain.DatasetIterator):
  """Switches to the next memory size at configured batch counts (the SFT curriculum).

  State = (stage, batches served, inner iterator state): resumes exactly.
  """

  def __init__(self, stages: Sequence[tuple[int, grain.IterDataset]]):
    super().__init__()
    self._stages = list(stages)
    self._stage = 0
    self._served = 0
    self._inner = iter(self._stages[0][1])

  def _stage_for(self, served: int) -> int:
    return max(i for i, (start, _) in enumerate(self._stages) if start <= served)

  def __next__(self) -> MSABatch:
    stage = self._stage_for(self._served)
    if stage != self._stage:
      self._stage, self._inner = stage, iter(self._stages[stage][1])
    self._served += 1
    return next(self._inner)

  def get_state(self) -> dict[str, Any]:
    return {"stage": self._stage, "served": self._served, "inner": self._inner.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._stage, self._served = int(state["stage"]), int(state["served"])
    self._inner = iter(self._stages[self._stage][1])
    self._inner.set_state(state["inner"])


def make_train_iterator(data_cfg, *, seed: int, batch_size: int, chunk_size: int,
                        process_index: int = 0, process_count: int = 1) -> CurriculumIterator:
  """The training stream: interleave samples of fresh synthetic examples, bucketed."""
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must divide evenly over {process_count} processes")
  local_batch = batch_size // process_count
  curriculum = list(data_cfg.memory_curriculum) or [(0, None)]
  if data_cfg.num_docs:
    curriculum = [(0, None)]
  stages = []
  for start, memory_tokens in curriculum:
    task = make_task(data_cfg, seed, memory_tokens)
    ds = batch_dataset(task, buckets=buckets_for(task, local_batch, chunk_size),
                       specials=task.tokenizer.specials, seed=seed + int(start),
                       num_examples=None, memory_interleave=data_cfg.interleave,
                       process_index=process_index, process_count=process_count)
    stages.append((int(start), ds))
  return CurriculumIterator(stages)


def eval_task(data_cfg, seed: int, multiplier: int):
  """The eval task at ``multiplier``× the training memory (same questions at every size)."""
  base = make_task(data_cfg, seed + EVAL_SEED_OFFSET)
  return base.with_num_docs(base.config.num_docs * int(multiplier))
