"""The bank's routing, its on-disk format and the encoder's guarantees (SPEC §5).

* Tiled top-k over a chunk bank equals ``routing.route_documents`` exactly (ties to the
  lower index), with documents cut by tile edges, longer than a tile, and padding; the
  memory-parallel version over 8 CPU devices equals one device for banks whose size is not
  a multiple of the shard count.
* An encode killed part-way (and one killed mid-window, leaving uncommitted bytes) resumes
  into a bank byte-identical to an uninterrupted encode.
* A bank from another model, a truncated bank file and bad corpus rows are refused with
  messages that name the fingerprints, the file, and the lines.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from msa_jax import routing
from msa_jax.data.collate import BucketShapes, collate
from msa_jax.data.example import Document, Example
from msa_jax.inference import bank as bank_lib
from msa_jax.inference.bank_routing import (NO_DOC, merge_top_k, selection_in_document_order,
                                            sharded_top_k, tiled_top_k)
from msa_jax.inference.encode import CorpusError, encode_corpus
from msa_jax.inference.memory import shard_plan
from tests import reference_numpy as R
from tests.test_reference_forward import tiny_config

fast_compile = R.fast_compile_fixture()


def random_bank(rng, doc_chunks, f=8, quantise=False):
  """A bank of unit keys; ``quantise`` makes keys small integers (not normalised), so that
  with integer queries every score is an exact integer and equal scores are real ties in
  any summation order (the routing code does not need unit keys)."""
  c = int(sum(doc_chunks))
  kr = rng.normal(size=(c, f)).astype(np.float32)
  if quantise:
    kr = np.round(kr)
    kr[np.all(kr == 0, axis=1), 0] = 1.0
  else:
    kr /= np.linalg.norm(kr, axis=1, keepdims=True)
  chunk_doc = np.repeat(np.arange(len(doc_chunks), dtype=np.int32), doc_chunks)
  return kr, chunk_doc


def reference_top_k(rq, mask, kr, chunk_doc, n, k):
  doc_s, sel = routing.route_documents(jnp.asarray(rq), jnp.asarray(mask), jnp.asarray(kr),
                                       jnp.asarray(chunk_doc), n, k)
  return np.asarray(doc_s), sel


@pytest.mark.parametrize("tile,quantise", [(4, False), (5, True), (64, False), (16, True),
                                           (None, True)])
def test_tiled_top_k_equals_reference(tile, quantise):
  """Documents of 1-9 chunks cut by tile edges (tile 4, 5) or inside one tile (64), with
  ties (quantised keys) and a second example whose only routing token is masked."""
  rng = np.random.default_rng(tile)
  doc_chunks = rng.integers(1, 10, 23)
  kr, chunk_doc = random_bank(rng, doc_chunks, quantise=quantise)
  rq = rng.normal(size=(3, 4, 8)).astype(np.float32)
  if quantise:
    rq = np.round(rq)
  mask = np.ones((3, 4), bool)
  mask[1, 2:] = False
  mask[2] = False                                   # no routing token: nothing selected
  k = 5
  scores, docs = tiled_top_k(jnp.asarray(rq), jnp.asarray(mask), jnp.asarray(kr),
                             jnp.asarray(chunk_doc), k, tile)
  doc_s, sel = reference_top_k(rq, mask, kr, chunk_doc, len(doc_chunks), k)
  got_sel, got_scores = selection_in_document_order(scores, docs)
  np.testing.assert_array_equal(np.asarray(got_sel.valid_bk), np.asarray(sel.valid_bk))
  np.testing.assert_array_equal(np.asarray(got_sel.doc_idx_bk), np.asarray(sel.doc_idx_bk))
  want = np.take_along_axis(doc_s, np.asarray(sel.doc_idx_bk), 1)
  valid = np.asarray(sel.valid_bk)
  np.testing.assert_allclose(np.asarray(got_scores)[valid], want[valid], rtol=1e-6)
  assert not valid[2].any() and np.all(np.asarray(docs)[2] == NO_DOC)


def test_fewer_documents_than_k_and_padding_chunks():
  """3 documents, k 5: all three win, two empty slots; trailing padding chunks (-1) ignored."""
  rng = np.random.default_rng(0)
  kr, chunk_doc = random_bank(rng, [2, 1, 3])
  kr = np.concatenate([kr, np.ones((4, 8), np.float32)])   # padding keys that would win
  chunk_doc = np.concatenate([chunk_doc, -np.ones(4, np.int32)])
  rq = rng.normal(size=(1, 2, 8)).astype(np.float32)
  scores, docs = tiled_top_k(jnp.asarray(rq), jnp.ones((1, 2), bool), jnp.asarray(kr),
                             jnp.asarray(chunk_doc), 5, 4)
  assert sorted(np.asarray(docs)[0, :3].tolist()) == [0, 1, 2]
  assert np.all(np.asarray(scores)[0, 3:] == -np.inf)


def test_merge_top_k_breaks_ties_by_document():
  s = jnp.array([[1.0, 2.0, 2.0, -jnp.inf, 2.0]])
  d = jnp.array([[0, 9, 4, 1, 7]])
  scores, docs = merge_top_k(s, d, 4)
  np.testing.assert_array_equal(np.asarray(docs)[0], [4, 7, 9, 0])
  np.testing.assert_array_equal(np.asarray(scores)[0], [2.0, 2.0, 2.0, 1.0])


@pytest.mark.parametrize("num_docs", [13, 50])
def test_memory_parallel_routing_equals_one_device(num_docs):
  """The bank split into 8 shards of whole documents (13 and 50 documents: not multiples
  of 8), scored per shard, merged globally: the same top-k as one device."""
  rng = np.random.default_rng(num_docs)
  doc_chunks = rng.integers(1, 7, num_docs)
  kr, chunk_doc = random_bank(rng, doc_chunks)
  rq = jnp.asarray(rng.normal(size=(2, 3, 8)).astype(np.float32))
  mask = jnp.ones((2, 3), bool)
  k = 4
  one = tiled_top_k(rq, mask, jnp.asarray(kr), jnp.asarray(chunk_doc), k, 4)
  shards = 8
  bounds = shard_plan(doc_chunks, shards)
  cb = np.concatenate([[0], np.cumsum(doc_chunks)])[bounds]
  rows = -(-int(np.diff(cb).max()) // 4) * 4
  kr_s = np.zeros((shards * rows, 8), np.float32)
  doc_s = -np.ones(shards * rows, np.int32)
  for s in range(shards):
    n = cb[s + 1] - cb[s]
    kr_s[s * rows:s * rows + n] = kr[cb[s]:cb[s + 1]]
    doc_s[s * rows:s * rows + n] = chunk_doc[cb[s]:cb[s + 1]]
  mesh = Mesh(np.array(jax.devices()[:shards]), ("memory",))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("memory")))
  many = jax.jit(lambda *a: sharded_top_k(mesh, *a, k, tile=4))(rq, mask, put(kr_s), put(doc_s))
  np.testing.assert_array_equal(np.asarray(many[1]), np.asarray(one[1]))
  np.testing.assert_allclose(np.asarray(many[0]), np.asarray(one[0]), rtol=1e-6)


def test_shard_plan_keeps_documents_whole_and_balanced():
  chunks = np.array([5, 1, 1, 1, 1, 1, 10, 2])
  bounds = shard_plan(chunks, 3)
  assert bounds[0] == 0 and bounds[-1] == len(chunks)
  assert np.all(np.diff(bounds) >= 0)
  assert shard_plan(np.array([3]), 8).tolist() == [0] + [1] * 8


# --------------------------------------------------------------------------- encoder


CFG = tiny_config(top_k=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  rng = np.random.default_rng(9)
  docs = [Document(f"doc-{i}", rng.integers(1, CFG.vocab_size, int(n)).tolist())
          for i, n in enumerate(rng.integers(1, 12, 40))]
  ex = Example(prefix=[1, 2], docs=docs[:3], question=[3], target=[4], positive_doc_ids=[])
  model, variables = R.init_model(CFG, collate([ex], BucketShapes(1, 2, 3, 12, 2)), 2)
  tmp = tmp_path_factory.mktemp("enc")
  corpus = tmp / "corpus.jsonl"
  with open(corpus, "w") as f:
    for d in docs:
      f.write(json.dumps({"id": d.doc_id, "tokens": d.tokens}) + "\n")
  return model, variables["params"], str(corpus), tmp


def _encode(tiny, bank, **kw):
  model, params, corpus, _ = tiny
  return encode_corpus(model, params, corpus, bank, tokenizer=None, prefix_tokens=[1, 2],
                       window_tokens=60, log=lambda *_: None, **kw)


def _files(path):
  return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def test_interrupted_encode_resumes_to_an_identical_bank(tiny):
  """Killed after one committed window, then again mid-window (bytes past the commit in
  every file): the resumed bank equals an uninterrupted encode byte for byte."""
  _, _, _, tmp = tiny
  whole = str(tmp / "whole")
  assert _encode(tiny, whole)["complete"]
  part = str(tmp / "part")
  m = _encode(tiny, part, max_windows=1)
  assert not m["complete"] and 0 < m["corpus"]["rows_done"] < 40
  with pytest.raises(bank_lib.BankError, match="incomplete"):
    bank_lib.open_bank(part)
  m = _encode(tiny, part, max_windows=1)          # a second window
  for name in ("layer_01.kr", "doc_tokens.i32", "docs.jsonl", "chunk_doc.i32"):
    with open(os.path.join(part, name), "ab") as f:   # a kill mid-write of the third
      f.write(b"\x07" * 13)
  assert _encode(tiny, part)["complete"]
  assert _files(part) == _files(whole)
  bank = bank_lib.open_bank(part, verify=True)
  assert bank.num_docs == 40 and bank.doc_ids[:2] == ["doc-0", "doc-1"]
  assert bank.doc_tokens(5) == json.loads(open(tiny[2]).readlines()[5])["tokens"]


def test_a_failed_write_stops_the_encode_and_the_bank_resumes_from_its_last_commit(
    tiny, monkeypatch):
  """Windows are written on a thread while the next is encoded: an error in a write
  reaches the caller, the windows committed before it stay, and a rerun completes the
  bank byte for byte as an uninterrupted encode."""
  _, _, _, tmp = tiny
  whole, part = str(tmp / "whole_w"), str(tmp / "failed_w")
  assert _encode(tiny, whole)["complete"]
  real_append, calls = bank_lib.BankWriter.append, []

  def failing_append(self, *args, **kw):
    calls.append(1)
    if len(calls) == 3:
      raise OSError("disk full (injected)")
    return real_append(self, *args, **kw)

  monkeypatch.setattr(bank_lib.BankWriter, "append", failing_append)
  with pytest.raises(OSError, match="disk full"):
    _encode(tiny, part)
  monkeypatch.setattr(bank_lib.BankWriter, "append", real_append)
  with open(os.path.join(part, bank_lib.MANIFEST)) as f:
    m = json.load(f)
  assert not m["complete"] and 0 < m["corpus"]["rows_done"] < 40   # two windows committed
  assert _encode(tiny, part)["complete"]
  assert _files(part) == _files(whole)


def _global_rope(model):
  """The same model (same parameters fit it) with global RoPE positions."""
  return type(model)(model.config.replace(rope_mode="global"))


def test_global_rope_positions_continue_across_windows(tiny):
  """Global RoPE numbers each document after every token before it, across windows
  written while the next is encoded: windows of 60 tokens give the bank one window
  gives; and the positions matter (document-wise RoPE gives other keys)."""
  model, params, corpus, tmp = tiny
  glob = _global_rope(model)
  banks = {}
  for name, m_, window in (("g60", glob, 60), ("g_all", glob, 1 << 20), ("d_all", model, 1 << 20)):
    path = str(tmp / name)
    assert encode_corpus(m_, params, corpus, path, tokenizer=None, prefix_tokens=[1, 2],
                         window_tokens=window, log=lambda *_: None)["complete"]
    banks[name] = bank_lib.open_bank(path)
  _assert_same_chunks(banks["g60"], banks["g_all"])
  last = banks["g_all"].router_layers[-1]
  assert not np.allclose(np.asarray(banks["g_all"].k(last), np.float32),
                         np.asarray(banks["d_all"].k(last), np.float32), atol=1e-3)


def test_router_keys_do_not_depend_on_a_documents_global_offset(tiny):
  """K̄R has no RoPE and a document attends only to itself, so its router keys depend on
  relative positions alone: the same at offset 0 and at 99.9M (where a global-RoPE bank
  of 100M tokens numbers its last documents). With float32 angles `position × ω` they
  were not (up to 3 rad off there)."""
  from msa_jax.inference.encode import Encoder
  model, params, _, _ = tiny
  glob = _global_rope(model)
  rng = np.random.default_rng(3)
  docs = [bank_lib.DocRecord(f"d{i}", rng.integers(1, CFG.vocab_size, 11).tolist(), 0)
          for i in range(4)]
  enc = Encoder(glob, params, batch_tokens=64)
  near, _ = enc.encode(docs, [0, 11, 22, 33])
  far, _ = enc.encode(docs, [99_861_000 + 11 * i for i in range(4)])
  for i in near:
    np.testing.assert_allclose(far[i]["kr"], near[i]["kr"], rtol=1e-4, atol=2e-5)


def test_padded_widths():
  from msa_jax.inference.encode import padded_widths
  lengths = np.array([100, 100, 37, 128, 129])
  widths, level = padded_widths(lengths, 64)
  assert widths == [64, 128, 192] and level.tolist() == [1, 1, 0, 1, 2]
  widths, level = padded_widths(lengths, 64, width_multiple=8)
  assert widths == [40, 104, 128, 136] and level.tolist() == [1, 1, 0, 2, 3]
  with pytest.raises(ValueError, match="width_multiple=-8"):
    padded_widths(lengths, 64, width_multiple=-8)


def _assert_same_chunks(a, b):
  """Two banks hold the same chunks: chunk→document map exactly, K̄R/K̄/V̄ to float rounding."""
  np.testing.assert_array_equal(np.asarray(a.chunk_doc), np.asarray(b.chunk_doc))
  for i in a.router_layers:
    for part in ("kr", "k", "v"):
      x, y = (np.asarray(getattr(bank, part)(i), np.float32) for bank in (a, b))
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=f"layer {i} {part}")


def test_documents_padded_to_a_token_multiple_encode_the_same_bank(tiny):
  """``width_multiple`` only changes the encoder's batch shapes (documents of 1-11 tokens
  padded to a multiple of 2 tokens, often ending mid-chunk, not to chunk-size levels 3,
  6, 9, 12): the same chunks, to float rounding."""
  _, _, _, tmp = tiny
  levels, tight = str(tmp / "levels"), str(tmp / "tight")
  assert _encode(tiny, levels)["complete"] and _encode(tiny, tight, width_multiple=2)["complete"]
  a, b = bank_lib.open_bank(levels), bank_lib.open_bank(tight)
  np.testing.assert_array_equal(np.asarray(a.doc_index), np.asarray(b.doc_index))
  _assert_same_chunks(a, b)


def test_many_small_batches_encode_the_same_bank_as_one_window_of_large_ones(tiny):
  """The encoder keeps one batch in flight (the next is dispatched before the previous
  one's rows come back): batches of 12 tokens (many a level, rows put back in window
  order) give the bank that batches of 4,096 tokens (one a level) give."""
  _, _, _, tmp = tiny
  small, large = str(tmp / "small_batches"), str(tmp / "large_batches")
  assert _encode(tiny, small, batch_tokens=12)["complete"]
  assert _encode(tiny, large, batch_tokens=4096)["complete"]
  a, b = bank_lib.open_bank(small), bank_lib.open_bank(large)
  _assert_same_chunks(a, b)


def test_each_batch_shape_logs_its_first_call_once(tiny):
  """The encoder logs each batch shape's first call (its compile) with its time, once."""
  model, params, corpus, tmp = tiny
  lines = []
  encode_corpus(model, params, corpus, str(tmp / "logged"), tokenizer=None,
                prefix_tokens=[1, 2], window_tokens=60, batch_tokens=12, log=lines.append)
  compiled = [l for l in lines if l.startswith("encoder: batches of ")]
  shapes = [l.split(" compiled")[0] for l in compiled]
  assert compiled and len(shapes) == len(set(shapes)), compiled
  assert all(l.endswith("s") and " compiled and ran in " in l for l in compiled)
  assert any(l.startswith("encode: 40/40 documents") for l in lines)


