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
import numpy as np

from msa_jax.batch import MSABatch
from msa_jax.data import interleave
from msa_jax.data.collate import BucketShapes, WasteMeter, collate
from msa_jax.data.example import Example, answer_target, id_target
from msa_jax.data.pipeline import batch_dataset, plan_batches
from msa_jax.data.synthetic import KVConfig, KVRetrievalTask, TaskMixture

EVAL_SEED_OFFSET = 1_000_003   # eval questions come from another seed than training's
TASKS = ("kv", "multihop", "niah", "jsonl")
SYNTHETIC_TASKS = ("kv", "multihop", "niah")
_NIAH_MIXTURE_KEYS = ("subtask", "weights")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


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


CAP_KEYS = ("max_docs", "max_doc_len", "max_active")


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
  if any(len(p) != 2 for p in pairs):
    raise ValueError(f"data.facts_curriculum={pairs} must hold (batch, facts) pairs; {fix}")
  starts = [b for b, _ in pairs]
  if starts[0] != 0 or any(b >= c for b, c in zip(starts, starts[1:])):
    raise ValueError(f"data.facts_curriculum={pairs}: batches {starts} must start at 0 "
                     f"and increase; {fix}")
  if any(f < 1 for _, f in pairs) or pairs[-1][1] != int(data_cfg.kv.facts_per_doc):
    raise ValueError(f"data.facts_curriculum={pairs}: facts must be >= 1 and the last must "
                     f"be data.kv.facts_per_doc={int(data_cfg.kv.facts_per_doc)}; {fix}")
  return [(b, f) for b, f in pairs]


def training_stages(data_cfg) -> list[tuple[int, int | None, int | None]]:
  """``[(first batch, memory tokens, facts per document)]``: a stage starts wherever
  ``data.memory_curriculum`` or ``data.facts_curriculum`` starts one (None: the
  configured value)."""
  memory = list(data_cfg.memory_curriculum) or [(0, None)]
  if data_cfg.num_docs or _check_task(data_cfg) == "jsonl":
    memory = [(0, None)]
  facts = facts_stages(data_cfg)
  at = lambda pairs, b: [v for s, v in pairs if s <= b][-1]
  starts = sorted({int(s) for s, _ in memory} | {s for s, _ in facts})
  return [(b, at(memory, b), at(facts, b)) for b in starts]


def _check_jsonl_multipliers(multipliers) -> None:
  bad = [int(m) for m in multipliers if int(m) != 1]
  if bad:
    raise ValueError(
        f"eval.memory_multipliers {tuple(multipliers)} ask for {bad}x memory, but "
        "data.task='jsonl' evaluates the memories of its file as they are; set "
        "--config.eval.memory_multipliers='(1,)' (memory scaling needs a synthetic task)")


# --------------------------------------------------------------------------- buckets

def _sample_sizes(ex: Example, specials, memory_interleave: bool, doc_len_of) -> list[tuple]:
  """(prefix, docs, max doc length, active) of each sample of ``ex``, without expanding it
  (cheap for shared-corpus memories; ``doc_len_of`` memoises the doc scan)."""
  p, n, l = len(ex.prefix), len(ex.docs), doc_len_of(ex)
  if not memory_interleave:
    return [(p, n, l, ex.active_length)]
  # The same targets as interleave.expand builds, measured without copying the example.
  by_id = None
  q, out = len(ex.question), []
  for r in ex.rounds or ():
    if by_id is None:
      by_id = {d.doc_id: d for d in ex.docs}
    docs = [by_id[i] for i in r]
    out.append((p, n, l, q + len(id_target(docs, specials.id_end))))
    q += sum(len(d.tokens) for d in docs)   # interleave.inject_documents appends them
  answer = answer_target(ex.answer or (), specials.end_of_retrieval, specials.eos)
  out.append((p, n, l, q + len(answer)))
  return out


def _doc_len_memo():
  memo: dict[int, int] = {}

  def doc_len_of(ex: Example) -> int:
    key = id(ex.docs)
    if key not in memo:
      memo[key] = ex.max_doc_length
    return memo[key]
  return doc_len_of


