r"""Per-position NLL of a trained run's answer targets: which answer token is still at chance.

The trainer logs one mean over an answer's target tokens (``lm_loss_answer``); a plateau of
that mean can be one token at chance (the reading task's first value token: ln 64 / 4 =
1.04) or all of them partly learnt. This tool runs the training forward of a checkpoint on
fresh answer samples (Memory Interleave's last round, teacher-forced, the training memory
size and routing) and prints the mean and median NLL of each target position and the share
of examples above 1 nat, beside the uniform chance of the alphabet the target token comes
from (a routing miss puts one example's id at ~17 nats a token: read the median and the
share, not the mean alone). The same for the retrieval samples
(the first round: question -> the gold document's id), whose logged mean
(``lm_loss_retrieval``) steps down one id token at a time in the reading recipe: the table
says which id positions are learnt. Last, the lookup: at each answer's first value token,
whether the model's top choice is the key's value, one of the gold document's values, and
how much probability those values get, per fact the key is in (``value_choice``)::

  python -m launch.answer_positions --workdir=runs/tiny --num_examples=256 [--step=N] \
      [--seed=12345] [--memory_tokens=320] [--facts_per_doc=4] \
      [--ablate=no_injection|no_gold_memory] [--out=PATH.json]

``--ablate`` removes one of the answer round's two copies of the gold document (the text
injected into the question, or the document in memory) to say which one the lookup reads.

Writes ``PATH.json`` (default ``WORKDIR/answer_positions.json``): ``positions`` (answer
targets) and ``retrieval_positions`` (id targets), one row per target position, and
``value_choice`` (one row per fact index).
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a trainer workdir (config.json, checkpoints)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--num_examples", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--seed", type=int, default=12345, help="data seed (not the training one)")
  p.add_argument("--memory_tokens", type=int, default=None,
                 help="memory per example (default: the config's data.memory_tokens)")
  p.add_argument("--facts_per_doc", type=int, default=None,
                 help="facts per document (kv tasks; default: the config's data.kv)")
  p.add_argument("--ablate", default="none", choices=ABLATIONS,
                 help="answer rounds only: no_injection drops the injected gold document "
                      "from the question (the answer must come from memory); no_gold_memory "
                      "drops the gold document from the memory (it must come from the "
                      "injected text)")
  p.add_argument("--out", default="")
  return p.parse_args(argv)


ABLATIONS = ("none", "no_injection", "no_gold_memory")


def ablate_answer_round(answer, example, ablation: str):
  """The answer round ``answer`` of ``example`` with one of its two sources of the gold
  document removed (``ABLATIONS``): which one the model reads the value from."""
  import dataclasses
  if ablation == "none":
    return answer
  if ablation == "no_injection":
    return dataclasses.replace(answer, question=list(example.question))
  if ablation == "no_gold_memory":
    gold = set(example.positive_doc_ids)
    docs = [d for d in answer.docs if d.doc_id not in gold]
    # rounds=None: its retrieval chain names the gold document, now not in memory.
    return dataclasses.replace(answer, docs=docs, rounds=None,
                               positive_doc_ids=[i for i in answer.positive_doc_ids
                                                 if i not in gold])
  raise ValueError(f"--ablate={ablation}: choose one of {ABLATIONS}")


def _log_probs_fn(model, aux_softmax: float, oracle: bool):
  """A jitted ``(params, batch) -> [B, M, vocab]`` float32 log-probabilities."""
  import jax
  import jax.numpy as jnp
  from msa_jax.model import MSAModel, lm_head_weight_vd

  def log_probs(params, batch):
    out = model.apply({"params": params}, batch, aux_softmax, False, oracle,
                      method=MSAModel.forward_train)
    logits = jnp.einsum("bmd,vd->bmv", out.hidden_bmd.astype(jnp.float32),
                        lm_head_weight_vd(params, model.config).astype(jnp.float32))
    return jax.nn.log_softmax(logits, axis=-1)
  return jax.jit(log_probs)


def position_nll(model, params, batch, answer_token: int, aux_softmax: float = 0.0,
                 oracle: bool = False, log_probs_fn=None, retrieval: bool = False):
  """``[B, P]`` NLL of each answer target position (P = the longest target) and the
  ``[B, P]`` mask of positions present; rows whose target does not start with
  ``answer_token`` are all False (``retrieval=True``: the rows whose target does not
  start with it, i.e. the retrieval rounds' id targets). ``log_probs_fn`` (from
  ``_log_probs_fn``) reuses one compiled forward over batches of one shape."""
  fn = log_probs_fn or _log_probs_fn(model, aux_softmax, oracle)
  return _target_nll(np.asarray(fn(params, batch)), batch, answer_token, retrieval)


def _target_nll(logp, batch, answer_token: int, retrieval: bool):
  """``position_nll`` from the batch's ``[B, M, vocab]`` log-probabilities."""
  targets = np.asarray(batch.targets)
  nll_bm = -np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0]
  mask_bm = np.asarray(batch.loss_mask, bool)
  width = int(mask_bm.sum(-1).max(initial=0))
  nll_bp, has_bp = np.zeros((len(mask_bm), width)), np.zeros((len(mask_bm), width), bool)
  for row in range(len(mask_bm)):
    cols = np.flatnonzero(mask_bm[row])
    if len(cols) and (targets[row, cols[0]] == answer_token) != retrieval:
      nll_bp[row, :len(cols)] = nll_bm[row, cols]
      has_bp[row, :len(cols)] = True
  return nll_bp, has_bp


