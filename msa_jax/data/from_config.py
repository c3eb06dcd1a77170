"""From ``config.data`` to a checkpointable iterator of ``MSABatch`` (training) and eval sets.

The task, its tokenizer, the bucket shapes and the memory curriculum are read
from the config here; the grain machinery itself lives in ``msa_jax.data.pipeline``.

``data.task``:
  ``kv`` / ``multihop``  synthetic key-value retrieval / multi-hop chains (``data.kv``).
  ``niah``               the RULER-style NIAH suite (``data.niah``): all 8 subtasks as a
                         ``TaskMixture`` (``data.niah.subtask = ""``) or one subtask.
  ``jsonl``              real data: per-example rows (``data.jsonl_path``) or a shared
                         corpus (``data.corpus_path``) + query rows (``data.jsonl_path``),
                         tokenised with the local Hugging Face tokenizer ``data.tokenizer_dir``.
Synthetic tasks (kv, multihop, niah) size their memory by ``data.num_docs`` or
``data.memory_tokens`` (and ``data.memory_curriculum``) and scale it for eval;
JSONL memories are what the file says (eval at multiplier 1 only). ``data.facts_curriculum``
(kv, multihop) trains on documents of fewer facts first, with as many documents a memory
as the configured task; evaluation always uses the configured ``data.kv``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import grain

from msa_jax.batch import MSABatch
from msa_jax.data.buckets import (CAP_KEYS, bucket_caps, bucket_levels, buckets_for,
                                  padding_waste_of)
from msa_jax.data.example import Example
from msa_jax.data.pipeline import batch_dataset
from msa_jax.data.synthetic import KVConfig, KVRetrievalTask, TaskMixture

EVAL_SEED_OFFSET = 1_000_003   # eval questions come from another seed than training's
# Training stage k > 0 (a curriculum switch) draws its synthetic examples from seed +
# k × this: every stage's stream starts again at example 0, and example n of one seed has
# the same question, gold id and answer whatever the memory size or facts per document,
# so one seed for every stage replayed the same (key -> id, key -> value) pairs in each.
STAGE_SEED_OFFSET = 7_000_003
TASKS = ("kv", "multihop", "niah", "jsonl")
SYNTHETIC_TASKS = ("kv", "multihop", "niah")
_NIAH_MIXTURE_KEYS = ("subtask", "weights")


def _check_task(data_cfg) -> str:
  if data_cfg.task not in TASKS:
    raise ValueError(f"unknown data.task={data_cfg.task!r}; use one of {TASKS}")
  return data_cfg.task


# --------------------------------------------------------------------------- sources

class ExampleList(Sequence):
  """A finite list of Examples with its tokenizer (the JSONL task).

  Indexable like a list and callable ``index -> Example`` like a synthetic task.
  """

  def __init__(self, examples: Sequence[Example], tokenizer, name: str = "jsonl",
               path: str = ""):
    if not examples:
      raise ValueError(f"no examples in {path or 'the example list'}; the file is empty")
    self.examples, self.tokenizer, self.name, self.path = list(examples), tokenizer, name, path

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index):
    return self.examples[index]

  def __call__(self, index: int) -> Example:
    return self.examples[index]


def _kv_task(data_cfg, seed: int, memory_tokens: int | None,
             facts_per_doc: int | None = None) -> KVRetrievalTask:
  """The kv / multihop task; ``facts_per_doc`` (a ``data.facts_curriculum`` stage) changes
  what each document holds but not how many documents a memory has (those of ``data.kv``'s
  documents at the memory size), so a stage of fewer facts has a smaller memory."""
  kv = dict(data_cfg.kv)
  if data_cfg.task == "multihop" and kv.get("hops", 1) < 2:
    kv["hops"] = 2
  task = KVRetrievalTask(KVConfig(num_docs=max(int(data_cfg.num_docs), kv.get("hops", 1)), **kv),
                         seed=seed)
  if not data_cfg.num_docs:
    budget = int(memory_tokens if memory_tokens is not None else data_cfg.memory_tokens)
    task = task.with_memory_tokens(budget)
  if facts_per_doc is not None and facts_per_doc != task.config.facts_per_doc:
    task = KVRetrievalTask(dataclasses.replace(task.config, facts_per_doc=int(facts_per_doc)),
                           task.tokenizer, seed)
  return task


def _niah_task(data_cfg, seed: int, memory_tokens: int | None) -> TaskMixture:
  """The NIAH suite (all subtasks, or ``data.niah.subtask``) as a ``TaskMixture``."""
  from msa_jax.data.niah import SUBTASKS, NIAHConfig, NIAHTask
  from msa_jax.data.tokenizer import WordTokenizer
  if "niah" not in data_cfg:
    raise ValueError("data.task='niah' needs a data.niah block (see configs/16k_to_100m.py)")
  niah = dict(data_cfg.niah)
  subtask = niah.get("subtask") or ""
  weights = tuple(niah.get("weights") or ()) or None
  sizes = {k: v for k, v in niah.items() if k not in _NIAH_MIXTURE_KEYS}
  if "uuid_groups" in sizes:
    sizes["uuid_groups"] = tuple(sizes["uuid_groups"])
  names = SUBTASKS if not subtask else (subtask,)
  if subtask and subtask not in SUBTASKS:
    raise ValueError(f"data.niah.subtask={subtask!r}; use '' (all 8) or one of {SUBTASKS}")
  if weights is not None and len(weights) != len(names):
    raise ValueError(f"data.niah.weights has {len(weights)} entries for {len(names)} "
                     f"subtasks {names}; give one weight per subtask or ()")
  tok = WordTokenizer(NIAHConfig(**sizes).vocab())
  num_docs = int(data_cfg.num_docs)
  budget = int(memory_tokens if memory_tokens is not None else data_cfg.memory_tokens)
  tasks = []
  for name in names:
    config = NIAHConfig(subtask=name, **sizes)
    gold = config.num_gold
    t = NIAHTask(dataclasses.replace(config, num_docs=max(num_docs, gold)), tok, seed)
    tasks.append(t if num_docs else t.with_memory_tokens(budget))
  return TaskMixture(tasks, weights, seed=seed)


def make_task(data_cfg, seed: int, memory_tokens: int | None = None,
              facts_per_doc: int | None = None):
  """The synthetic task of ``data_cfg`` at a memory size (docs or token budget).

  ``facts_per_doc`` (kv / multihop only) overrides ``data.kv.facts_per_doc`` at the same
  number of documents (a ``data.facts_curriculum`` stage). For ``data.task='jsonl'`` use
  ``make_source`` (a finite ``ExampleList``).
  """
  task = _check_task(data_cfg)
  if task == "jsonl":
    raise ValueError("data.task='jsonl' has no synthetic task; use make_source / "
                     "jsonl_examples")
  if task == "niah":
    return _niah_task(data_cfg, seed, memory_tokens)
  return _kv_task(data_cfg, seed, memory_tokens, facts_per_doc)


_TOKENIZERS: dict[str, Any] = {}
_JSONL: dict[tuple, ExampleList] = {}


def jsonl_tokenizer(data_cfg):
  """The local Hugging Face tokenizer of ``data.tokenizer_dir`` (loaded once)."""
  path = data_cfg.get("tokenizer_dir", "")
  if not path:
    raise ValueError("data.task='jsonl' needs data.tokenizer_dir: a local Hugging Face "
                     "tokenizer directory (tokenizer.json / tokenizer_config.json) with "
                     "the control tokens <id-end> and <end-of-retrieval>")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"data.tokenizer_dir={path} does not exist or is not a "
                            "directory; point it at a local Hugging Face tokenizer")
  if path not in _TOKENIZERS:
    from msa_jax.data.tokenizer import HFTokenizer
    _TOKENIZERS[path] = HFTokenizer(path)
  return _TOKENIZERS[path]


def jsonl_examples(data_cfg, path: str) -> ExampleList:
  """Examples of the JSONL file ``path`` (per-example rows, or query rows over
  ``data.corpus_path``), tokenised with ``data.tokenizer_dir``; read once per run."""
  from msa_jax.data.jsonl import read_corpus, read_examples, read_queries
  if not path:
    raise ValueError("data.task='jsonl' needs data.jsonl_path (per-example rows, or query "
                     "rows when data.corpus_path is set)")
  corpus = data_cfg.get("corpus_path", "") or ""
  for p, key in ((path, "jsonl_path"), (corpus, "corpus_path")):
    if p and not os.path.isfile(p):
      raise FileNotFoundError(f"data.{key}: {p} is not a file")
  tok = jsonl_tokenizer(data_cfg)
  stamp = lambda p: (os.path.abspath(p), os.stat(p).st_mtime_ns, os.stat(p).st_size) if p else ()
  cap = int(data_cfg.get("max_doc_len") or 0)
  key = (stamp(path), stamp(corpus), tok.path, cap)   # a rewritten file is read again
  if key not in _JSONL:
    prefix = [tok.specials.bos] if tok.specials.bos is not None else []
    if corpus:
      examples = read_queries(path, read_corpus(corpus, tok, max_doc_len=cap), tok,
                              prefix=prefix)
    else:
      examples = read_examples(path, tok, prefix=prefix, max_doc_len=cap)
    _JSONL[key] = ExampleList(examples, tok, path=path)
  return _JSONL[key]


def make_source(data_cfg, seed: int, memory_tokens: int | None = None,
                facts_per_doc: int | None = None):
  """The training source: a synthetic task (``index -> Example``) or an ``ExampleList``."""
  if _check_task(data_cfg) == "jsonl":
    return jsonl_examples(data_cfg, data_cfg.jsonl_path)
  return make_task(data_cfg, seed, memory_tokens, facts_per_doc)


def tokenizer_of(data_cfg):
  """The task's tokenizer (without generating data for JSONL)."""
  if _check_task(data_cfg) == "jsonl":
    return jsonl_tokenizer(data_cfg)
  return make_task(data_cfg, 0).tokenizer


