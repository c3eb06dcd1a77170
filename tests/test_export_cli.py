"""``python -m msa_jax.export`` end to end, from a training workdir to PyTorch.

The workdir is what ``msa_jax.train`` leaves (``config.json`` of the smoke recipe,
``checkpoints/<step>/state`` an orbax TrainState) with random params of a
trained-like scale, written through the trainer's own ``TrainSetup`` and checkpoint
manager (no training steps, so no train-step compile). From it the CLI writes

* ``hf``: ``transformers.Qwen3ForCausalLM`` gives the no-memory logits of msa_jax;
* ``msa``: ``doc_top_k``, ``rewrite_position``, the tokenizer and generation config;
  ``from_pretrained`` of it gives the same memory forward (logits, scores, selection);
* ``msa_jax``: ``from_pretrained`` gives the same params, bit for bit;

and the exported tokenizer loads with ``AutoTokenizer`` and encodes/decodes the
task's text as the task's ``WordTokenizer`` does. A ``slow`` test exports a run the
trainer really trained (12 steps of ``train_common.small_cfg``) with ``--verify``.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
# Imported now, not lazily by its pytest plugin at the end of the session: after this
# module's orbax/transformers work that late import crashed CPython 3.11's ast
# ("AST constructor recursion depth mismatch") in a run of this file alone.
import hypothesis  # noqa: F401,E402
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import msa_jax  # noqa: E402
from msa_jax import checkpointing, sharding  # noqa: E402
from msa_jax.data import from_config  # noqa: E402
from msa_jax.export import CheckpointError  # noqa: E402
from msa_jax.export.__main__ import main as cli_main  # noqa: E402
from msa_jax.export.export_dir import export  # noqa: E402
from msa_jax.export.testing import read_safetensors_dir, torch_logits  # noqa: E402
from msa_jax import run_config  # noqa: E402
from msa_jax.trainer import TrainSetup  # noqa: E402

from tests import reference_numpy as R  # noqa: E402
from train_common import shared_train_setups, get_config, small_cfg  # noqa: E402,F401

fast_compile = R.fast_compile_fixture()
STEP = 7


def _write_workdir(workdir, cfg, seed=0):
  """A trainer workdir with one saved step whose params are random at scale 0.3."""
  setup = TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape))
  state = setup.init_state(cfg.seed)
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    scale = 1.0 + 0.3 * rng.standard_normal(x.shape) if "scale" in jax.tree_util.keystr(path) \
        else 0.3 * rng.standard_normal(x.shape)
    return np.asarray(scale, x.dtype)
  params = jax.tree_util.tree_map_with_path(perturb, jax.device_get(state.params))
  state = state.replace(params=params)
  os.makedirs(str(workdir), exist_ok=True)
  run_config.write_initial(str(workdir), run_config.run_config_dict(cfg, setup.model_cfg))
  manager = checkpointing.make_manager(str(workdir), 2, 1, async_save=False)
  manager.save(STEP, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
  manager.wait_until_finished()
  manager.close()
  return setup.model, params


def _smoke_cfg(**model):
  cfg = get_config("smoke")
  cfg.model.update(model)
  return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("workdir")
  cfg = _smoke_cfg()
  model, params = _write_workdir(workdir, cfg)
  out = tmp_path_factory.mktemp("exports")
  for fmt in ("hf", "msa", "msa_jax"):
    assert cli_main([f"--checkpoint={workdir}", f"--format={fmt}", f"--out={out / fmt}"]) == 0
  return dict(workdir=workdir, cfg=cfg, model=model, params=params, out=out)


def _batch(vocab, seed=0):
  return R.make_batch(np.random.default_rng(seed), vocab=vocab, prefix_lens=[1, 0],
                      doc_lens=[[6, 3, 0, 5, 2], [4, 6, 1, 0, 3]], active_lens=[7, 5],
                      question_lens=[4, 3])


def _assert_same_memory_forward(model_a, params_a, model_b, params_b, vocab):
  batch = _batch(vocab)
  a = jax.jit(model_a.apply)({"params": params_a}, batch)
  b = jax.jit(model_b.apply)({"params": params_b}, batch)
  for name in ("logits_bmv", "doc_scores_brn", "selected_brk", "selected_valid_brk"):
    np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)),
                                  err_msg=name)
  return a


def test_hf_export_loads_in_transformers_with_equal_no_memory_logits(run):
  model = transformers.Qwen3ForCausalLM.from_pretrained(run["out"] / "hf",
                                                        attn_implementation="eager")
  assert model.config.num_hidden_layers == run["model"].config.num_layers
  vocab = run["model"].config.vocab_size
  ids = np.random.default_rng(1).integers(0, vocab, (2, 11)).astype(np.int32)
  want = np.asarray(jax.jit(run["model"].apply)({"params": run["params"]}, ids))
  got = torch_logits(model.float().eval(), ids)
  assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want)), np.max(np.abs(got - want))
  assert "router_q_proj" not in " ".join(read_safetensors_dir(run["out"] / "hf"))


def test_msa_export_config_and_round_trip_memory_forward(run):
  cfg = run["model"].config
  config = json.loads((run["out"] / "msa" / "config.json").read_text())
  msa = config["msa_config"]
  assert msa["doc_top_k"] == msa["top_k_docs"] == cfg.top_k == 1
  assert msa["rewrite_position"] is True and msa["routing_score"] == "cosine"
  assert msa["router_layer_idx"] == "1,2" and msa["pooling_kernel_size"] == 2
  specials = from_config.tokenizer_of(run["cfg"].data).specials
  assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (
      specials.eos, specials.bos, specials.pad)
  model, params = msa_jax.from_pretrained(run["out"] / "msa")
  assert model.config.router_layer_ids == cfg.router_layer_ids
  assert model.config.replace(router_layers=None) == cfg.replace(router_layers=None)
  out = _assert_same_memory_forward(run["model"], run["params"], model, params, cfg.vocab_size)
  assert np.all(np.isfinite(np.asarray(out.logits_bmv)))


def test_msa_jax_export_round_trip_is_bitwise(run):
  model, params = msa_jax.from_pretrained(run["out"] / "msa_jax")
  assert model.config == run["model"].config
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(run["params"]),
                          jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=str(path))
  assert (run["out"] / "msa_jax" / "tokenizer.json").is_file()


def test_exported_tokenizer_round_trips_the_task_text(run):
  tok = from_config.tokenizer_of(run["cfg"].data)
  hf = transformers.AutoTokenizer.from_pretrained(run["out"] / "msa")
  assert len(hf) == tok.vocab_size
  assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (
      tok.specials.eos, tok.specials.bos, tok.specials.pad)
  assert hf.convert_tokens_to_ids(["<id-end>", "<end-of-retrieval>"]) == [
      tok.specials.id_end, tok.specials.end_of_retrieval]
  task = from_config.make_task(run["cfg"].data, seed=3)
  sequences = []
  for i in range(4):
    ex = task(i)
    sequences += [d.tokens for d in ex.docs[:4]] + [ex.question, ex.target]
  for ids in sequences:
    text = tok.decode(ids)
    assert hf.encode(text) == list(ids), text
    assert hf.decode(ids) == text
  generation = transformers.GenerationConfig.from_pretrained(run["out"] / "msa")
  assert generation.eos_token_id == [tok.specials.eos, tok.specials.id_end]
  assert generation.do_sample is False


def test_word_tokenizer_with_punctuation_round_trips(tmp_path):
  """The NIAH vocabulary's template words (".", "?", ",") survive decode/encode."""
  cfg = get_config("smoke")
  cfg.data.task = "niah"
  task = from_config.make_task(cfg.data, seed=0)
  task.tokenizer.save_pretrained(str(tmp_path))
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for i in range(8):
    ex = task(i)
    for ids in [d.tokens for d in ex.docs[:3]] + [ex.question, ex.target]:
      text = task.tokenizer.decode(ids)
      assert hf.encode(text) == list(ids) and hf.decode(ids) == text, text
  assert any(w in task.tokenizer.decode(task(0).question).split() for w in ("?", ".", ","))
  with pytest.raises(Exception, match="UNK|unk"):
    hf.encode("magic notaword")


