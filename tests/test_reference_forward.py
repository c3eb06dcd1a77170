"""The whole MSA forward and the training losses against the float64 numpy reference.

``tests/reference_numpy.py`` implements SPEC §1-§4 from the page alone (example by
example, padding sliced away, documents run one at a time, routing scores by the
literal head-mean-of-cosines definition). ``MSAModel.apply(vars, batch)`` in float32
must agree with it:
  * logits of the valid active tokens: normwise relative error <= 1e-5;
  * per-router-layer document scores: absolute error <= 1e-5 (cosines); padding
    documents score -inf;
  * selected documents: identical (in document order), whenever the reference's
    k-th and (k+1)-th scores are more than 1e-4 apart (closer near-ties could
    legitimately flip in float32; such draws are rejected);
  * losses: relative error <= 1e-5.
"""
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings

from msa_jax import losses
from msa_jax.config import ModelConfig
from tests import reference_numpy as R

fast_compile = R.fast_compile_fixture()

RTOL = 1e-5
SCORE_ATOL = 1e-5
TIE_GAP = 1e-4
VOCAB = 48


def tiny_config(**kw):
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=3,
              num_heads=4, num_kv_heads=2, head_dim=8, router_layers=(1, 2),
              pooling_chunk_size=3, top_k=2, initializer_range=0.3)
  base.update(kw)
  return ModelConfig(**base)


def check_against_reference(cfg, batch, out, ref):
  """Asserts the SPEC §3 outputs of one forward match the reference, example by example."""
  rids = R.router_ids(cfg)
  for b, r in enumerate(ref):
    am = np.asarray(batch.active_mask[b], bool)
    assert R.rel_err(np.asarray(out.logits_bmv[b])[am], r["logits"]) < RTOL, b
    doc_valid = np.asarray(batch.doc_mask[b], bool).any(-1)
    for j, layer in enumerate(rids):
      scores = np.asarray(out.doc_scores_brn[b, j])
      assert np.all(scores[~doc_valid] == -np.inf), (b, layer, scores)
      ref_scores = r["scores"].get(layer, {})
      for slot, s in ref_scores.items():
        if s == -np.inf:   # no routing token in this example
          assert scores[slot] == -np.inf, (b, layer, slot, scores[slot])
        else:
          assert abs(scores[slot] - s) < SCORE_ATOL, (b, layer, slot, scores[slot], s)
      sel = np.asarray(out.selected_brk[b, j])[np.asarray(out.selected_valid_brk[b, j])]
      np.testing.assert_array_equal(sel, r["selected"].get(layer, []))


def clear_selection_margins(cfg, ref):
  """True when no reference selection hinges on a float32-sized near-tie."""
  for r in ref:
    for sc in r["scores"].values():
      vals = sorted((v for v in sc.values() if v > -np.inf), reverse=True)
      if cfg.top_k < len(vals) and vals[cfg.top_k - 1] - vals[cfg.top_k] < TIE_GAP:
        return False
  return True


@st.composite
def msa_cases(draw):
  """A random tiny config and a padded batch covering SPEC §2's corner cases.

  Array shapes are fixed (B=2, N=5 slots, L=7, M=6, T=3) so compiled ops are reused; the
  variety is in the masks: padding document slots (so fewer real documents than k),
  document lengths not divisible by P, empty prefixes, padding in question and active.
  """
  heads = draw(st.sampled_from([(4, 2), (4, 4), (4, 1), (6, 3)]))
  cfg = tiny_config(
      num_heads=heads[0], num_kv_heads=heads[1],
      router_layers=draw(st.sampled_from([(1, 2), (0, 2), (2,), None])),
      pooling_chunk_size=draw(st.integers(1, 4)), top_k=draw(st.integers(1, 4)),
      rope_mode=draw(st.sampled_from(["document", "global"])),
      routing_tokens=draw(st.sampled_from(["question", "question_and_target"])))
  b, n, t, l, m = 2, 5, 3, 7, 6
  doc_lens = [draw(st.lists(st.integers(0, l), min_size=n, max_size=n)) for _ in range(b)]
  active_lens = draw(st.lists(st.integers(1, m), min_size=b, max_size=b))
  question_lens = [draw(st.integers(1, a)) for a in active_lens]
  prefix_lens = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
  seed = draw(st.integers(0, 2**16))
  batch = R.make_batch(np.random.default_rng(seed), vocab=VOCAB, prefix_lens=prefix_lens,
                       doc_lens=doc_lens, active_lens=active_lens, question_lens=question_lens,
                       T=t, L=l, M=m)
  return cfg, batch, seed


