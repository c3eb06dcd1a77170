"""An independent float64 numpy implementation of the MSA forward, from SPEC.md alone.

This is the executable form of SPEC §1-§4. It is deliberately written in a
different style from ``msa_jax``: examples are processed one at a time, padding
is removed by slicing (never masked), documents are run one by one, routing
scores are computed literally as ``mean_h cos(RQ[t,h], K̄R[c, h // (H/Hkv)])``
(no group-sum identity) and attention loops over heads. Everything is float64.

Entry points:
  ``to_numpy_params(variables)``       flax variables -> nested dict of float64 arrays
  ``qwen3_logits(p, cfg, ids)``        plain Qwen3 (SPEC §1)
  ``msa_forward(p, cfg, batch)``       the training forward (SPEC §2-§3), per example
  ``lm_loss``, ``infonce_decoupled``, ``router_metrics``   (SPEC §4)
and the small pieces (``pool_chunks``, ``routing_score``, ``select_top_k``,
``attention``, ``positions``) used by the piece-wise tests.
"""
from __future__ import annotations

import math
import numpy as np

# --------------------------------------------------------------------------- params


def to_numpy_params(variables) -> dict:
  """Unboxes flax variables and converts every leaf to float64 numpy."""
  import flax.linen as nn
  import jax
  params = nn.meta.unbox(variables)
  params = params.get("params", params)
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


# --------------------------------------------------------------------------- SPEC §1 pieces


def rms_norm(x, scale, eps):
  """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis."""
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * scale


def rope(x_thd, pos_t, theta):
  """Rotate-half RoPE: frequencies ``theta^(-2i/D)``, i < D/2, halves [x1; x2] -> [-x2; x1]."""
  d = x_thd.shape[-1]
  half = d // 2
  inv_freq = theta ** (-(2.0 * np.arange(half)) / d)
  ang = np.asarray(pos_t, np.float64)[:, None] * inv_freq[None, :]      # [T, D/2]
  cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)[:, None, :]
  sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)[:, None, :]
  x1, x2 = x_thd[..., :half], x_thd[..., half:]
  rot = np.concatenate([-x2, x1], axis=-1)
  return x_thd * cos + rot * sin


def silu(x):
  return x / (1.0 + np.exp(-x))


def softmax(x):
  x = x - np.max(x)
  e = np.exp(x)
  return e / e.sum()


