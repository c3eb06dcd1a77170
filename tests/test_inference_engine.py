"""The inference engine (SPEC §5) against the training forward it must equal.

A random tiny model (3 layers, router layers 1-2, P 3, k 2, GQA 4/2) and one example with a
prefix and six documents of 1-8 tokens. The documents are encoded into an on-disk bank by
the encoder (stage 1); the engine prefills the question (stage 2: routing over the bank in
every router layer, on 1 or 8 memory shards, K̄/V̄ on the devices or in host memory) and
then decodes the target one token at a time from its KV cache (stage 3). Logits must equal
the training forward's on the same example (float32, normwise 1e-5) and the selected
documents must be the same.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from msa_jax.data.collate import BucketShapes, collate
from msa_jax.data.example import Document, Example
from msa_jax.inference import bank as bank_lib
from msa_jax.inference import engine as engine_lib
from msa_jax.inference.encode import encode_corpus
from msa_jax.inference.memory import DeviceBank
from tests import reference_numpy as R
from tests.test_reference_forward import tiny_config

fast_compile = R.fast_compile_fixture()
CFG = tiny_config()
DOC_LENS = (5, 1, 8, 3, 7, 2)


def _example(rng):
  docs = [Document(f"d{i}", rng.integers(1, CFG.vocab_size, n).tolist())
          for i, n in enumerate(DOC_LENS)]
  return Example(prefix=rng.integers(1, CFG.vocab_size, 3).tolist(), docs=docs,
                 question=rng.integers(1, CFG.vocab_size, 3).tolist(),
                 target=rng.integers(1, CFG.vocab_size, 4).tolist(), positive_doc_ids=["d2"])


def write_corpus(path, docs):
  with open(path, "w") as f:
    for d in docs:
      f.write(json.dumps({"id": d.doc_id, "tokens": d.tokens}) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  rng = np.random.default_rng(3)
  ex = _example(rng)
  batch = collate([ex], BucketShapes(1, 3, len(DOC_LENS), 9, 8))
  model, variables = R.init_model(CFG, batch, 5)
  out = jax.jit(model.apply)(variables, batch)
  tmp = tmp_path_factory.mktemp("bank")
  write_corpus(tmp / "corpus.jsonl", ex.docs)
  encode_corpus(model, variables["params"], str(tmp / "corpus.jsonl"), str(tmp / "bank"),
                tokenizer=None, prefix_tokens=ex.prefix, window_tokens=10, log=lambda *_: None)
  return ex, batch, model, variables["params"], out, str(tmp / "bank")


def _engine_logits(setup, shards, placement, route_rows=None):
  """Prefill the question, then teacher-force the target through the KV cache."""
  ex, _, model, params, _, path = setup
  bank = bank_lib.open_bank(path, bank_lib.model_fingerprint(model.config, params))
  mesh = Mesh(np.array(jax.devices()[:shards]), ("memory",))
  placed = DeviceBank.load(bank, mesh, kv_placement=placement, tile=4, log=lambda *_: None)
  eng = engine_lib.Engine(model, params, "bank", placed.settings)
  q = len(ex.question)
  m = 8
  tokens = np.zeros((1, m), np.int32)
  tokens[0, :q] = ex.question
  start = np.array([engine_lib.active_start(model.config, len(ex.prefix))], np.int32)
  prefix = engine_lib.bank_prefix(bank, 1)
  logits, decisions, cache = eng._prefill(params, placed.arrays(), prefix, jnp.asarray(tokens),
                                          jnp.array([q], jnp.int32), jnp.asarray(start), None,
                                          all_logits=True, route_rows=route_rows)
  rows = [np.asarray(logits[0, :q])]
  # one buffer a layer, [context ; active slots ; padding], read by the attention as it is
  assert all(k.shape[1] % engine_lib.KV_TILE == 0 and k.shape[1] >= c.shape[1] + m
             for k, c in zip(cache.k, cache.context_mask))
  active = ex.question + ex.target
  for i in range(q, len(active) - 1):
    step_logits, cache = eng.decode(cache, np.array([active[i]]), np.array([i]), start)
    rows.append(np.asarray(step_logits))
  with pytest.raises(ValueError, match=f"holds {m} active slots"):
    eng.decode(cache, np.array([0]), np.array([m]), start)
  selected = [np.asarray(d.doc_idx_bk[0])[np.asarray(d.valid_bk[0])] for d in decisions]
  return np.concatenate(rows, 0), selected


@pytest.mark.parametrize("shards,placement", [(1, "device"), (8, "device"), (8, "host")])
def test_engine_equals_training_forward(setup, shards, placement):
  """Stages 1-3 through the bank give the training forward's logits (≤ 1e-5) and choices,
  whether the bank is on one device or sharded over 8 (6 documents: some shards hold
  none), and whether K̄/V̄ are fetched from host memory or gathered on the devices."""
  ex, batch, _, _, out, _ = setup
  logits, selected = _engine_logits(setup, shards, placement)
  n_active = len(ex.question) + len(ex.target) - 1
  assert R.rel_err(logits, np.asarray(out.logits_bmv[0, :n_active])) < 1e-5
  for j, sel in enumerate(selected):
    want = np.asarray(out.selected_brk[0, j])[np.asarray(out.selected_valid_brk[0, j])]
    np.testing.assert_array_equal(sel, want)
  assert all(len(s) == CFG.top_k for s in selected)


@pytest.mark.parametrize("route_rows", [3, 4])
def test_routing_with_the_question_rows_only_changes_nothing(setup, route_rows):
  """``route_rows``: the router reads only the leading slots that hold questions (3 tokens
  here, of an 8-slot buffer); logits and choices equal routing with every slot."""
  want_logits, want_selected = _engine_logits(setup, 2, "device")
  logits, selected = _engine_logits(setup, 2, "device", route_rows=route_rows)
  np.testing.assert_array_equal(logits, want_logits)
  for got, want in zip(selected, want_selected):
    np.testing.assert_array_equal(got, want)


def test_route_rows_shorter_than_a_question_is_an_error(setup):
  ex, _, model, params, _, path = setup
  bank = bank_lib.open_bank(path)
  placed = DeviceBank.load(bank, Mesh(np.array(jax.devices()[:1]), ("memory",)),
                           log=lambda *_: None)
  eng = engine_lib.Engine(model, params, "bank", placed.settings)
  with pytest.raises(ValueError, match="question of 3 tokens does not fit in route_rows=2"):
    eng.prefill(placed.arrays(), engine_lib.bank_prefix(bank, 1), np.zeros((1, 8), np.int32),
                np.array([3]), np.array([4]), route_rows=2)


def _bank_engine(setup, shards: int):
  """``(bank, placed bank on a memory mesh of shards devices, Engine)`` of the setup's bank."""
  _, _, model, params, _, path = setup
  bank = bank_lib.open_bank(path)
  placed = DeviceBank.load(bank, Mesh(np.array(jax.devices()[:shards]), ("memory",)),
                           log=lambda *_: None)
  return bank, placed, engine_lib.Engine(model, params, "bank", placed.settings)