def load_run(workdir: str, step=None):
  """``(config, model, params)`` of a training run's directory (its newest checkpoint, or
  ``step``'s)."""
  import ml_collections
  from msa_jax import from_pretrained
  from msa_jax.run_config import read_saved
  saved = read_saved(workdir)
  if saved is None:
    raise FileNotFoundError(f"{workdir} has no config.json: --workdir must be a "
                            "training run's directory")
  model, params = from_pretrained(workdir, step=step)
  return ml_collections.ConfigDict(saved), model, params


def main(argv=None) -> dict:
  args = _parse(argv)
  from msa_jax.data import from_config, interleave
  from msa_jax.train_step import aux_softmax, oracle_routing

  cfg, model, params = load_run(args.workdir, args.step)
  task = from_config.make_task(cfg.data, args.seed, memory_tokens=args.memory_tokens,
                               facts_per_doc=args.facts_per_doc)
  sp = task.tokenizer.specials
  log_probs = _log_probs_fn(model, aux_softmax(cfg), oracle_routing(cfg))
  examples = [task(i) for i in range(args.num_examples)]
  rounds = [interleave.expand(ex, sp, cfg.data.answer_positives) for ex in examples]
  rounds = [r[:-1] + [ablate_answer_round(r[-1], ex, args.ablate)]
            for r, ex in zip(rounds, examples)]
  result = {"workdir": os.path.abspath(args.workdir), "step": args.step,
            "seed": args.seed, "num_examples": args.num_examples,
            "facts_per_doc": task.config.facts_per_doc, "ablate": args.ablate}
  for key, name, retrieval, pick in (("positions", "answer", False, -1),
                                     ("retrieval_positions", "retrieval (id)", True, 0)):
    rows, choices = _round_tables(params, task, [r[pick] for r in rounds], log_probs,
                                  args.batch_size, retrieval,
                                  None if retrieval else examples,
                                  global_position_span=int(
                                      cfg.data.get("global_position_span", 0) or 0),
                                  seed=args.seed)
    result[key] = rows
    if choices is not None:
      result["value_choice"] = choices
    print(f"{name} targets of {args.num_examples} held-out examples (seed {args.seed}):")
    print(f"| position | target token | mean NLL | median NLL | share > {MISS_NATS:g} nat "
          "| uniform chance |\n|---:|---|---:|---:|---:|---:|")
    for r in rows:
      chance = "" if r["chance"] is None else f"{r['chance']:.2f}"
      print(f"| {r['position']} | {r['token']} | {r['nll']:.3f} | {r['median_nll']:.3f} "
            f"| {r['miss_share']:.3f} | {chance} |")
  print("the first value token, by the fact the question's key is in (the lookup: does the "
        "model pick the key's value among the document's values?):")
  print("| key in fact | questions | right | one of the document's values | probability on "
        "them |\n|---:|---:|---:|---:|---:|")
  for r in result["value_choice"]:
    print(f"| {r['fact']} | {r['questions']} | {r['right']:.2f} | {r['in_document']:.2f} "
          f"| {r['mass_on_document']:.2f} |")
  out = args.out or os.path.join(args.workdir, "answer_positions.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}")
  return result