def _levels(values: Sequence[int], counts: Sequence[int], max_levels: int) -> list[int]:
  """At most ``max_levels`` cut values (the largest always among them) minimising
  sum(count * (level - value)) when each value takes the smallest level >= it (exact DP)."""
  v, c = list(values), list(counts)
  n = len(v)
  if n <= max_levels:
    return v
  # cost[i][j]: values i..j padded to v[j]
  cum_c = np.concatenate([[0], np.cumsum(c)])
  cum_vc = np.concatenate([[0], np.cumsum(np.multiply(v, c))])

  def cost(i, j):
    return v[j] * (cum_c[j + 1] - cum_c[i]) - (cum_vc[j + 1] - cum_vc[i])
  inf = float("inf")
  best = [[inf] * n for _ in range(max_levels + 1)]
  back = [[-1] * n for _ in range(max_levels + 1)]
  for j in range(n):
    best[1][j] = cost(0, j)
  for k in range(2, max_levels + 1):
    for j in range(n):
      for i in range(j):
        val = best[k - 1][i] + cost(i + 1, j)
        if val < best[k][j]:
          best[k][j], back[k][j] = val, i
  k = min(range(1, max_levels + 1), key=lambda k: best[k][n - 1])
  cuts, j = [], n - 1
  while j >= 0 and k >= 1:
    cuts.append(v[j])
    j, k = back[k][j], k - 1
  return sorted(cuts)


def _fit_shapes(sizes: Sequence[tuple], batch_size: int, chunk_size: int, *,
                memory_levels: int, active_levels: int, active_slack: int = 0,
                doc_multiple: int | None = None) -> list[BucketShapes]:
  """Buckets covering every sample size in ``sizes`` with little padding.

  Document slots are rounded up to ``doc_multiple`` tokens (None: whole chunks, P).
  Memory shapes (docs, doc_len): up to ``memory_levels`` nested shapes cut at
  quantiles of the per-sample memory slots, the last one covering everything.
  Active lengths: up to ``active_levels`` multiples of 8 chosen by exact DP.
  Every (memory shape, active level) pair is a bucket; batches use the smallest
  that fits (unused ones are never compiled).
  """
  prefix = max(1, max(s[0] for s in sizes))
  mem = sorted({(s[1], _round_up(s[2], doc_multiple or chunk_size)) for s in sizes},
               key=lambda m: (m[0] * m[1], m))
  shapes = []
  for q in range(1, memory_levels + 1):
    upto = mem[:max(1, int(round(q * len(mem) / memory_levels)))]
    shapes.append((max(m[0] for m in upto), max(m[1] for m in upto)))
  shapes = sorted(set(shapes))
  actives = [_round_up(s[3], 8) for s in sizes]
  vals, counts = np.unique(actives, return_counts=True)
  levels = _levels(vals.tolist(), counts.tolist(), active_levels)
  levels[-1] += active_slack
  return [BucketShapes(batch_size, prefix, n, l, m) for n, l in shapes for m in levels]


def buckets_for(source, batch_size: int, chunk_size: int, probe: int = 64, *,
                memory_interleave: bool = True, memory_levels: int = 3,
                active_levels: int = 4, caps: dict | None = None,
                doc_multiple: int | None = None) -> list[BucketShapes]:
  """Bucket shapes that fit every interleave sample of ``source``, with little padding.

  A synthetic task (endless fresh examples) is probed on ``probe`` examples: one
  memory shape (the largest seen, rounded to whole chunks; synthetic memories are
  uniform) and up to ``active_levels`` active lengths (multiples of 8), the last
  with 8 tokens of slack for longer answers than the probe saw. A finite source
  (``ExampleList``) is fitted over ALL its examples (nothing is ever truncated):
  up to ``memory_levels`` memory shapes × ``active_levels`` active lengths.
  ``caps`` (``max_docs``, ``max_doc_len``, ``max_active``; None = no cap) raise
  naming the largest example when the data exceeds them. ``doc_multiple``: document
  slots are a multiple of it (None: of ``chunk_size``; pooling masks a partial last chunk).
  """
  specials = source.tokenizer.specials
  finite = isinstance(source, Sequence)
  examples = list(source) if finite else [source(i) for i in range(probe)]
  doc_len_of = _doc_len_memo()
  sizes, owner = [], []
  for n, ex in enumerate(examples):
    for s in _sample_sizes(ex, specials, memory_interleave, doc_len_of):
      sizes.append(s)
      owner.append(n)
  _check_caps(sizes, owner, caps or {}, source)
  if finite:
    return _fit_shapes(sizes, batch_size, chunk_size, memory_levels=memory_levels,
                       active_levels=active_levels, doc_multiple=doc_multiple)
  return _fit_shapes(sizes, batch_size, chunk_size, memory_levels=1,
                     active_levels=active_levels, active_slack=8, doc_multiple=doc_multiple)


def _check_caps(sizes, owner, caps: dict, source) -> None:
  where = getattr(source, "path", "") or getattr(source, "name", "task")
  for field, col in (("max_docs", 1), ("max_doc_len", 2), ("max_active", 3)):
    cap = caps.get(field)
    if not cap:
      continue
    i = max(range(len(sizes)), key=lambda k: sizes[k][col])
    if sizes[i][col] > cap:
      what = ("documents", "tokens in its longest document",
              "active tokens (question + injected documents + target)")[col - 1]
      raise ValueError(
          f"example {owner[i]} of {where} has {sizes[i][col]} {what}, over "
          f"data.{field}={cap}; raise the cap or drop/shorten that example "
          "(examples are never truncated)")