def test_greedy_kv_cache_decoding_equals_full_forward_per_step(setup):
  """Greedy decoding from the KV cache picks the tokens (and logits, ≤ 1e-5) that re-running
  the whole training forward on question + tokens so far picks at every step."""
  ex, _, model, params, _, _ = setup
  bank, placed, eng = _bank_engine(setup, shards=2)
  q, steps, m = len(ex.question), 5, 16
  tokens = np.zeros((1, m), np.int32)
  tokens[0, :q] = ex.question
  start = np.array([engine_lib.active_start(model.config, len(ex.prefix))], np.int32)
  logits, _, cache = eng.prefill(placed.arrays(), engine_lib.bank_prefix(bank, 1), tokens,
                                 np.array([q]), start)
  got_tokens, got_logits = [], []
  for i in range(steps):
    tok = int(np.argmax(np.asarray(logits[0])))
    got_tokens.append(tok)
    got_logits.append(np.asarray(logits[0]))
    logits, cache = eng.decode(cache, np.array([tok]), np.array([q + i]), start)
  forward = jax.jit(model.apply)
  generated = []
  for i in range(steps):
    full = ex.question + generated
    step_ex = Example(prefix=ex.prefix, docs=ex.docs, question=ex.question,
                      target=generated + [0] if generated else [0], positive_doc_ids=["d2"])
    b = collate([step_ex], BucketShapes(1, 3, len(DOC_LENS), 9, 16))
    ref = np.asarray(forward({"params": params}, b).logits_bmv[0, len(full) - 1])
    assert R.rel_err(got_logits[i], ref) < 1e-5, i
    assert int(np.argmax(ref)) == got_tokens[i], i
    generated.append(got_tokens[i])


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 0.9)])
def test_device_decode_loop_equals_the_host_loop(setup, temperature, top_p):
  """``Engine.decode_tokens`` (sample and decode in one device loop) gives the tokens and the
  final key of the host loop it replaced (split the key, sample, stop a row at a stop token,
  decode unless every row stopped or the last token was sampled), batch 2 with one row
  already finished (samples nothing) and a stop token that ends the other row early."""
  ex, _, model, _, _, _ = setup
  bank, placed, eng = _bank_engine(setup, shards=1)
  q, m, new = len(ex.question), 16, 6
  tokens = np.zeros((2, m), np.int32)
  tokens[:, :q] = ex.question
  tokens[1, 0] = 7
  start = np.full((2,), engine_lib.active_start(model.config, len(ex.prefix)), np.int32)
  prefix = engine_lib.bank_prefix(bank, 2)

  def prefill():
    return eng.prefill(placed.arrays(), prefix, tokens, np.array([q, q]), start)

  def host_loop(stops, finished):
    logits, _, cache = prefill()
    key, out, cur = jax.random.PRNGKey(4), [[], []], np.array([q, q])
    finished = np.array(finished)
    for step in range(new):
      key, sub = jax.random.split(key)
      tok = np.asarray(eng.sample(logits, sub, temperature, top_p))
      for i in range(2):
        if not finished[i]:
          out[i].append(int(tok[i]))
          finished[i] = int(tok[i]) in stops
      if finished.all() or step == new - 1:
        break
      logits, cache = eng.decode(cache, tok, cur, start)
      cur = cur + 1
    return out, key

  free, _ = host_loop(set(), [False, False])
  stop = free[1][2]                              # row 1 stops at its third token
  for stops, finished in ((set(), [False, False]), ({stop}, [True, False])):
    want, want_key = host_loop(stops, finished)
    logits, _, cache = prefill()
    toks, key = eng.decode_tokens(cache, logits, jax.random.PRNGKey(4), np.array([q, q]), start,
                                  np.array(finished), max_new_tokens=new,
                                  temperature=temperature, top_p=top_p, stop_ids=stops)
    got = [[int(t) for t in row if t >= 0] for row in np.asarray(toks)]
    assert got == want, (stops, finished)
    np.testing.assert_array_equal(np.asarray(key), np.asarray(want_key))
  assert want[0] == [] and want[1][-1] == stop and len(want[1]) <= 3
  logits, _, cache = prefill()
  with pytest.raises(ValueError, match="need 17 active slots, but the KV cache holds 16"):
    eng.decode_tokens(cache, logits, jax.random.PRNGKey(0), np.array([q, 12]), start,
                      np.array([False, False]), max_new_tokens=6)