def attention_probs(q_mhd, k_sgd, allowed_ms):
  """GQA softmax probabilities ``[H, M, S]``; query head h reads kv head ``h // (H/Hkv)``;
  scale 1/sqrt(D). ``allowed_ms[i, j]``: query i may read key slot j; a query with no
  allowed slot gets a zero row."""
  m, h, d = q_mhd.shape
  r = h // k_sgd.shape[1]
  probs = np.zeros((h, m, k_sgd.shape[0]))
  for i in range(m):
    idx = np.nonzero(allowed_ms[i])[0]
    if idx.size == 0:
      continue
    for hh in range(h):
      probs[hh, i, idx] = softmax(k_sgd[idx, hh // r, :] @ q_mhd[i, hh] / math.sqrt(d))
  return probs


def attention(q_mhd, k_sgd, v_sgd, allowed_ms):
  """GQA softmax attention (``attention_probs`` applied to ``v``): ``[M, H, D]``; a query
  with no allowed slot gets zeros."""
  r = q_mhd.shape[1] // k_sgd.shape[1]
  probs = attention_probs(q_mhd, k_sgd, allowed_ms)
  return np.stack([probs[hh] @ v_sgd[:, hh // r, :] for hh in range(q_mhd.shape[1])], axis=1)


def _layer_params(p, i):
  return p[f"layers_{i}"]


def project(lp, cfg, x_td, pos_t):
  """The attention inputs of one block: ``h`` (normed), q, k (q/k-norm then RoPE), v."""
  H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  t = x_td.shape[0]
  h = rms_norm(x_td, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
  q = (h @ lp["q_proj"]["kernel"]).reshape(t, H, D)
  k = (h @ lp["k_proj"]["kernel"]).reshape(t, G, D)
  v = (h @ lp["v_proj"]["kernel"]).reshape(t, G, D)
  q = rope(rms_norm(q, lp["q_norm"]["scale"], cfg.rms_norm_eps), pos_t, cfg.rope_theta)
  k = rope(rms_norm(k, lp["k_norm"]["scale"], cfg.rms_norm_eps), pos_t, cfg.rope_theta)
  return h, q, k, v


def finish(lp, cfg, x_td, attn_thd):
  """Residual o_proj, then the SwiGLU MLP block."""
  t = x_td.shape[0]
  x = x_td + attn_thd.reshape(t, -1) @ lp["o_proj"]["kernel"]
  mp = lp["mlp"]
  hn = rms_norm(x, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
  mlp = (silu(hn @ mp["gate_proj"]["kernel"]) * (hn @ mp["up_proj"]["kernel"])) @ \
      mp["down_proj"]["kernel"]
  return x + mlp


def logits_of(p, cfg, x_td):
  xn = rms_norm(x_td, p["norm"]["scale"], cfg.rms_norm_eps)
  if cfg.tie_word_embeddings:
    return xn @ p["embed_tokens"]["embedding"].T
  return xn @ p["lm_head"]["kernel"]


def causal(t):
  return np.tril(np.ones((t, t), bool))


def encode_stream(p, cfg, tokens, pos, keep_layers=()):
  """Runs one self-contained causal stream (a document, the prefix, a plain LM input).

  Returns ``(final hidden [T, hidden], per-layer dict i -> (h, k, v, x_out))``.
  """
  x = p["embed_tokens"]["embedding"][np.asarray(tokens, int)]
  per_layer = {}
  for i in range(cfg.num_layers):
    lp = _layer_params(p, i)
    h, q, k, v = project(lp, cfg, x, pos)
    x = finish(lp, cfg, x, attention(q, k, v, causal(len(tokens))))
    per_layer[i] = (h, k, v, x)
  return x, per_layer


def qwen3_logits(p, cfg, ids_bt):
  """Plain Qwen3 (SPEC §1): positions 0..T-1, causal, float64 logits ``[B, T, V]``."""
  ids_bt = np.asarray(ids_bt)
  return np.stack([logits_of(p, cfg, encode_stream(p, cfg, row, np.arange(len(row)))[0])
                   for row in ids_bt])


# --------------------------------------------------------------------------- SPEC §2 positions


def positions(prefix_len, doc_lens, num_active, top_k, rope_mode, gaps=None):
  """``(prefix_pos, [doc_pos per doc], active_pos)`` for one example (SPEC §2).

  document mode: prefix 0..T-1, every document 0..len-1, active from T + k.
  global mode: prefix, documents (in slot order) and active tokens numbered continuously,
  skipping ``gaps[i]`` positions before document i and ``gaps[-1]`` before the active
  tokens (``data.global_position_span``; document mode ignores them).
  """
  prefix_pos = np.arange(prefix_len)
  gaps = [0] * (len(doc_lens) + 1) if gaps is None else list(gaps)
  if rope_mode == "document":
    doc_pos = [np.arange(n) for n in doc_lens]
    start = prefix_len + top_k
  elif rope_mode == "global":
    doc_pos, off = [], prefix_len
    for n, gap in zip(doc_lens, gaps):
      off += gap
      doc_pos.append(off + np.arange(n))
      off += n
    start = off + gaps[-1]
  else:
    raise ValueError(rope_mode)
  return prefix_pos, doc_pos, start + np.arange(num_active)


# --------------------------------------------------------------------------- SPEC §3 memory


def pool_chunks(x_t_rest, chunk_size):
  """Consecutive chunks of P tokens from the first; the last may be shorter; mean each."""
  t = x_t_rest.shape[0]
  return np.stack([x_t_rest[s:s + chunk_size].mean(axis=0) for s in range(0, t, chunk_size)])


def l2n(x):
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(n, 1e-300)


def routing_score(rq_thd, kr_chunks_cgd, route_t):
  """A document's routing score from raw router queries and raw pooled router keys.

  ``s(t,h,c) = normalize(RQ[t,h]) · normalize(K̄R[c, h // (H/Hkv)])``; mean over h,
  max over the routing tokens t, max over the chunks c (SPEC §3 step 2).
  Returns ``-inf`` when no token routes.
  """
  h = rq_thd.shape[1]
  g = kr_chunks_cgd.shape[1]
  r = h // g
  tokens = np.nonzero(route_t)[0]
  if tokens.size == 0:
    return -np.inf
  rq = l2n(rq_thd)
  kr = l2n(kr_chunks_cgd)
  best = -np.inf
  for c in range(kr.shape[0]):
    for t in tokens:
      s = np.mean([rq[t, hh] @ kr[c, hh // r] for hh in range(h)])
      best = max(best, s)
  return best


def select_top_k(scores, k, valid=None):
  """Indices of the ``min(k, #valid)`` best valid documents (ties: lower index), ascending.

  A document with score ``-inf`` or marked invalid is never selected.
  """
  scores = list(scores)
  valid = [True] * len(scores) if valid is None else list(valid)
  cand = [i for i in range(len(scores)) if valid[i] and scores[i] > -np.inf]
  cand.sort(key=lambda i: (-scores[i], i))
  return sorted(cand[:k])


def encode_document(p, cfg, tokens, pos):
  """Stage 1 for one document: per router layer ``(K̄ [C,G,D], V̄, K̄R raw [C,G,D])``
  and the per-layer hidden states (for property tests)."""
  G, D = cfg.num_kv_heads, cfg.head_dim
  _, per_layer = encode_stream(p, cfg, tokens, pos)
  mem = {}
  for i in router_ids(cfg):
    h, k, v, _ = per_layer[i]
    rk = (h @ _layer_params(p, i)["router_k_proj"]["kernel"]).reshape(len(tokens), G, D)
    mem[i] = (pool_chunks(k, cfg.pooling_chunk_size), pool_chunks(v, cfg.pooling_chunk_size),
              pool_chunks(rk, cfg.pooling_chunk_size))
  return mem, per_layer


def router_ids(cfg):
  if cfg.router_layers is None:
    return list(range(cfg.num_layers // 2, cfg.num_layers))
  return sorted(cfg.router_layers)


def msa_example(p, cfg, prefix, docs, active, question_len, routing_tokens=None, gaps=None):
  """The MSA forward of one unpadded example (SPEC §2-§3).

  Args:
    prefix: prefix token ids (may be empty).
    docs: list of ``(slot_index, token ids)`` of the real documents, slot order.
    active: active token ids (question then target).
    question_len: number of question tokens at the start of ``active``.
    gaps: global RoPE only, positions skipped before each real document and (last) before
      the active tokens (``MSABatch.doc_position_gaps``; see ``example_gaps``).
  Returns dict: ``logits [M, V]``, ``scores {layer: {slot: score}}``,
  ``selected {layer: [slots]}``, ``memory {slot: {layer: (K̄, V̄, K̄R)}}``,
  ``doc_hidden {slot: per-layer}``.
  """
  H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  routing_tokens = routing_tokens or cfg.routing_tokens
  t_len, m = len(prefix), len(active)
  prefix_pos, doc_pos, active_pos = positions(t_len, [len(d) for _, d in docs], m, cfg.top_k,
                                              cfg.rope_mode, gaps)
  memory, doc_hidden = {}, {}
  for (slot, toks), pos in zip(docs, doc_pos):
    memory[slot], doc_hidden[slot] = encode_document(p, cfg, toks, pos)
  if t_len:
    _, prefix_layers = encode_stream(p, cfg, prefix, prefix_pos)
  route_t = np.arange(m) < question_len if routing_tokens == "question" else np.ones(m, bool)

  x = p["embed_tokens"]["embedding"][np.asarray(active, int)]
  scores, selected = {}, {}
  for i in range(cfg.num_layers):
    lp = _layer_params(p, i)
    h, q, k, v = project(lp, cfg, x, active_pos)
    ks, vs = [], []
    if t_len:
      ks.append(prefix_layers[i][1])
      vs.append(prefix_layers[i][2])
    if i in router_ids(cfg) and docs:
      rq = (h @ lp["router_q_proj"]["kernel"]).reshape(m, H, D)
      sc = {slot: routing_score(rq, memory[slot][i][2], route_t) for slot, _ in docs}
      slots = [s for s, _ in docs]
      chosen = [slots[j] for j in select_top_k([sc[s] for s in slots], cfg.top_k)]
      scores[i], selected[i] = sc, chosen
      for s in chosen:                         # document order
        ks.append(memory[s][i][0])
        vs.append(memory[s][i][1])
    n_ctx = sum(a.shape[0] for a in ks)
    ks.append(k)
    vs.append(v)
    allowed = np.concatenate([np.ones((m, n_ctx), bool), causal(m)], axis=1)
    attn = attention(q, np.concatenate(ks), np.concatenate(vs), allowed)
    x = finish(lp, cfg, x, attn)
  return dict(logits=logits_of(p, cfg, x), scores=scores, selected=selected, memory=memory,
              doc_hidden=doc_hidden)


def unpad(batch, b):
  """One example of an ``MSABatch`` without padding: ``(prefix, docs, active, q_len)``."""
  pm = np.asarray(batch.prefix_mask[b], bool)
  prefix = np.asarray(batch.prefix_tokens[b])[pm]
  docs = []
  for n in range(np.shape(batch.doc_tokens)[1]):
    dm = np.asarray(batch.doc_mask[b, n], bool)
    if dm.any():
      docs.append((n, np.asarray(batch.doc_tokens[b, n])[dm]))
  am = np.asarray(batch.active_mask[b], bool)
  active = np.asarray(batch.active_tokens[b])[am]
  q_len = int(np.sum(np.asarray(batch.question_mask[b], bool) & am))
  return prefix, docs, active, q_len


def example_gaps(batch, b, docs):
  """Example ``b``'s ``doc_position_gaps`` for its real documents ``docs`` (from ``unpad``):
  a padding slot's gap (none in practice) joins the next real document's, or the active
  tokens' after the last. None without gaps."""
  if batch.doc_position_gaps is None:
    return None
  row = [int(g) for g in np.asarray(batch.doc_position_gaps[b])]
  out, start = [], 0
  for slot, _ in docs:
    out.append(sum(row[start:slot + 1]))
    start = slot + 1
  return out + [sum(row[start:])]


def msa_forward(p, cfg, batch):
  """The training forward on an ``MSABatch``, example by example (list of dicts)."""
  out = []
  for b in range(np.shape(batch.active_tokens)[0]):
    prefix, docs, active, q_len = unpad(batch, b)
    out.append(msa_example(p, cfg, prefix, docs, active, q_len,
                           gaps=example_gaps(batch, b, docs)))
  return out


# --------------------------------------------------------------------------- SPEC §4 losses


def log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def lm_loss(logits_bmv, targets_bm, loss_mask_bm):
  """Mean next-token cross entropy over the marked (target) positions."""
  lp = log_softmax(np.asarray(logits_bmv, np.float64))
  total, count = 0.0, 0
  for b, m in zip(*np.nonzero(np.asarray(loss_mask_bm, bool))):
    total -= lp[b, m, int(targets_bm[b, m])]
    count += 1
  return (total / count if count else 0.0), count


def infonce_decoupled(scores_brn, positive_bn, valid_bn, tau=0.1):
  """SPEC §4: ``-(1/|Pos|) Σ_{i∈Pos} log(e^{s_i/τ} / (e^{s_i/τ} + Σ_{j∉Pos} e^{s_j/τ}))``
  over the valid documents, averaged over the (example, layer) pairs with a positive."""
  losses = []
  for b in range(scores_brn.shape[0]):
    valid = np.asarray(valid_bn[b], bool)
    pos = [i for i in np.nonzero(valid & np.asarray(positive_bn[b], bool))[0]]
    neg = [j for j in np.nonzero(valid & ~np.asarray(positive_bn[b], bool))[0]]
    if not pos:
      continue
    for r in range(scores_brn.shape[1]):
      s = np.asarray(scores_brn[b, r], np.float64) / tau
      terms = []
      for i in pos:
        den = math.exp(s[i]) + sum(math.exp(s[j]) for j in neg)
        terms.append(-math.log(math.exp(s[i]) / den))
      losses.append(np.mean(terms))
  return (float(np.mean(losses)) if losses else 0.0), len(losses)


def router_metrics(scores_brn, selected_brk, selected_valid_brk, positive_bn, valid_bn,
                   ks=(1, 5, 10)):
  """recall@K = |Pos ∩ top-K scored valid docs| / |Pos|; precision@k = |Pos ∩ selected| /
  |selected|; per layer, averaged over the examples with a positive."""
  b_n, r_n = scores_brn.shape[:2]
  out = {f"recall@{k}": np.zeros(r_n) for k in ks}
  out["precision@k"] = np.zeros(r_n)
  with_pos = [b for b in range(b_n) if np.any(np.asarray(positive_bn[b], bool)
                                              & np.asarray(valid_bn[b], bool))]
  for r in range(r_n):
    for b in with_pos:
      valid = np.asarray(valid_bn[b], bool)
      pos = set(np.nonzero(valid & np.asarray(positive_bn[b], bool))[0].tolist())
      for k in ks:
        top = select_top_k(scores_brn[b, r], k, valid)
        out[f"recall@{k}"][r] += len(pos & set(top)) / len(pos)
      sel = [int(i) for i, ok in zip(selected_brk[b, r], selected_valid_brk[b, r]) if ok]
      out["precision@k"][r] += (len(pos & set(sel)) / len(sel)) if sel else 0.0
  for key in out:
    out[key] = out[key] / max(len(with_pos), 1)
  return out



# --------------------------------------------------------------------------- test inputs


def make_batch(rng, *, vocab, prefix_lens, doc_lens, active_lens, question_lens,
               T=None, L=None, M=None, positives=None):
  """A right-padded ``MSABatch`` from per-example lengths (a doc length 0 = padding slot).

  ``loss_mask[b, i]`` marks the positions whose next token is a target token.
  """
  from msa_jax.batch import MSABatch
  B = len(prefix_lens)
  N = len(doc_lens[0])
  T = max(prefix_lens) if T is None else T
  L = max(max(d) for d in doc_lens) if L is None else L
  L = max(L, 1)
  M = max(active_lens) if M is None else M
  tok = lambda *shape: rng.integers(0, vocab, size=shape).astype(np.int32)
  ar = lambda n, lens: np.arange(n)[None, :] < np.asarray(lens)[:, None]
  prefix_mask = ar(T, prefix_lens)
  doc_mask = np.arange(L)[None, None, :] < np.asarray(doc_lens)[:, :, None]
  active_mask = ar(M, active_lens)
  question_mask = ar(M, question_lens) & active_mask
  # position i predicts token i+1: a target token when i+1 >= question length.
  loss_mask = (np.arange(M)[None, :] + 1 >= np.asarray(question_lens)[:, None]) & \
      ar(M, np.asarray(active_lens) - 1)
  if positives is None:
    positives = np.zeros((B, N), bool)
    for b in range(B):
      real = [n for n in range(N) if doc_lens[b][n] > 0]
      if real:
        positives[b, rng.choice(real, size=min(2, len(real)), replace=False)] = True
  return MSABatch(
      prefix_tokens=tok(B, T) * prefix_mask, prefix_mask=prefix_mask,
      doc_tokens=tok(B, N, L) * doc_mask, doc_mask=doc_mask,
      active_tokens=tok(B, M) * active_mask, active_mask=active_mask,
      question_mask=question_mask, targets=tok(B, M), loss_mask=loss_mask,
      positive_docs=np.asarray(positives, bool))


def init_model(cfg, batch, seed=0, scale=None):
  """``(model, variables)`` with random float32 params of the model's shapes.

  Shapes come from ``jax.eval_shape(model.init)`` (cheap: no compilation); kernels and
  embeddings are ``N(0, initializer_range)``, every RMSNorm scale is ``1 + N(0, 0.3)``
  (so that scales are exercised, unlike the all-ones init).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from msa_jax.model import MSAModel
  model = MSAModel(cfg)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch))
  rng = np.random.default_rng(seed)
  std = cfg.initializer_range if scale is None else scale

  def fill(path, x):
    if getattr(path[-1], "key", None) == "scale":
      v = 1.0 + 0.3 * rng.standard_normal(x.shape)
    else:
      v = std * rng.standard_normal(x.shape)
    return jnp.asarray(v, x.dtype)
  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def rel_err(actual, ref):
  """Normwise relative error ``max|a - r| / max|r|`` (the tolerance measure of the tests)."""
  actual = np.asarray(actual, np.float64)
  ref = np.asarray(ref, np.float64)
  assert actual.shape == ref.shape, (actual.shape, ref.shape)
  if ref.size == 0:
    return 0.0
  return float(np.max(np.abs(actual - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _fast_compile():
  """Module fixture body: XLA's cheap compile mode for these many tiny CPU programs.

  The tests compile hundreds of small programs; optimisations cost more than they save
  here. Numerics stay float32 (the tolerances are unchanged); the flag is restored after.
  """
  import jax
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def fast_compile_fixture():
  import pytest
  return pytest.fixture(scope="module", autouse=True)(_fast_compile)