def test_bank_from_another_model_is_refused(tiny):
  model, params, _, tmp = tiny
  path = str(tmp / "whole")
  if not os.path.exists(path):
    _encode(tiny, path)
  other = jax.tree.map(lambda x: x + 1e-3, params)
  mine = bank_lib.model_fingerprint(model.config, params)
  theirs = bank_lib.model_fingerprint(model.config, other)
  assert mine != theirs
  assert bank_lib.model_fingerprint(model.config.replace(kernels="auto"), params) == mine
  with pytest.raises(bank_lib.BankError) as e:
    bank_lib.open_bank(path, theirs)
  assert mine in str(e.value) and theirs in str(e.value)


def test_truncated_or_missing_bank_file_is_named(tiny, tmp_path):
  path = str(tmp_path / "bank")
  _encode(tiny, path)
  victim = os.path.join(path, "layer_02.v")
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) - 4)
  with pytest.raises(bank_lib.BankError, match="layer_02.v is truncated"):
    bank_lib.open_bank(path)
  os.remove(victim)
  with pytest.raises(bank_lib.BankError, match="layer_02.v is missing"):
    bank_lib.open_bank(path)
  with pytest.raises(bank_lib.BankError, match="not a memory bank"):
    bank_lib.open_bank(str(tmp_path))