@settings(max_examples=8, deadline=None, derandomize=True)
@given(case=msa_cases())
def test_forward_matches_reference(case):
  """SPEC §2-§3 end to end: document counts incl. N < k, padding document slots, lengths not
  divisible by P, padding in prefix/question/active, empty prefix, GQA ratios 2/1/4 (and H=6),
  both RoPE modes, both routing-token modes, several router-layer sets."""
  cfg, batch, seed = case
  model, variables = R.init_model(cfg, batch, seed)
  ref = R.msa_forward(R.to_numpy_params(variables), cfg, batch)
  assume(clear_selection_margins(cfg, ref))
  out = jax.jit(model.apply)(variables, batch)   # one compile per drawn config
  r = len(cfg.router_layer_ids)
  assert out.doc_scores_brn.shape == (2, r, batch.doc_tokens.shape[1])
  assert out.selected_brk.shape == (2, r, cfg.top_k)
  check_against_reference(cfg, batch, out, ref)


FIXED_DOC_LENS = [[5, 0, 7, 2, 4], [4, 4, 0, 1, 0]]


def test_global_rope_with_position_gaps_matches_reference():
  """``data.global_position_span``'s gaps (``MSABatch.doc_position_gaps``) move global-RoPE
  documents and the question as the float64 reference numbers them; a gap before the
  question changes the logits, one shift of everything (no prefix) does not."""
  cfg = tiny_config(rope_mode="global")
  batch = fixed_batch(seed=5, prefix_lens=[0, 0])
  model, variables = R.init_model(cfg, batch, 5)
  apply = jax.jit(model.apply)
  n = batch.doc_tokens.shape[1]
  gaps = np.asarray([[40, 0, 90, 7, 120, 33], [0, 61, 0, 18, 0, 200]], np.int32)
  assert gaps.shape == (2, n + 1)
  gapped = batch.replace(doc_position_gaps=gaps)
  out = apply(variables, gapped)
  ref = R.msa_forward(R.to_numpy_params(variables), cfg, gapped)
  check_against_reference(cfg, gapped, out, ref)
  plain = apply(variables, batch)
  assert R.rel_err(out.logits_bmv, plain.logits_bmv) > 1e-3
  shifted = np.zeros_like(gaps)
  shifted[:, 0] = 500
  same = apply(variables, batch.replace(doc_position_gaps=shifted))
  assert R.rel_err(same.logits_bmv, plain.logits_bmv) < 1e-4


def fixed_batch(seed=0, **kw):
  args = dict(vocab=VOCAB, prefix_lens=[3, 0], doc_lens=FIXED_DOC_LENS, active_lens=[6, 4],
              question_lens=[3, 2])
  args.update(kw)
  return R.make_batch(np.random.default_rng(seed), **args)


@pytest.mark.parametrize("doc_lens,k,t", [([[3], [0]], 3, 0), ([[2, 5], [0, 0]], 4, 2)])
def test_fewer_document_slots_than_k_and_no_prefix(doc_lens, k, t):
  """SPEC §3.3: with N < k document slots all real documents are selected (and an example
  with only padding documents selects none); an absent prefix (T = 0) is allowed (SPEC §2)."""
  cfg = tiny_config(top_k=k)
  batch = fixed_batch(doc_lens=doc_lens, prefix_lens=[t, 0])
  model, variables = R.init_model(cfg, batch, 7)
  out = jax.jit(model.apply)(variables, batch)
  ref = R.msa_forward(R.to_numpy_params(variables), cfg, batch)
  check_against_reference(cfg, batch, out, ref)
  real = [n for n, ln in enumerate(doc_lens[0]) if ln]
  for j in range(2):
    np.testing.assert_array_equal(np.asarray(out.selected_brk[0, j])[:len(real)], real)
    assert not np.any(np.asarray(out.selected_valid_brk[1, j]))