def _round_tables(params, task, samples, log_probs, batch_size: int, retrieval: bool,
                 examples=None, global_position_span: int = 0,
                 seed: int = 0) -> tuple[list[dict], list[dict] | None]:
  """One forward per batch of ``samples`` (one interleave round of each example): the
  ``position_stats`` rows, each with its position's alphabet and uniform chance, and, given
  the ``examples`` (answer rounds), the ``value_choice`` rows per fact index.
  ``global_position_span`` > 0 (a global-RoPE run trained with ``data.global_position_span``):
  each batch's documents spread over that many positions as the training pipeline does
  (without it the question sits where that run never saw one)."""
  from msa_jax.data.collate import collate, fit_bucket, global_position_gaps
  tok = task.tokenizer
  kinds = lambda t: _kind(tok, t)
  bucket = fit_bucket(samples, batch_size)
  longest = max(samples, key=lambda s: len(s.target)).target
  nll_parts, has_parts, choices = [], [], []
  for start in range(0, len(samples), batch_size):
    batch = collate(samples[start:start + batch_size], bucket)
    if global_position_span > 0:
      rng = np.random.default_rng([seed, start])
      batch = batch.replace(doc_position_gaps=global_position_gaps(
          batch.doc_mask, global_position_span, rng))
    logp = np.asarray(log_probs(params, batch))
    nll_bp, has_bp = _target_nll(logp, batch, tok.specials.end_of_retrieval, retrieval)
    pad = len(longest) - nll_bp.shape[1]
    nll_parts.append(np.pad(nll_bp, ((0, 0), (0, pad))))
    has_parts.append(np.pad(has_bp, ((0, 0), (0, pad))))
    if examples is not None:
      choices += _value_choices(logp, batch, examples[start:start + batch_size], kinds)
  rows = position_stats(np.concatenate(nll_parts), np.concatenate(has_parts))
  for row, kind in zip(rows, map(kinds, longest)):
    row.update(token=kind, chance=_chance(task, kind))
  return rows, (None if examples is None else _per_fact(choices))


MISS_NATS = 1.0   # a position "missed" on an example: NLL above this (p(target) < 0.37)


def position_stats(nll_bp: np.ndarray, has_bp: np.ndarray) -> list[dict]:
  """Per target position of ``[B, P]`` NLLs (``has_bp``: present): the mean, the median
  and the share of examples above ``MISS_NATS``.

  The mean alone misleads: a routing miss makes the model name another document's id
  with confidence (~17 nats a token), so one example in 32 moves the mean of every id
  position by ~0.5 nats while the other 31 sit at 0.01. The median and the miss share
  tell a position learnt on most examples from one learnt on none.
  """
  rows = []
  for pos in range(nll_bp.shape[1]):
    values = nll_bp[has_bp[:, pos], pos]
    n = len(values)
    rows.append({"position": pos,
                 "nll": float(values.mean()) if n else 0.0,
                 "median_nll": float(np.median(values)) if n else 0.0,
                 "miss_share": float((values > MISS_NATS).mean()) if n else 0.0,
                 "samples": n})
  return rows


