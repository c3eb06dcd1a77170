"""Bad inputs get errors that name the file (issue 9): non-UTF-8 JSONL, a document over
``data.max_doc_len`` (reported with file:line before anything is written), a
``tokenizer_dir`` that is not a tokenizer, a truncated safetensors file, an evaluation
that could not write its outputs; and every tuple/None field of the recipe can be set
from the command line (``--config.model.router_layers=1,2`` / ``all`` / ``None``)."""
import json
import os
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from msa_jax.config import ModelConfig
from msa_jax.data.jsonl import JSONLError, read_corpus, read_examples
from msa_jax.data.tokenizer import HFTokenizer
from msa_jax.export import CheckpointError
from msa_jax.export.safetensors_io import SafetensorsReader
from msa_jax.trainer import resolve_model_config, train_and_evaluate
from test_data_jsonl import ROW, hf_dir, tok  # noqa: F401 (fixtures)
from train_common import CONFIG_FILE, get_config

# ----------------------------------------------------------------------------- JSONL


def test_non_utf8_jsonl_names_file_and_line(tmp_path, tok):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(json.dumps(ROW).encode() + b"\n" +
                   json.dumps(ROW).replace("mat", "mat\u00e9").encode("latin-1") + b"\n")
  with pytest.raises(JSONLError) as e:
    read_examples(str(path), tok)
  assert str(e.value).startswith(f"{path}:2: not UTF-8 text: byte b'\\xe9'")
  assert "re-encode the file as UTF-8" in str(e.value)


def test_bad_json_message_reads_cleanly(tmp_path, tok):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"question": "unterminated\n')
  with pytest.raises(JSONLError, match=r"bad.jsonl:1: bad JSON: Unterminated string starting at "
                     r"\(column 14\)$"):
    read_examples(str(path), tok)


def test_document_over_the_cap_names_file_and_line(tmp_path, tok):
  long_doc = dict(ROW, docs=[ROW["docs"][0], {"id": "d2", "text": "the cat " * 20}])
  path = tmp_path / "long.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in (ROW, ROW, long_doc)) + "\n")
  with pytest.raises(JSONLError) as e:
    read_examples(str(path), tok, max_doc_len=16)
  assert str(e.value).startswith(f"{path}:3: document 'd2' has 43 tokens (with its id), over "
                                 "data.max_doc_len=16")
  assert len(read_examples(str(path), tok, max_doc_len=64)) == 3     # under the cap: all kept
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text(json.dumps({"id": "d1", "text": "the cat " * 20}) + "\n")
  with pytest.raises(JSONLError, match=r"corpus.jsonl:1: document 'd1' has 43 tokens"):
    read_corpus(str(corpus), tok, max_doc_len=16)


def test_over_long_document_stops_training_before_anything_is_written(tmp_path, hf_dir):
  """An 8,000-token document used to train ~10 steps and then run out of memory naming no
  example; the smoke recipe's cap (512) now reports it up front with file:line."""
  cfg = get_config("smoke")
  assert cfg.data.max_doc_len == 512
  rows = [ROW] * 3 + [dict(ROW, docs=[ROW["docs"][0], {"id": "d2", "text": "the " * 8000}])]
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg.data.task, cfg.data.tokenizer_dir, cfg.data.jsonl_path = "jsonl", hf_dir, str(path)
  cfg.eval.memory_multipliers = (1,)
  cfg.data.eval_jsonl_path = str(path)
  workdir = tmp_path / "run"
  with pytest.raises(JSONLError, match=rf"^{path}:4: document 'd2' has 8003 tokens .* over "
                     r"data.max_doc_len=512"):
    train_and_evaluate(cfg, str(workdir))
  assert not workdir.exists()


# ----------------------------------------------------------------------------- tokenizer dir


def test_tokenizer_dir_without_tokenizer_files_is_named(tmp_path):
  (tmp_path / "config.json").write_text("{}")     # e.g. a model dir without its tokenizer
  with pytest.raises(ValueError) as e:
    HFTokenizer(str(tmp_path))
  msg = str(e.value)
  assert msg.startswith(f"{tmp_path} is not a Hugging Face tokenizer directory")
  assert "['config.json']" in msg and "sentencepiece" not in msg