def prefix_of(data_cfg) -> list[int]:
  """The shared prefix tokens the task puts before every memory (e.g. ``[<bos>]``)."""
  if _check_task(data_cfg) == "jsonl":
    bos = jsonl_tokenizer(data_cfg).specials.bos
    return [bos] if bos is not None else []
  return list(make_task(data_cfg, 0)(0).prefix)


def load_run_config(workdir: str):
  """The training config a run saved (``WORKDIR/config.json``) as a ConfigDict: its
  ``data`` block gives ``tokenizer_of`` / ``prefix_of`` / ``vocab_size_of``."""
  import json

  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: pass a training run's directory "
                            "(python -m msa_jax.train --workdir=...)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def vocab_size_of(data_cfg) -> int:
  """Tokens the task's tokenizer can emit (the model's vocab must be at least this)."""
  return int(tokenizer_of(data_cfg).vocab_size)


def validate_data_config(cfg) -> None:
  """Checks of ``cfg.data`` against ``cfg.eval`` that should fail before training starts.

  For JSONL data this reads (and caches) the training and eval files, so a malformed
  row or a document over ``data.max_doc_len`` is reported with ``file:line`` up front.
  """
  task = _check_task(cfg.data)
  _check_fact_slots(cfg)
  facts_stages(cfg.data)
  for key in CAP_KEYS:
    value = cfg.data.get(key) or 0
    if value < 0:
      raise ValueError(f"data.{key} must be >= 0 (0: no cap), got {value}")
  if task == "jsonl":
    jsonl_tokenizer(cfg.data)
    for p in (cfg.data.jsonl_path, cfg.data.get("eval_jsonl_path", "")):
      if p and not os.path.isfile(p):
        raise FileNotFoundError(f"JSONL file {p} not found")
    if not cfg.data.jsonl_path:
      raise ValueError("data.task='jsonl' needs data.jsonl_path")
    evaluating = bool(cfg.get("eval") and cfg.eval.get("at_end", True))
    if evaluating:
      _check_jsonl_multipliers(cfg.eval.memory_multipliers)
    jsonl_examples(cfg.data, cfg.data.jsonl_path)
    if evaluating and cfg.data.get("eval_jsonl_path"):
      jsonl_examples(cfg.data, cfg.data.eval_jsonl_path)