def test_forward_matches_reference_under_jit_with_defaults():
  """The default routing set-up (question tokens, document RoPE, upper-half router layers)
  under jit, with an untied LM head."""
  cfg = tiny_config(num_layers=4, router_layers=None, tie_word_embeddings=False)
  batch = fixed_batch()
  model, variables = R.init_model(cfg, batch, 3)
  out = jax.jit(model.apply)(variables, batch)
  ref = R.msa_forward(R.to_numpy_params(variables), cfg, batch)
  assert clear_selection_margins(cfg, ref)
  assert cfg.router_layer_ids == (2, 3)
  check_against_reference(cfg, batch, out, ref)


def test_identical_documents_tie_to_the_lower_index():
  """SPEC §3.3 inside the model: two identical documents score identically; with k=1 the
  lower slot wins (and documents 'compete' on score alone, not on slot)."""
  cfg = tiny_config(top_k=1)
  batch = fixed_batch(doc_lens=[[4, 4, 4], [4, 4, 4]])
  docs = np.array(batch.doc_tokens)
  model, variables = R.init_model(cfg, batch, 5)
  out = jax.jit(model.apply)(variables, batch)
  # Make the best-scored document of each example (per the first router layer) appear
  # twice: copy it into a lower and a higher slot.
  best = np.asarray(jnp.argmax(out.doc_scores_brn[:, 0], axis=-1))
  for b in range(2):
    docs[b, :] = docs[b, best[b]]
  batch = batch.replace(doc_tokens=docs)
  out = jax.jit(model.apply)(variables, batch)
  s = np.asarray(out.doc_scores_brn)
  np.testing.assert_array_equal(s[:, :, 0], s[:, :, 1])
  np.testing.assert_array_equal(np.asarray(out.selected_brk[..., 0]), 0)


def test_no_routing_token_selects_nothing():
  """SPEC §3.2: an example without any question token has no routing query: every document
  scores -inf and nothing is selected (the active tokens still see prefix and themselves)."""
  cfg = tiny_config()
  batch = fixed_batch(question_lens=[0, 2])
  model, variables = R.init_model(cfg, batch, 1)
  out = jax.jit(model.apply)(variables, batch)
  assert np.all(np.asarray(out.doc_scores_brn[0]) == -np.inf)
  assert not np.any(np.asarray(out.selected_valid_brk[0]))
  ref = R.msa_forward(R.to_numpy_params(variables), cfg, batch)
  check_against_reference(cfg, batch, out, ref)


@pytest.mark.parametrize("tie", [True, False])
def test_plain_lm_is_qwen3(tie):
  """SPEC §1: with no memory, ``model.apply(vars, input_ids)`` is exactly Qwen3 (checked
  against the float64 reference Qwen3, tied and untied LM head)."""
  cfg = tiny_config(tie_word_embeddings=tie)
  batch = fixed_batch()
  model, variables = R.init_model(cfg, batch, 2)
  ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 9))
  logits = model.apply(variables, ids)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 9, VOCAB)
  ref = R.qwen3_logits(R.to_numpy_params(variables), cfg, ids)
  assert R.rel_err(logits, ref) < RTOL


# --------------------------------------------------------------------------- SPEC §4 losses