def test_sampling_is_seeded_and_respects_top_p():
  """temperature 0 is argmax; top_p keeps only the nucleus; the same key gives the same draw."""
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  assert int(engine_lib.sample(logits, jax.random.PRNGKey(0), 0.0, 1.0)[0]) == 0
  draws = {int(engine_lib.sample(logits, jax.random.PRNGKey(s), 1.0, 0.7)[0]) for s in range(64)}
  assert draws == {0, 1}          # 0.5 + 0.3 ≥ 0.7: tokens 2 and 3 are cut
  a = engine_lib.sample(logits, jax.random.PRNGKey(7), 1.0, 1.0)
  np.testing.assert_array_equal(a, engine_lib.sample(logits, jax.random.PRNGKey(7), 1.0, 1.0))
  all_draws = {int(engine_lib.sample(logits, jax.random.PRNGKey(s), 1.0, 1.0)[0])
               for s in range(200)}
  assert all_draws == {0, 1, 2, 3}


def test_device_bank_route_options_reach_the_pallas_route(setup):
  """``DeviceBank.load(route_options=...)`` overrides the Pallas route's block sizes (e.g.
  two fp8 query terms instead of the engine's one); without it the engine's defaults."""
  bank = bank_lib.open_bank(setup[-1])
  mesh = Mesh(np.array(jax.devices()[:1]), ("memory",))
  terms = [DeviceBank.load(bank, mesh, routing_impl="pallas", log=lambda *_: None, **kw)
           .settings.route_block_sizes(1024, "float8_e4m3fn").fp8_query_terms
           for kw in ({}, {"route_options": [("fp8_query_terms", 2)]})]
  assert terms == [1, 2]