def test_corrupt_segment_fails_verification(tiny, tmp_path):
  path = str(tmp_path / "bank")
  _encode(tiny, path)
  with open(os.path.join(path, "layer_01.k"), "r+b") as f:
    f.seek(8)
    f.write(b"\xff\xff\xff\xff")
  bank_lib.open_bank(path)                       # sizes are fine
  with pytest.raises(bank_lib.BankError, match="layer_01.k is corrupt"):
    bank_lib.open_bank(path, verify=True)


def test_bad_corpus_rows_are_reported_with_line_numbers(tiny, tmp_path):
  corpus = tmp_path / "bad.jsonl"
  corpus.write_text('{"id": "a", "tokens": [1, 2]}\n'
                    '{"id": "b", "tokens": [1, 2\n'
                    '\n'
                    '{"id": "c", "tokens": []}\n'
                    '{"id": "a", "tokens": [3]}\n'
                    '{"id": "d", "text": "   "}\n'
                    '[1, 2]\n')
  model, params, _, _ = tiny
  with pytest.raises(CorpusError) as e:
    encode_corpus(model, params, str(corpus), str(tmp_path / "bank"), tokenizer=None,
                  prefix_tokens=[], log=lambda *_: None)
  msg = str(e.value)
  assert "5 bad corpus row(s)" in msg
  assert f"{corpus}:2: not valid JSON" in msg
  assert f"{corpus}:4: document 'c' is empty" in msg
  assert f"{corpus}:5: duplicate document id 'a' (first at line 1)" in msg
  assert f"{corpus}:6: document 'd' has empty text" in msg
  assert f"{corpus}:7: expected a JSON object" in msg
  assert not os.path.exists(tmp_path / "bank")   # nothing written before the check passes