def test_unreadable_tokenizer_is_named(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  (tmp_path / "tokenizer_config.json").write_text("{}")
  with pytest.raises(ValueError, match=f"could not load the Hugging Face tokenizer in {tmp_path}"):
    HFTokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- safetensors


def test_truncated_safetensors_is_named(tmp_path):
  import safetensors.numpy
  path = tmp_path / "model.safetensors"
  safetensors.numpy.save_file({"w": np.ones((64, 64), np.float32)}, path)
  size = os.path.getsize(path)
  for cut in (size // 2, 40):                      # mid-data, and inside the header
    with open(path, "r+b") as f:
      f.truncate(cut)
    with pytest.raises(CheckpointError) as e:
      SafetensorsReader(str(tmp_path))
    assert str(e.value).startswith(f"{path}: not a readable safetensors file")
    assert "truncated" in str(e.value) and f"{cut} bytes" in str(e.value)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_checks_its_output_dir_before_evaluating(tmp_path, monkeypatch):
  from msa_jax import evaluate
  monkeypatch.setattr(evaluate, "load_for_eval",
                      lambda *a: pytest.fail("evaluated before checking the output dir"))
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(PermissionError, match=f"cannot write eval.json and eval.png to {blocker}/run"):
    evaluate.run(get_config("smoke"), str(blocker / "run"))


# ----------------------------------------------------------------------------- config flags


def _parse(*overrides, variant="smoke"):
  """The config as ``python -m msa_jax.train --config=...:variant OVERRIDES`` builds it
  (config_flags reads the overrides from ``sys.argv``)."""
  argv = ["prog", f"--config={CONFIG_FILE}:{variant}", *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", f"{CONFIG_FILE}:{variant}",
                                           flag_values=values, lock_config=True)
  saved, sys.argv = sys.argv, argv
  try:
    values(argv)
  finally:
    sys.argv = saved
  return holder.value


@pytest.mark.parametrize("arg, layers", [
    ("1,2", (1, 2)), ("2", (2,)), ("(0, 2)", (0, 2)), ("all", (0, 1, 2)), ("None", (1, 2)),
    ("none", (1, 2)),
])
def test_router_layers_from_the_command_line(arg, layers):
  cfg = _parse(f"--config.model.router_layers={arg}")
  assert resolve_model_config(cfg).router_layer_ids == layers


def test_router_layers_override_on_a_recipe_with_explicit_layers():
  assert resolve_model_config(_parse("--config.model.router_layers=all", variant="4b")
                              ).router_layer_ids == tuple(range(36))


def test_bad_router_layers_word_names_the_choices():
  with pytest.raises(ValueError, match="router_layers 'x' is not 'all', 'none'"):
    resolve_model_config(_parse("--config.model.router_layers=x"))


@pytest.mark.parametrize("variant", ["4b", "0.6b", "tiny", "smoke"])
def test_every_tuple_or_none_field_is_overridable(variant):
  """config_flags overrides a field through a parser for its type: a plain None has type
  NoneType (no parser), so every such field must be a typed placeholder."""
  supported = tuple(config_flags.config_flags._FIELD_TYPE_TO_PARSER)
  cfg = get_config(variant)

  def walk(node, prefix=""):
    for key in node.keys():
      value = node[key]
      if hasattr(value, "keys"):
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", value
  checked = 0
  for path, value in walk(cfg):
    if value is None or isinstance(value, (tuple, list)):
      field_type = config_path.get_type(path, cfg)
      assert field_type in supported, f"{variant}: {path} (type {field_type}) not overridable"
      assert field_type is not list, f"{variant}: {path} is a list; use a tuple"
      checked += 1
  assert checked >= 5     # router_layers or mesh_shape, rules, curriculum, multipliers, ...
  parsed = _parse("--config.logical_axis_rules=(('batch', 'data'),)",
                  "--config.eval.memory_multipliers=1,4", variant=variant)
  assert parsed.logical_axis_rules == (("batch", "data"),)
  assert parsed.eval.memory_multipliers == (1, 4)


def test_model_config_router_layer_words():
  base = dict(num_layers=4)
  assert ModelConfig(**base, router_layers=("all",)).router_layer_ids == (0, 1, 2, 3)
  assert ModelConfig(**base, router_layers=(None,)).router_layers is None
  with pytest.raises(ValueError, match="bad model config: router_layers"):
    ModelConfig(**base, router_layers=(1.5,))