def _check_fact_slots(cfg) -> None:
  """``data.kv.fact_slot_len`` must tile the model's chunks (one slot per chunk, or whole
  slots per chunk), else facts straddle chunks as if they were packed."""
  slot = int(cfg.data.get("kv", {}).get("fact_slot_len", 0) or 0)
  p = int(cfg.get("model", {}).get("pooling_chunk_size", 0) or 0)
  if cfg.data.task in ("kv", "multihop") and slot and p and slot % p and p % slot:
    raise ValueError(
        f"data.kv.fact_slot_len={slot} does not tile model.pooling_chunk_size={p}: facts "
        f"would straddle chunks; set data.kv.fact_slot_len={p} (one fact per chunk) or 0")


def _check_stage_order(field: str, pairs, value_name: str, fix: str) -> None:
  """A curriculum's ``(first batch, value)`` pairs: two items each, the first at batch 0,
  batches strictly increasing; else a ``ValueError`` naming ``data.<field>`` and ``fix``."""
  if any(len(p) != 2 for p in pairs):
    raise ValueError(f"data.{field}={pairs} must hold (batch, {value_name}) pairs; {fix}")
  starts = [int(b) for b, _ in pairs]
  if starts[0] != 0 or any(b >= c for b, c in zip(starts, starts[1:])):
    raise ValueError(f"data.{field}={pairs}: batches {starts} must start at 0 and increase; "
                     f"{fix}")


