"""Tests of the HF tokenizer wrapper and the JSONL readers (tiny local tokenizer, no network)."""
import json

import pytest

from msa_jax.data import interleave
from msa_jax.data.jsonl import JSONLError, read_corpus, read_examples, read_queries
from msa_jax.data.tokenizer import HFTokenizer

WORDS = ("[ ] d1 d2 d3 the cat sat on mat dog ran far who where what did "
         "paris is capital of france ? .").split()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  specials = ["<pad>", "<unk>", "<eos>", "<id-end>", "<end-of-retrieval>"]
  vocab = {w: n for n, w in enumerate(specials + WORDS)}
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tk.add_special_tokens(specials)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
  path = tmp_path_factory.mktemp("hf_tok")
  fast.save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def tok(hf_dir):
  return HFTokenizer(hf_dir)


def test_hf_wrapper(tok):
  sp = tok.specials
  assert (sp.pad, sp.eos, sp.id_end, sp.end_of_retrieval) == (0, 2, 3, 4)
  assert tok.vocab_size == 5 + len(WORDS)
  assert tok.encode("the cat sat") == [10, 11, 12]
  assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
  assert tok.encode_doc_id("d2") == [5, 8, 6]


def test_hf_missing_control_tokens(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
  transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                       eos_token="<unk>").save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="lacks control tokens"):
    HFTokenizer(str(tmp_path))
  t = HFTokenizer(str(tmp_path), add_missing_control_tokens=True)
  assert t.vocab_size == 4 and {t.specials.id_end, t.specials.end_of_retrieval} == {2, 3}


def _write(path, rows):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return str(path)


ROW = {"docs": [{"id": "d1", "text": "the cat sat on the mat"},
                {"id": "d2", "text": "paris is capital of france"}],
       "question": "where did the cat sit ?", "answer": "mat",
       "positive_doc_ids": ["d1"]}


def test_read_examples(tmp_path, tok):
  (ex,) = read_examples(_write(tmp_path / "a.jsonl", [ROW]), tok)
  d1 = ex.doc_by_id("d1")
  assert d1.tokens == tok.encode("[ d1 ] the cat sat on the mat") and d1.id_length == 3
  sp = tok.specials
  assert ex.target == tok.encode("[d1]") + [sp.id_end, sp.end_of_retrieval,
                                            tok.encode("mat")[0], sp.eos]
  s0, s1 = interleave.expand(ex, sp)
  assert s1.question == tok.encode("where did the cat sit ?") + d1.tokens


@pytest.mark.parametrize("row, reason", [
    ("{not json", "bad JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({k: v for k, v in ROW.items() if k != "question"}, "missing key 'question'"),
    (dict(ROW, docs=[{"id": "d1", "text": "  "}]), "'d1' has empty text"),
    (dict(ROW, positive_doc_ids=["d9"]), r"positive doc ids \['d9'\]"),
    (dict(ROW, docs=ROW["docs"] * 2), "duplicate document id 'd1'"),
    (dict(ROW, docs=[]), "'docs' is empty"),
])
def test_read_examples_errors(tmp_path, tok, row, reason):
  path = _write(tmp_path / "bad.jsonl", [ROW, "", row])
  with pytest.raises(JSONLError, match=reason) as e:
    read_examples(path, tok)
  assert e.value.line == 3 and str(e.value).startswith(f"{path}:3: ")


def test_shared_corpus(tmp_path, tok):
  corpus = read_corpus(_write(tmp_path / "c.jsonl", [
      {"id": "d1", "text": "the cat sat on the mat"},
      {"id": "d2", "text": "paris is capital of france"},
      {"id": "d3", "text": "the dog ran far"}]), tok)
  queries = read_queries(_write(tmp_path / "q.jsonl", [
      {"question": "what is capital of france ?", "answer": "paris",
       "positive_doc_ids": ["d2"]},
      {"question": "who ran far ?", "answer": "the dog", "positive_doc_ids": ["d3"],
       "doc_ids": ["d3", "d1"]}]), corpus, tok)
  assert [d.doc_id for d in queries[0].docs] == ["d1", "d2", "d3"]
  assert queries[0].docs[0] is queries[1].docs[1]  # tokenised once, shared
  assert [d.doc_id for d in queries[1].docs] == ["d3", "d1"]
  with pytest.raises(JSONLError, match=r"q2.jsonl:1: doc_ids \['d7'\]"):
    read_queries(_write(tmp_path / "q2.jsonl", [
        {"question": "who ?", "answer": "x", "positive_doc_ids": [], "doc_ids": ["d7"]}]),
        corpus, tok)
  with pytest.raises(JSONLError, match="c2.jsonl:2: duplicate document id 'd1' .first at line 1"):
    read_corpus(_write(tmp_path / "c2.jsonl", [{"id": "d1", "text": "a"}] * 2), tok)
