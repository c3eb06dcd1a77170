r"""Where each attention head looks when a trained reader picks a value: the lookup's circuit.

For held-out answer rounds (Memory Interleave's last round, teacher-forced, as
``launch.answer_positions``) this tool records every layer's attention probabilities at
the position that predicts the answer's first value token (its input is the restated
key's last token) and tables, per layer, head and the fact the question's key is in:

- ``gold``: the probability on the asked fact's first value token in the injected document;
- ``others``: the summed probability on the other facts' first value tokens;
- ``memory``: the probability on memory slots (selected chunks, prefix);
- ``mode``: the document offset the head attends most often (its argmax), and how often.

A reader that matches the key's content puts one head's ``gold`` high for every fact; a
reader that reads fixed slots has heads whose ``mode`` is one fact's value offset and
whose ``gold`` is high only for that fact (WORKSPACE.md, "The lookup reads fixed
slots")::

  python -m launch.lookup_attention --workdir=runs/tiny [--num_examples=96] \
      [--memory_tokens=320] [--seed=12345] [--out=PATH.json]

Runs the XLA attention (``msa_jax.attention.attend``) on the CPU or GPU; the model's
``kernels`` setting is overridden for the recording only.
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np

from launch.answer_positions import fact_values


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--num_examples", type=int, default=96)
  p.add_argument("--seed", type=int, default=12345)
  p.add_argument("--memory_tokens", type=int, default=None)
  p.add_argument("--out", default="")
  return p.parse_args(argv)


def record_attention(model, params, batch, aux_softmax: float, oracle: bool) -> list:
  """The forward of ``batch`` with every active-token attention's probabilities recorded:
  ``[(probs [B, Hkv, r, M, S+M], S)]``, one per layer in order (``S``: memory slots)."""
  import jax
  from msa_jax import attention as attention_lib
  from msa_jax.model import MSAModel

  b_size, m_len = np.asarray(batch.targets).shape
  store = []
  plain = attention_lib.attend

  def recording(q, k_self, v_self, mask, k_ctx=None, v_ctx=None, ctx_mask=None):
    if q.shape[:2] == (b_size, m_len):   # the active tokens, not a document or the prefix
      probs = attention_lib.attention_probs(q, k_self, mask, k_ctx, ctx_mask)
      slots = 0 if k_ctx is None else k_ctx.shape[1]
      jax.debug.callback(lambda p, s=slots: store.append((np.asarray(p), s)), probs)
    return plain(q, k_self, v_self, mask, k_ctx, v_ctx, ctx_mask)

  attention_lib.attend = recording
  try:
    model_xla = MSAModel(model.config.replace(kernels="xla"))
    out = model_xla.apply({"params": params}, batch, aux_softmax, False, oracle,
                          method=MSAModel.forward_train)
    jax.block_until_ready(out.hidden_bmd)
  finally:
    attention_lib.attend = plain
  return store


def head_table(store, batch, examples, kinds) -> list[dict]:
  """Per layer, head and asked fact: mean ``gold``, ``others``, ``memory`` and the
  ``mode`` offset with its share (see the module docstring)."""
  toks = np.asarray(batch.active_tokens)
  targets, mask = np.asarray(batch.targets), np.asarray(batch.loss_mask, bool)
  acc = collections.defaultdict(list)
  for b, ex in enumerate(examples):
    gold_doc = next(d for d in ex.docs if d.doc_id in ex.positive_doc_ids)
    doc, row = list(gold_doc.tokens), list(toks[b])
    start = next((i for i in range(len(row) - len(doc) + 1) if row[i:i + len(doc)] == doc), None)
    cols = [c for c in np.flatnonzero(mask[b]) if kinds(int(targets[b, c])) == "value"]
    if start is None or not cols:
      continue
    query = cols[0]
    first = query                      # the restated key: the key tokens ending at the query
    while first > 0 and kinds(int(toks[b, first - 1])) == "key":
      first -= 1
    key = [int(t) for t in toks[b, first:query + 1]]
    firsts, fact = fact_values(doc, key, kinds)
    if fact < 0:
      continue
    for layer, (probs, slots) in enumerate(store):
      p = probs[b, :, :, query].reshape(-1, probs.shape[-1])      # [heads, S + M]
      own = p[:, slots:]
      for head in range(p.shape[0]):
        acc[(layer, head, fact)].append((
            float(own[head, start + firsts[fact]]),
            float(sum(own[head, start + f] for i, f in enumerate(firsts) if i != fact)),
            float(p[head, :slots].sum()), int(np.argmax(own[head])) - start))
  rows = []
  for (layer, head, fact), vals in sorted(acc.items()):
    offsets = collections.Counter(v[3] for v in vals)
    mode, count = offsets.most_common(1)[0]
    rows.append({"layer": layer, "head": head, "fact": fact, "questions": len(vals),
                 "gold": float(np.mean([v[0] for v in vals])),
                 "others": float(np.mean([v[1] for v in vals])),
                 "memory": float(np.mean([v[2] for v in vals])),
                 "mode_offset": mode, "mode_share": count / len(vals)})
  return rows


def main(argv=None) -> dict:
  args = _parse(argv)
  from msa_jax.data import from_config, interleave
  from msa_jax.data.collate import collate, fit_bucket
  from msa_jax.train_step import aux_softmax, oracle_routing
  from launch.answer_positions import _kind, load_run

  cfg, model, params = load_run(args.workdir, args.step)
  task = from_config.make_task(cfg.data, args.seed, memory_tokens=args.memory_tokens)
  kinds = lambda t: _kind(task.tokenizer, t)
  examples = [task(i) for i in range(args.num_examples)]
  answers = [interleave.expand(ex, task.tokenizer.specials, cfg.data.answer_positives)[-1]
             for ex in examples]
  batch = collate(answers, fit_bucket(answers, len(answers)))
  store = record_attention(model, params, batch, aux_softmax(cfg), oracle_routing(cfg))
  rows = head_table(store, batch, examples, kinds)
  print("| layer | head | key in fact | questions | gold value | other values | memory "
        "| mode offset (share) |\n|---:|---:|---:|---:|---:|---:|---:|---|")
  for r in rows:
    print(f"| {r['layer']} | {r['head']} | {r['fact']} | {r['questions']} | {r['gold']:.2f} "
          f"| {r['others']:.2f} | {r['memory']:.2f} | {r['mode_offset']} "
          f"({r['mode_share']:.2f}) |")
  result = {"workdir": os.path.abspath(args.workdir), "step": args.step, "seed": args.seed,
            "num_examples": args.num_examples, "rows": rows}
  out = args.out or os.path.join(args.workdir, "lookup_attention.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