def facts_stages(data_cfg) -> list[tuple[int, int | None]]:
  """``data.facts_curriculum`` checked: ``[(first batch, facts per document)]``, or
  ``[(0, None)]`` (the configured ``data.kv``) when it is empty or the task has no facts.

  The pairs must start at batch 0, at strictly increasing batches, and end with
  ``data.kv.facts_per_doc`` (what evaluation uses)."""
  pairs = [tuple(int(x) for x in p) for p in (data_cfg.get("facts_curriculum") or ())]
  if not pairs or data_cfg.task not in ("kv", "multihop"):
    return [(0, None)]
  fix = ("set data.facts_curriculum to (batch, facts) pairs such as '((0,1),(300,6))' "
         "(first at batch 0, batches increasing, the last facts = data.kv.facts_per_doc), "
         "or () for none")
  _check_stage_order("facts_curriculum", pairs, "facts", fix)
  if any(f < 1 for _, f in pairs) or pairs[-1][1] != int(data_cfg.kv.facts_per_doc):
    raise ValueError(f"data.facts_curriculum={pairs}: facts must be >= 1 and the last must "
                     f"be data.kv.facts_per_doc={int(data_cfg.kv.facts_per_doc)}; {fix}")
  return [(b, f) for b, f in pairs]


def batch_stages(data_cfg, batch_size: int) -> list[tuple[int, int]]:
  """``data.batch_curriculum`` checked: ``[(first batch, global batch size)]``, or
  ``[(0, batch_size)]`` when it is empty. A size of None means ``batch_size``.

  The pairs must start at batch 0, at strictly increasing batches, and end with None or
  ``batch_size`` (the configured batch, what the rest of the run uses). A stage of small
  memories and a large batch gives the reader many more answers a step for the same
  tokens (the reading task's 16K-token memories carry 8 answers a batch of 16)."""
  raw = [tuple(p) for p in (data_cfg.get("batch_curriculum") or ())]
  if not raw:
    return [(0, int(batch_size))]
  fix = ("set data.batch_curriculum to (batch, batch size) pairs such as "
         "'((0,256),(400,None))' (first at batch 0, batches increasing, the last size None "
         "or batch_size; None means batch_size), or () for none")
  _check_stage_order("batch_curriculum", raw, "batch size", fix)
  pairs = [(int(b), int(batch_size) if n is None else int(n)) for b, n in raw]
  if any(n < 1 for _, n in pairs) or pairs[-1][1] != int(batch_size):
    raise ValueError(f"data.batch_curriculum={raw}: sizes must be >= 1 and the last must be "
                     f"None or batch_size={int(batch_size)}; {fix}")
  return pairs