def value_choice(logp_v: np.ndarray, gold: int, doc_tokens, key_tokens, kinds) -> dict:
  """What the model's distribution ``logp_v`` at an answer's first value token chooses.

  ``doc_tokens``: the gold document; its "values" are the value tokens right after a run
  of key tokens (each fact's first value); ``key_tokens``: the key the answer restates;
  ``kinds(token)``: its alphabet (``_kind``). Returns ``right`` (top-1 is ``gold``),
  ``in_document`` (top-1 is one of the document's values), ``mass_on_document`` (their
  total probability) and ``fact`` (the index of the fact holding the key; -1 if absent).
  A reader that copies some value of the document without matching the key puts its mass
  on the document's values and is right ~1/facts of the time.
  """
  offsets, fact = fact_values(doc_tokens, key_tokens, kinds)
  top = int(np.argmax(logp_v))
  values = sorted({int(doc_tokens[j]) for j in offsets})
  return {"right": top == gold, "in_document": top in values,
          "mass_on_document": float(np.exp(logp_v[values]).sum()) if values else 0.0,
          "fact": fact}


def fact_values(doc, key_tokens, kinds) -> tuple[list[int], int]:
  """The offsets in ``doc`` of each fact's first value token (a value right after a key
  token) and the index of the first fact whose key is ``key_tokens`` (-1 if none; a fact
  restated at the end, ``data.kv.restate_facts``, is counted at its first statement)."""
  doc, n = list(doc), len(key_tokens)
  firsts, fact = [], -1
  for j in range(1, len(doc)):
    if kinds(doc[j]) == "value" and kinds(doc[j - 1]) == "key":
      if fact < 0 and doc[j - n:j] == list(key_tokens):
        fact = len(firsts)
      firsts.append(j)
  return firsts, fact


def _value_choices(logp, batch, examples, kinds) -> list[dict]:
  """``value_choice`` of each answer row of ``batch`` (``logp``: its log-probabilities)."""
  targets, mask = np.asarray(batch.targets), np.asarray(batch.loss_mask, bool)
  out = []
  for row, ex in enumerate(examples):
    cols = np.flatnonzero(mask[row])
    target = [int(targets[row, c]) for c in cols]
    value_at = [i for i, t in enumerate(target) if kinds(t) == "value"]
    if not value_at:
      continue
    key = [t for t in target[:value_at[0]] if kinds(t) == "key"]
    gold_doc = next(d for d in ex.docs if d.doc_id in ex.positive_doc_ids)
    out.append(value_choice(logp[row, cols[value_at[0]]], target[value_at[0]],
                            gold_doc.tokens, key, kinds))
  return out


def _per_fact(choices: list[dict]) -> list[dict]:
  """``value_choice`` results averaged per fact index of the key."""
  per_fact: dict[int, list[dict]] = {}
  for c in choices:
    per_fact.setdefault(c["fact"], []).append(c)
  return [{"fact": fact, "questions": len(c),
           **{k: float(np.mean([x[k] for x in c]))
              for k in ("right", "in_document", "mass_on_document")}}
          for fact, c in sorted(per_fact.items())]


def _kind(tok, token: int) -> str:
  """The alphabet a target token belongs to: ``key``, ``value``, ``id`` or its word."""
  word = tok.decode([token]).strip()
  for kind in ("k", "v", "i"):
    if word[:1] == kind and word[1:].isdigit():
      return {"k": "key", "v": "value", "i": "id"}[kind]
  return word


def _chance(task, kind: str):
  """ln(alphabet size) of a key / value / id token (None for marker words)."""
  c = task.config
  n = {"key": c.num_key_symbols, "value": c.num_value_symbols, "id": c.num_id_symbols}
  return math.log(n[kind]) if kind in n else None


if __name__ == "__main__":
  main()
