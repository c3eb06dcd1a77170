"""Tests of Example validation, the word tokenizer, collate and bucketing."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from msa_jax.data.collate import (BucketShapes, WasteMeter, choose_bucket, collate,
                                  fit_bucket, padding_waste)
from msa_jax.data.example import Document, Example
from msa_jax.data.tokenizer import WordTokenizer, WordVocabConfig


def _ex(q=(5, 6), t=(7, 8, 9), docs=((1, 2, 3), (4,)), pos=("d0",), prefix=(1,)):
  return Example(prefix=list(prefix),
                 docs=[Document(f"d{n}", list(d)) for n, d in enumerate(docs)],
                 question=list(q), target=list(t), positive_doc_ids=list(pos))


@pytest.mark.parametrize("kwargs, msg", [
    (dict(q=()), "empty question"),
    (dict(t=()), "empty target"),
    (dict(docs=()), "no memory documents"),
    (dict(pos=("nope",)), "'nope' is not among"),
    (dict(pos=("d0", "d0")), "repeats an id"),
])
def test_example_validation(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    _ex(**kwargs)


def test_document_validation():
  with pytest.raises(ValueError, match="is empty"):
    Document("a", [])
  with pytest.raises(ValueError, match="duplicate document id 'a'"):
    Example([], [Document("a", [1]), Document("a", [2])], [1], [2], [])
  with pytest.raises(ValueError, match="id_length 3"):
    Document("a", [1, 2], id_length=3)
  d = Document("a", [5, 6, 7], id_length=2)
  assert d.id_tokens == [5, 6] and d.text_tokens == [7]


def test_word_tokenizer_layout_and_roundtrip():
  tok = WordTokenizer(WordVocabConfig(4, 5, 6))
  sp = tok.specials
  assert (sp.pad, sp.bos, sp.eos, sp.id_end, sp.end_of_retrieval) == (0, 1, 2, 3, 4)
  assert tok.encode("[ ]") == [5, 6]
  assert tok.id_symbol(0) == 7 and tok.key_symbol(0) == 11 and tok.value_symbol(0) == 16
  text = "<bos> i3 k4 v5 what is the value for k1 ? grass"
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode_doc_id("i1 i2") == [5, 8, 9, 6]
  assert WordTokenizer(WordVocabConfig(4, 5, 6)).words == tok.words  # deterministic
  with pytest.raises(KeyError, match="'zebra'"):
    tok.encode("zebra")
  with pytest.raises(ValueError, match="num_key_symbols"):
    tok.key_symbol(5)


def test_collate_values():
  ex = _ex()
  b = collate([ex], BucketShapes(batch=2, prefix=2, docs=3, doc_len=4, active=6))
  np.testing.assert_array_equal(b.prefix_tokens, [[1, 0], [0, 0]])
  np.testing.assert_array_equal(b.doc_tokens[0], [[1, 2, 3, 0], [4, 0, 0, 0], [0] * 4])
  np.testing.assert_array_equal(b.doc_mask[0].sum(-1), [3, 1, 0])
  np.testing.assert_array_equal(b.active_tokens[0], [5, 6, 7, 8, 9, 0])
  np.testing.assert_array_equal(b.question_mask[0], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(b.targets[0], [6, 7, 8, 9, 0, 0])
  # first target token (7) is predicted at the last question position (index 1)
  np.testing.assert_array_equal(b.loss_mask[0], [0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(b.positive_docs, [[1, 0, 0], [0, 0, 0]])
  assert not b.active_mask[1].any()  # padding row
  assert b.doc_tokens.dtype == np.int32 and b.loss_mask.dtype == bool
  assert b.shape_summary == dict(batch=2, prefix=2, docs=3, doc_len=4, active=6)
  w = padding_waste(b)
  assert w["rows"] == 0.5 and w["doc_slots"] == pytest.approx(4 / 6)
  assert w["active"] == pytest.approx(7 / 12)


def test_collate_never_truncates():
  with pytest.raises(ValueError, match="active 5 > 4"):
    collate([_ex()], BucketShapes(1, 2, 3, 4, 4))
  with pytest.raises(ValueError, match="doc_len 3 > 2"):
    collate([_ex()], BucketShapes(1, 2, 3, 2, 8))
  with pytest.raises(ValueError, match="batch size 1"):
    collate([_ex(), _ex()], BucketShapes(1, 2, 3, 4, 8))


def test_choose_bucket_smallest_that_fits():
  buckets = [BucketShapes(4, 2, 8, 8, 32), BucketShapes(4, 2, 2, 4, 8),
             BucketShapes(4, 2, 4, 4, 8)]
  assert choose_bucket(_ex(), buckets) == 1
  assert choose_bucket(_ex(docs=((1,),) * 3), buckets) == 2
  assert choose_bucket(_ex(t=tuple(range(20))), buckets) == 0
  with pytest.raises(ValueError, match="fits no bucket"):
    choose_bucket(_ex(t=tuple(range(40))), buckets)
  assert fit_bucket([_ex(), _ex(t=(1,) * 9)], batch=3) == BucketShapes(3, 8, 2, 8, 16)


_lists = st.lists(st.integers(1, 99), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_lists, _lists, st.lists(_lists, min_size=1, max_size=4),
                          st.lists(st.integers(1, 99), max_size=3)),
                min_size=1, max_size=4))
def test_collate_roundtrip_property(rows):
  exs = [Example(prefix=p, docs=[Document(f"d{n}", d) for n, d in enumerate(ds)],
                 question=q, target=t, positive_doc_ids=["d0"])
         for q, t, ds, p in rows]
  shapes = fit_bucket(exs, batch=len(exs), multiple=4)
  b = collate(exs, shapes)
  meter = WasteMeter()
  meter.update(b)
  assert meter.summary()["total"] == pytest.approx(padding_waste(b)["total"])
  for r, ex in enumerate(exs):
    assert b.prefix_tokens[r][b.prefix_mask[r]].tolist() == ex.prefix
    for k, d in enumerate(ex.docs):
      assert b.doc_tokens[r, k][b.doc_mask[r, k]].tolist() == d.tokens
    active = b.active_tokens[r][b.active_mask[r]].tolist()
    assert active == ex.question + ex.target
    assert b.active_tokens[r][b.question_mask[r]].tolist() == ex.question
    # loss positions predict exactly the target tokens, in order
    assert b.targets[r][b.loss_mask[r]].tolist() == ex.target
    assert not (b.loss_mask[r] & ~b.active_mask[r]).any()
    assert b.positive_docs[r].tolist() == [k == 0 for k in range(shapes.docs)]