def training_stages(data_cfg, batch_size: int = 0
                    ) -> list[tuple[int, int | None, int | None, int]]:
  """``[(first batch, memory tokens, facts per document, global batch size)]``: a stage
  starts wherever ``data.memory_curriculum``, ``data.facts_curriculum`` or
  ``data.batch_curriculum`` starts one (None: the configured value; batch size 0 when
  ``batch_size`` is not given and there is no batch curriculum)."""
  memory = list(data_cfg.memory_curriculum) or [(0, None)]
  if data_cfg.num_docs or _check_task(data_cfg) == "jsonl":
    memory = [(0, None)]
  facts = facts_stages(data_cfg)
  batches = batch_stages(data_cfg, batch_size)
  at = lambda pairs, b: [v for s, v in pairs if s <= b][-1]
  starts = sorted({int(s) for s, _ in memory} | {s for s, _ in facts} | {s for s, _ in batches})
  return [(b, at(memory, b), at(facts, b), at(batches, b)) for b in starts]


def _check_jsonl_multipliers(multipliers) -> None:
  bad = [int(m) for m in multipliers if int(m) != 1]
  if bad:
    raise ValueError(
        f"eval.memory_multipliers {tuple(multipliers)} ask for {bad}x memory, but "
        "data.task='jsonl' evaluates the memories of its file as they are; set "
        "--config.eval.memory_multipliers='(1,)' (memory scaling needs a synthetic task)")