def padding_waste_of(source, buckets: Sequence[BucketShapes], *, memory_interleave: bool = True,
                     num_examples: int = 64, seed: int = 0) -> dict[str, float]:
  """Padding waste (``WasteMeter.summary``) of ``buckets`` on a sample of ``source``,
  batched as the pipeline batches it (one window)."""
  specials = source.tokenizer.specials
  if isinstance(source, Sequence):
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(source))[:num_examples]
    examples = [source[int(i)] for i in idx]
  else:
    examples = [source(i) for i in range(num_examples)]
  samples = [s for ex in examples
             for s in (interleave.expand(ex, specials) if memory_interleave else [ex])]
  meter = WasteMeter()
  for b, group in plan_batches(samples, buckets, np.random.default_rng(seed)):
    meter.update(collate(group, buckets[b]))
  return meter.summary()


def bucket_levels(data_cfg) -> dict:
  """``buckets_for``'s shape options from the data config: level caps
  ``data.memory_buckets`` / ``data.active_buckets`` (defaults 3 and 4 when the config
  predates them; each >= 1) and ``data.doc_slot_multiple`` (document slots a multiple of
  it; 0 or absent: whole chunks)."""
  levels = {"memory_levels": int(data_cfg.get("memory_buckets", 3)),
            "active_levels": int(data_cfg.get("active_buckets", 4))}
  for (key, value), field in zip(levels.items(), ("memory_buckets", "active_buckets")):
    if value < 1:
      raise ValueError(f"data.{field} must be >= 1 (the most {key.split('_')[0]} shapes per "
                       f"stage), got {value}; set --config.data.{field}=N")
  multiple = int(data_cfg.get("doc_slot_multiple", 0) or 0)
  if multiple < 0:
    raise ValueError(f"data.doc_slot_multiple must be >= 0 (0: whole chunks), got {multiple}")
  return dict(levels, doc_multiple=multiple or None)


def _bucket_caps(data_cfg) -> dict:
  return {k: data_cfg.get(k) for k in CAP_KEYS if data_cfg.get(k)}


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

  def get_state(self) -> dict[str, Any]:
    return {"stage": self._stage, "served": self._served, "inner": self._inner.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._stage, self._served = int(state["stage"]), int(state["served"])
    self._inner = iter(self._stages[self._stage][1])
    self._inner.set_state(state["inner"])


def make_train_iterator(data_cfg, *, seed: int, batch_size: int, chunk_size: int,
                        process_index: int = 0, process_count: int = 1,
                        verbose: bool = True) -> CurriculumIterator:
  """The training stream: interleave samples of the task's examples, bucketed.

  Synthetic tasks stream fresh examples (with the memory curriculum); JSONL
  repeats its example list forever, reshuffled by ``seed`` every epoch. The
  chosen buckets and their padding waste (on a sample) are printed once.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must divide evenly over {process_count} processes")
  local_batch = batch_size // process_count
  task_name = _check_task(data_cfg)
  if task_name == "jsonl" and len(data_cfg.memory_curriculum) > 1 and verbose:
    print("data: memory_curriculum is ignored for data.task='jsonl' (memories come from "
          "the file)", flush=True)
  if task_name not in ("kv", "multihop") and data_cfg.get("facts_curriculum") and verbose:
    print(f"data: facts_curriculum is ignored for data.task={task_name!r} (its documents "
          "have no facts)", flush=True)
  stages = []
  for start, memory_tokens, facts_per_doc in training_stages(data_cfg):
    source = make_source(data_cfg, seed, memory_tokens, facts_per_doc)
    buckets = buckets_for(source, local_batch, chunk_size,
                          memory_interleave=data_cfg.interleave, caps=_bucket_caps(data_cfg),
                          **bucket_levels(data_cfg))
    finite = isinstance(source, Sequence)
    ds = batch_dataset(source, buckets=buckets, specials=source.tokenizer.specials,
                       seed=seed + int(start), num_examples=len(source) if finite else None,
                       num_epochs=None, memory_interleave=data_cfg.interleave,
                       process_index=process_index, process_count=process_count,
                       answer_positives=bool(data_cfg.get("answer_positives", True)))
    if verbose:
      waste = padding_waste_of(source, buckets, memory_interleave=data_cfg.interleave,
                               seed=seed)
      size = f"{len(source)} examples" if finite else "synthetic"
      facts = f", {facts_per_doc} fact(s) a document" if facts_per_doc is not None else ""
      print(f"data: task {task_name} ({size}{facts}), stage from batch {int(start)}: "
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
