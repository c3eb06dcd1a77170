"""Checks an exported dir against the checkpoint it came from (``--verify`` of the CLI).

* every format: ``from_pretrained(out)`` gives the source's memory forward (logits,
  document scores, selections) on a random batch, exactly for a same-dtype export;
* ``hf``: ``transformers.Qwen3ForCausalLM`` (when installed) gives the source's
  no-memory logits;
* a tokenizer dir: ``transformers.AutoTokenizer`` encodes and decodes text made by
  the source's own tokenizer (the synthetic task's ``WordTokenizer``) identically.
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np


def _random_batch(vocab: int, k: int, chunk: int, seed: int = 0):
  from msa_jax.batch import MSABatch
  rng = np.random.default_rng(seed)
  b, t, n, l, m = 2, 2, max(3, 2 * k), 2 * chunk + 1, 6
  doc_len = rng.integers(1, l + 1, (b, n))
  doc_mask = np.arange(l)[None, None] < doc_len[..., None]
  ones = lambda *s: np.ones(s, bool)
  question = np.arange(m)[None] < 3
  return MSABatch(
      prefix_tokens=rng.integers(0, vocab, (b, t)).astype(np.int32), prefix_mask=ones(b, t),
      doc_tokens=(rng.integers(0, vocab, (b, n, l)) * doc_mask).astype(np.int32),
      doc_mask=doc_mask, active_tokens=rng.integers(0, vocab, (b, m)).astype(np.int32),
      active_mask=ones(b, m), question_mask=np.broadcast_to(question, (b, m)).copy(),
      targets=rng.integers(0, vocab, (b, m)).astype(np.int32), loss_mask=ones(b, m),
      positive_docs=np.eye(n, dtype=bool)[:b])


def memory_forward_diff(model_a, params_a, model_b, params_b) -> dict:
  """Max |a - b| of logits and scores, and whether the selections agree."""
  cfg = model_a.config
  batch = _random_batch(cfg.vocab_size, cfg.top_k, cfg.pooling_chunk_size)
  a = jax.jit(model_a.apply)({"params": params_a}, batch)
  b = jax.jit(model_b.apply)({"params": params_b}, batch)
  scores_a, scores_b = np.asarray(a.doc_scores_brn), np.asarray(b.doc_scores_brn)
  finite = np.isfinite(scores_a)
  return {
      "memory_logits_max_abs_diff": float(np.max(np.abs(np.asarray(a.logits_bmv)
                                                        - np.asarray(b.logits_bmv)))),
      "doc_scores_max_abs_diff": float(np.max(np.abs(scores_a[finite] - scores_b[finite]))),
      "same_selection": bool(np.array_equal(np.asarray(a.selected_brk),
                                            np.asarray(b.selected_brk))),
  }


def transformers_logits_diff(model, params, out_dir: str) -> Optional[float]:
  """Max |msa_jax - transformers| no-memory logits of an ``hf`` dir (None without torch)."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  hf = transformers.Qwen3ForCausalLM.from_pretrained(out_dir, attn_implementation="eager",
                                                     dtype=torch.float32).eval()
  ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, ids))
  with torch.no_grad():
    theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
  return float(np.max(np.abs(ours - theirs)))


def tokenizer_round_trip(tokenizer, out_dir: str, texts_ids) -> Optional[bool]:
  """Whether ``AutoTokenizer(out_dir)`` encodes/decodes like ``tokenizer`` (None without it)."""
  try:
    import transformers
  except ImportError:
    return None
  hf = transformers.AutoTokenizer.from_pretrained(out_dir)
  for ids in texts_ids:
    text = tokenizer.decode(ids)
    if hf.encode(text) != list(ids) or hf.decode(ids) != text:
      return False
  return True