# --------------------------------------------------------------------------- training

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

  @property
  def stages(self) -> list[tuple[int, grain.IterDataset]]:
    """``[(first batch, dataset)]`` of each training stage (``benchmarks.data_pipeline``
    times each one)."""
    return list(self._stages)

  def get_state(self) -> dict[str, Any]:
    return {"stage": self._stage, "served": self._served, "inner": self._inner.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._stage, self._served = int(state["stage"]), int(state["served"])
    self._inner = iter(self._stages[self._stage][1])
    self._inner.set_state(state["inner"])


def example_workers(requested: int, verbose: bool = True) -> int:
  """The example-generating worker processes to use for ``data.worker_count``: as asked,
  but at most half the CPU cores (the rest feed the step), and none when that leaves
  fewer than 2 (a worker process costs more than it gives on a small machine)."""
  if requested < 0:
    raise ValueError(f"data.worker_count must be >= 0, got {requested}")
  cores = os.cpu_count() or 1
  usable = min(requested, cores // 2)
  usable = usable if usable >= 2 else 0
  if verbose and requested and usable != requested:
    print(f"data: {requested} example workers asked (data.worker_count), {usable} used on "
          f"{cores} CPU cores", flush=True)
  return usable


def stage_seed(seed: int, stage: int) -> int:
  """The synthetic task's seed in training stage ``stage`` (0: ``seed`` itself): fresh
  examples after each curriculum switch instead of the first stage's again (WORKSPACE.md,
  sessions 17-18: the replay did not make the recipe's phase changes a draw)."""
  return seed + stage * STAGE_SEED_OFFSET


def make_train_iterator(data_cfg, *, seed: int, batch_size: int, chunk_size: int,
                        process_index: int = 0, process_count: int = 1,
                        verbose: bool = True) -> CurriculumIterator:
  """The training stream: interleave samples of the task's examples, bucketed.

  Synthetic tasks stream fresh examples (with the memory curriculum; each stage from its
  own seed, ``stage_seed``); JSONL
  repeats its example list forever, reshuffled by ``seed`` every epoch. The
  chosen buckets and their padding waste (on a sample) are printed once.
  """
  task_name = _check_task(data_cfg)
  if task_name == "jsonl" and len(data_cfg.memory_curriculum) > 1 and verbose:
    print("data: memory_curriculum is ignored for data.task='jsonl' (memories come from "
          "the file)", flush=True)
  if task_name not in ("kv", "multihop") and data_cfg.get("facts_curriculum") and verbose:
    print(f"data: facts_curriculum is ignored for data.task={task_name!r} (its documents "
          "have no facts)", flush=True)
  workers = example_workers(int(data_cfg.get("worker_count", 0) or 0), verbose)
  stages = []
  for number, (start, memory_tokens, facts_per_doc, stage_batch) in enumerate(
      training_stages(data_cfg, batch_size)):
    if stage_batch % process_count:
      raise ValueError(f"batch size {stage_batch} (from batch {start}) must divide evenly over "
                       f"{process_count} processes")
    local_batch = stage_batch // process_count
    source = make_source(data_cfg, stage_seed(seed, number), memory_tokens, facts_per_doc)
    buckets = buckets_for(source, local_batch, chunk_size,
                          memory_interleave=data_cfg.interleave, caps=bucket_caps(data_cfg),
                          **bucket_levels(data_cfg))
    finite = isinstance(source, Sequence)
    ds = batch_dataset(source, buckets=buckets, specials=source.tokenizer.specials,
                       seed=seed + int(start), num_examples=len(source) if finite else None,
                       num_epochs=None, memory_interleave=data_cfg.interleave,
                       process_index=process_index, process_count=process_count,
                       answer_positives=bool(data_cfg.get("answer_positives", True)),
                       worker_count=workers,
                       global_position_span=int(data_cfg.get("global_position_span", 0)))
    if verbose:
      waste = padding_waste_of(source, buckets, memory_interleave=data_cfg.interleave,
                               seed=seed)
      size = f"{len(source)} examples" if finite else "synthetic"
      facts = f", {facts_per_doc} fact(s) a document" if facts_per_doc is not None else ""
      print(f"data: task {task_name} ({size}{facts}), batch {stage_batch}, stage from batch "
            f"{int(start)}: "
            f"{len(buckets)} bucket(s) {[tuple(dataclasses.astuple(b)) for b in buckets]} "
            f"(batch, prefix, docs, doc_len, active); padding waste on a sample: "
            f"total {waste['total']:.1%}, doc tokens {waste['doc_tokens']:.1%}, "
            f"doc slots {waste['doc_slots']:.1%}, active {waste['active']:.1%}", flush=True)
    stages.append((int(start), ds))
  return CurriculumIterator(stages)


# --------------------------------------------------------------------------- evaluation

def _scaled(task, multiplier: int):
  if multiplier == 1:
    return task
  if isinstance(task, TaskMixture):
    return task.with_memory_factor(multiplier)
  return task.with_num_docs(task.config.num_docs * multiplier)


def eval_task(data_cfg, seed: int, multiplier: int):
  """The eval task at ``multiplier``× the training memory (same questions at every size).

  Synthetic tasks: eval questions come from ``seed + EVAL_SEED_OFFSET``, memories grow
  by adding distractors. JSONL: the examples of ``data.eval_jsonl_path`` (or, with a
  warning, the training file) at multiplier 1 only; an ``ExampleList``.
  """
  if _check_task(data_cfg) == "jsonl":
    _check_jsonl_multipliers([multiplier])
    path = data_cfg.get("eval_jsonl_path", "") or ""
    if not path:
      print(f"WARNING: data.eval_jsonl_path is empty; evaluating on the training file "
            f"{data_cfg.jsonl_path} (set data.eval_jsonl_path to held-out rows)", flush=True)
      path = data_cfg.jsonl_path
    return jsonl_examples(data_cfg, path)
  return _scaled(make_task(data_cfg, seed + EVAL_SEED_OFFSET), int(multiplier))