_lm_loss = jax.jit(losses.lm_loss)
_infonce = jax.jit(losses.infonce_decoupled, static_argnums=3)
_metrics = jax.jit(losses.router_metrics, static_argnames="ks")


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_losses_and_metrics_match_reference(seed):
  """SPEC §4: L_LM is mean next-token CE over target positions only; decoupled InfoNCE
  (τ=0.1) leaves other positives out of the denominator and padding documents out of
  everything, averaged over (example, layer) pairs with a positive; recall@K and precision@k
  as logged in training."""
  rng = np.random.default_rng(seed)
  b, n, m, v, r, k = 3, 6, 5, 11, 2, 3
  logits = rng.normal(size=(b, m, v)).astype(np.float32) * 3
  targets = rng.integers(0, v, size=(b, m)).astype(np.int32)
  loss_mask = rng.random((b, m)) < 0.5
  loss, count = _lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(loss_mask))
  ref_loss, ref_count = R.lm_loss(logits, targets, loss_mask)
  assert int(count) == ref_count
  assert abs(float(loss) - ref_loss) <= RTOL * max(abs(ref_loss), 1.0)

  valid = rng.random((b, n)) < 0.8            # padding document slots
  positive = (rng.random((b, n)) < 0.4) & valid   # some examples have no positive
  scores = np.where(valid[:, None, :], rng.uniform(-1, 1, size=(b, r, n)), -np.inf)
  scores = scores.astype(np.float32)
  aux, pairs = _infonce(jnp.asarray(scores), jnp.asarray(positive), jnp.asarray(valid), 0.1)
  ref_aux, ref_pairs = R.infonce_decoupled(scores.astype(np.float64), positive, valid, 0.1)
  assert int(pairs) == ref_pairs
  assert abs(float(aux) - ref_aux) <= RTOL * max(abs(ref_aux), 1.0)

  sel = np.zeros((b, r, k), np.int32)
  sel_valid = np.zeros((b, r, k), bool)
  for bb in range(b):
    for rr in range(r):
      chosen = R.select_top_k(scores[bb, rr], k, valid[bb])
      sel[bb, rr, :len(chosen)] = chosen
      sel_valid[bb, rr, :len(chosen)] = True
  got = _metrics(jnp.asarray(scores), jnp.asarray(sel), jnp.asarray(sel_valid),
                              jnp.asarray(positive), jnp.asarray(valid), ks=(1, 2, 5))
  want = R.router_metrics(scores, sel, sel_valid, positive, valid, ks=(1, 2, 5))
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=RTOL, atol=1e-7, err_msg=key)


def test_infonce_decoupled_by_hand():
  """SPEC §4 worked example: s = [.5, .2, -.1, pad], Pos = {0, 1}, τ = 0.1:
  L = -(1/2)[log(e^5/(e^5+e^-1)) + log(e^2/(e^2+e^-1))]; the other positive is NOT in the
  denominator; the padding document (score 9, larger than all) is ignored."""
  s = jnp.array([[[0.5, 0.2, -0.1, 9.0]]])
  pos = jnp.array([[True, True, False, False]])
  valid = jnp.array([[True, True, True, False]])
  loss, pairs = losses.infonce_decoupled(s, pos, valid, 0.1)
  want = -0.5 * (np.log(np.exp(5) / (np.exp(5) + np.exp(-1)))
                 + np.log(np.exp(2) / (np.exp(2) + np.exp(-1))))
  assert int(pairs) == 1
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_losses_of_a_full_forward_match_reference():
  """SPEC §4 on real model outputs: LM loss on target positions and the aux loss over the
  per-layer document scores of the forward, both against the reference forward."""
  cfg = tiny_config()
  batch = fixed_batch(seed=4)
  model, variables = R.init_model(cfg, batch, 4)
  out = jax.jit(model.apply)(variables, batch)
  ref = R.msa_forward(R.to_numpy_params(variables), cfg, batch)
  assert clear_selection_margins(cfg, ref)
  b, m = batch.active_tokens.shape
  ref_logits = np.zeros((b, m, VOCAB))
  for bb, r in enumerate(ref):
    ref_logits[bb, np.asarray(batch.active_mask[bb], bool)] = r["logits"]
  lm, _ = losses.lm_loss(out.logits_bmv, jnp.asarray(batch.targets), jnp.asarray(batch.loss_mask))
  ref_lm, _ = R.lm_loss(ref_logits, batch.targets, batch.loss_mask)
  assert abs(float(lm) - ref_lm) <= RTOL * abs(ref_lm)
  valid = np.asarray(batch.doc_mask).any(-1)
  ref_scores = np.full((b, 2, valid.shape[1]), -np.inf)
  for bb, r in enumerate(ref):
    for j, layer in enumerate(R.router_ids(cfg)):
      for slot, s in r["scores"][layer].items():
        ref_scores[bb, j, slot] = s
  aux, _ = losses.infonce_decoupled(out.doc_scores_brn, jnp.asarray(batch.positive_docs),
                                    losses.doc_valid(batch.doc_mask))
  ref_aux, _ = R.infonce_decoupled(ref_scores, batch.positive_docs, valid)
  # doc scores carry 1e-5 abs error, amplified by 1/τ = 10 inside the exponent.
  assert abs(float(aux) - ref_aux) <= 1e-4 * max(abs(ref_aux), 1.0)