def test_global_rope_scaled_dot_bfloat16_export(tmp_path):
  """``rewrite_position: false`` for global RoPE; ``routing_score`` and the dtype survive."""
  cfg = _smoke_cfg(rope_mode="global", routing_score="scaled_dot", top_k=2)
  model, params = _write_workdir(tmp_path / "run", cfg, seed=2)
  export(str(tmp_path / "run"), "msa", str(tmp_path / "msa"), dtype="bfloat16")
  msa = json.loads((tmp_path / "msa" / "config.json").read_text())["msa_config"]
  assert msa["rewrite_position"] is False and msa["doc_top_k"] == 2
  assert msa["routing_score"] == "scaled_dot"
  tensors = read_safetensors_dir(tmp_path / "msa")
  assert tensors["model.embed_tokens.weight"].dtype.name == "bfloat16"
  loaded, loaded_params = msa_jax.from_pretrained(tmp_path / "msa", dtype="float32")
  assert (loaded.config.rope_mode, loaded.config.routing_score, loaded.config.top_k) == (
      "global", "scaled_dot", 2)
  # Same forward as the source model on the bf16-rounded params.
  rounded = jax.tree.map(lambda x: np.asarray(x).astype("bfloat16").astype(np.float32), params)
  _assert_same_memory_forward(model, rounded, loaded, loaded_params, cfg.model.vocab_size
                              if cfg.model.vocab_size else loaded.config.vocab_size)


@pytest.mark.parametrize("source", ["msa", "msa_jax"])
def test_source_dir_tokenizer_files_are_copied(run, tmp_path, source):
  """An MSA-4B (HF-style) or msa_jax source dir's tokenizer and generation config travel
  as they are; an HF-style source's eos/bos/pad ids reach config.json."""
  src = run["out"] / source
  result = export(str(src), "hf", str(tmp_path / "hf"))
  assert result.tokenizer == f"copied from {src}"
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    assert (tmp_path / "hf" / name).read_bytes() == (src / name).read_bytes(), name
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["model_type"] == "qwen3"
  if source == "msa":
    assert config["eos_token_id"] == json.loads((src / "config.json").read_text())["eos_token_id"]


# ----------------------------------------------------------------------------- errors


def test_unknown_format_is_a_clear_error(run, tmp_path, capsys):
  assert cli_main([f"--checkpoint={run['workdir']}", "--format=onnx",
                   f"--out={tmp_path / 'x'}"]) == 1
  err = capsys.readouterr().err
  assert "unknown export format 'onnx'" in err and "('hf', 'msa', 'msa_jax')" in err
  assert not (tmp_path / "x").exists()


def test_non_empty_out_needs_overwrite_and_overwrite_replaces_export_files(run, tmp_path,
                                                                           capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
  args = [f"--checkpoint={run['workdir']}", "--format=msa", f"--out={out}"]
  assert cli_main(args) == 1
  err = capsys.readouterr().err
  assert "is not empty" in err and "--overwrite" in err and "model-00001-of-00002" in err
  assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"stale shard"
  assert cli_main(args + ["--overwrite"]) == 0
  assert "replaced 1 old export file(s): model-00001-of-00002.safetensors" in \
      capsys.readouterr().out
  assert (out / "notes.txt").read_text() == "keep me"
  assert not (out / "model-00001-of-00002.safetensors").exists()
  assert (out / "model.safetensors").is_file()


def test_out_dir_may_not_hold_the_checkpoint(run):
  with pytest.raises(ValueError, match="holds the checkpoint being exported"):
    export(str(run["workdir"]), "hf", str(run["workdir"]), overwrite=True)


@pytest.mark.parametrize("damage", ["missing", "empty", "bad_json", "truncated_state"])
def test_unreadable_checkpoint_is_a_clear_error(run, tmp_path, damage, capsys):
  ckpt = tmp_path / "ckpt"
  if damage == "empty":
    ckpt.mkdir()
  elif damage == "bad_json":
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{not json")
  elif damage == "truncated_state":
    import shutil
    shutil.copytree(run["workdir"], ckpt)
    state = ckpt / "checkpoints" / str(STEP) / "state"
    for root, _, files in os.walk(state):
      for name in files:
        if name != "_METADATA" and not name.startswith("_"):
          path = os.path.join(root, name)
          with open(path, "r+b") as f:
            f.truncate(max(0, os.path.getsize(path) // 3))
  code = cli_main([f"--checkpoint={ckpt}", "--format=hf", f"--out={tmp_path / 'out'}"])
  assert code == 1
  err = capsys.readouterr().err
  want = {"missing": "does not exist", "empty": "not a checkpoint",
          "bad_json": "not valid JSON", "truncated_state": "cannot restore (step 7)"}[damage]
  assert want in err and str(ckpt) in err, err
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_unreadable_checkpoint_raises_checkpoint_error(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    export(str(tmp_path / "nope"), "msa", str(tmp_path / "out"))


def test_verify_reports_exact_round_trip(run, tmp_path, capsys):
  assert cli_main([f"--checkpoint={run['workdir']}", "--format=msa", f"--out={tmp_path / 'v'}",
                   "--verify"]) == 0
  out = capsys.readouterr().out
  for line in ("memory_logits_max_abs_diff = 0.0", "doc_scores_max_abs_diff = 0.0",
               "same_selection = True", "tokenizer_round_trip = True"):
    assert f"verify: {line}" in out, out


@pytest.mark.slow
def test_cli_exports_a_really_trained_workdir(tmp_path, shared_train_setups, capsys):  # noqa: F811
  """The trainer's own 12-step run (``train_common.small_cfg``), exported in all three
  formats with ``--verify``: exact memory forward, transformers logits, tokenizer."""
  from msa_jax.trainer import train_and_evaluate
  workdir = tmp_path / "run"
  train_and_evaluate(small_cfg(), str(workdir))
  capsys.readouterr()
  for fmt in ("hf", "msa", "msa_jax"):
    assert cli_main([f"--checkpoint={workdir}", f"--format={fmt}", f"--out={tmp_path / fmt}",
                     "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: tokenizer_round_trip = True" in out, out
    if fmt == "hf":
      diff = float(out.split("transformers_logits_max_abs_diff = ")[1].split()[0])
      assert diff < 1e-4, out
    else:
      assert "verify: memory_logits_max_abs_diff = 0.0" in out, out
      assert "verify: same_selection = True" in out, out
  msa = json.loads((tmp_path / "msa" / "config.json").read_text())["msa_config"]
  assert msa["doc_top_k"] == small_cfg().model.top_k and msa["rewrite_position"] is True
