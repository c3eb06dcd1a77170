"""One checkpoint in, one self-contained checkpoint dir out (``python -m msa_jax.export``).

:func:`export` reads any checkpoint ``from_pretrained`` reads (a training workdir,
an msa_jax checkpoint, an HF Qwen3 or MSA-4B dir) and writes

* ``hf``:      ``transformers.Qwen3ForCausalLM`` safetensors + ``config.json``
               (router weights dropped: the model without memory);
* ``msa``:     the MSA-4B release layout the authors' engine serves (SPEC §7), with
               ``msa_config.doc_top_k`` = ``top_k_docs`` = the model's k and
               ``rewrite_position`` from the RoPE mode;
* ``msa_jax``: ``msa_config.json`` + orbax ``params/``;

plus, for every format, the tokenizer and ``generation_config.json`` when the
checkpoint has them (see :mod:`msa_jax.export.tokenizer_files`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Optional

from msa_jax.export import msa_jax_checkpoint as native
from msa_jax.export import safetensors_io
from msa_jax.export import tokenizer_files
from msa_jax.export.errors import CheckpointError
from msa_jax.export.names import FORMAT_HF, FORMAT_MSA

FORMAT_MSA_JAX = "msa_jax"
EXPORT_FORMATS = (FORMAT_HF, FORMAT_MSA, FORMAT_MSA_JAX)
DTYPES = ("float32", "bfloat16", "float16")
# Top-level config.json keys of a source HF/MSA dir that ModelConfig does not hold.
_CARRIED_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id",
                        "max_position_embeddings")


@dataclasses.dataclass
class ExportResult:
  """What :func:`export` wrote."""

  out_dir: str
  format: str
  files: list[str]
  tokenizer: str          # where the tokenizer came from, or why there is none
  removed: list[str]      # old export files replaced under ``overwrite``
  checks: dict = dataclasses.field(default_factory=dict)   # ``verify=True``: what was compared


def check_format(fmt: str) -> str:
  if fmt not in EXPORT_FORMATS:
    raise ValueError(f"unknown export format {fmt!r}; choose one of {EXPORT_FORMATS} "
                     "(--format=hf: transformers Qwen3ForCausalLM, msa: the authors' MSA-4B "
                     "engine, msa_jax: an orbax checkpoint for msa_jax)")
  return fmt


def _export_artefacts(out_dir: str) -> list[str]:
  """Files and dirs in ``out_dir`` that some export writes (what ``overwrite`` replaces)."""
  names = set(tokenizer_files.TOKENIZER_FILES) | {
      tokenizer_files.GENERATION_CONFIG, "config.json", native.CONFIG_FILE, native.PARAMS_DIR,
      safetensors_io.INDEX_FILE}
  found = []
  for name in sorted(os.listdir(out_dir)):
    if (name in names or name == safetensors_io.SINGLE_FILE
        or safetensors_io.is_shard_name(name)):
      found.append(os.path.join(out_dir, name))
  return found


def _check_out_dir(out_dir: str, checkpoint: str, overwrite: bool) -> None:
  """Raises before any work when ``out_dir`` cannot take the export."""
  out_real, ckpt_real = os.path.realpath(out_dir), os.path.realpath(checkpoint)
  if out_real == ckpt_real or ckpt_real.startswith(out_real + os.sep):
    raise ValueError(f"--out={out_dir} holds the checkpoint being exported ({checkpoint}); "
                     "write the export to another dir")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"--out={out_dir} exists and is not a directory; choose a dir path")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    entries = sorted(os.listdir(out_dir))
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise FileExistsError(f"--out={out_dir} is not empty ({shown}); choose an empty or new "
                          "dir, or pass --overwrite to replace its checkpoint, config and "
                          "tokenizer files (other files are kept)")


def _clear_out_dir(out_dir: str) -> list[str]:
  """Creates ``out_dir`` or removes the old export files in it; returns what was removed."""
  os.makedirs(out_dir, exist_ok=True)
  removed = _export_artefacts(out_dir)
  for path in removed:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  return removed


def _load(checkpoint: str, dtype: Optional[str], step: Optional[int]):
  from msa_jax.export.convert import from_pretrained
  if not os.path.exists(checkpoint):
    raise CheckpointError(f"--checkpoint={checkpoint} does not exist; pass a training workdir, "
                          "an msa_jax checkpoint, or an HF Qwen3 / MSA-4B dir")
  try:
    return from_pretrained(checkpoint, dtype=dtype, step=step)
  except CheckpointError:
    raise
  except Exception as e:  # orbax / safetensors / JSON errors of a damaged checkpoint
    raise CheckpointError(f"cannot read checkpoint {checkpoint}: {type(e).__name__}: {e}. "
                          "Is it complete (a finished save, all shards present)?") from e


def _write_tokenizer(checkpoint: str, out_dir: str, vocab_size: int):
  """Tokenizer + generation config into ``out_dir``.

  Returns ``(files, description, config.json keys, (tokenizer, data config) or None)``;
  the last is set for a synthetic task's tokenizer (what ``verify`` round-trips).
  """
  source = native.read_config_json(checkpoint)
  if native.is_trainer_workdir(checkpoint):
    import ml_collections
    data_cfg = ml_collections.ConfigDict(source).data if "data" in source else None
    if data_cfg is None:
      return [], "none: the workdir's config.json has no data config", {}, None
    tok, hf_dir = tokenizer_files.workdir_tokenizer(data_cfg)
    if tok.vocab_size > vocab_size:
      raise CheckpointError(f"the task tokenizer has {tok.vocab_size} tokens but the model's "
                            f"vocab_size is {vocab_size}: this checkpoint was not trained "
                            "with this data config")
    synthetic = None
    if hf_dir is not None:
      files = tokenizer_files.copy_tokenizer_files(hf_dir, out_dir, include_generation_config=False)
      desc = f"copied from data.tokenizer_dir={hf_dir}"
    else:
      files = tok.save_pretrained(out_dir)
      desc = f"the task's {type(tok).__name__} ({tok.vocab_size} words) in tokenizers format"
      synthetic = (tok, data_cfg)
    files.append(tokenizer_files.write_generation_config(out_dir, tok.specials))
    return files, desc, tokenizer_files.special_token_config(tok.specials), synthetic
  # An HF Qwen3 / MSA-4B dir, or an msa_jax checkpoint (an export of ours carries them).
  files = tokenizer_files.copy_tokenizer_files(checkpoint, out_dir)
  carried = {}
  if source is not None and "model_type" in source:
    carried = {k: source[k] for k in _CARRIED_CONFIG_KEYS if k in source}
  desc = f"copied from {checkpoint}" if files else f"none: {checkpoint} has no tokenizer files"
  return files, desc, carried, None


def export(checkpoint: str, fmt: str, out_dir: str, *, dtype: Optional[str] = None,
           overwrite: bool = False, step: Optional[int] = None,
           max_shard_size="5GB", verify: bool = False) -> ExportResult:
  """Converts ``checkpoint`` into a ``fmt`` dir at ``out_dir`` (see module doc).

  Args:
    checkpoint: a training workdir, msa_jax checkpoint, HF Qwen3 or MSA-4B dir.
    fmt: ``"hf"``, ``"msa"`` or ``"msa_jax"``.
    out_dir: the output dir; it must be empty or new unless ``overwrite``.
    dtype: weights dtype written (default: the checkpoint's own).
    overwrite: replace the export files (weights, configs, tokenizer) of a
      non-empty ``out_dir``; other files there are kept.
    step: a training workdir's step (default: the newest).
    verify: compare the written dir with the source (:mod:`msa_jax.export.verify`);
      the numbers are in ``ExportResult.checks``.
  Raises ``ValueError`` (bad format, dtype or out dir; ``FileExistsError`` for a
  non-empty one) or :class:`CheckpointError` (an unreadable checkpoint), each
  naming what to change.
  """
  check_format(fmt)
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {DTYPES} (or leave it out to keep "
                     "the checkpoint's own)")
  checkpoint, out_dir = os.fspath(checkpoint), os.fspath(out_dir)
  _check_out_dir(out_dir, checkpoint, overwrite)
  model, params = _load(checkpoint, dtype, step)
  removed = _clear_out_dir(out_dir)   # only once the checkpoint has been read
  _, tok_desc, config_keys, synthetic = _write_tokenizer(checkpoint, out_dir,
                                                         model.config.vocab_size)
  if fmt == FORMAT_MSA_JAX:
    native.save_msa_jax_checkpoint(model, params, out_dir)
  else:
    from msa_jax.export.convert import save_pretrained
    save_pretrained(model, params, out_dir, format=fmt, max_shard_size=max_shard_size,
                    extra_config=config_keys)
  files = sorted(os.listdir(out_dir))
  checks = _verify(model, params, out_dir, fmt, synthetic) if verify else {}
  return ExportResult(os.path.abspath(out_dir), fmt, files, tok_desc, removed, checks)


def _verify(model, params, out_dir: str, fmt: str, synthetic) -> dict:
  from msa_jax.export import verify as verify_lib
  from msa_jax.export.convert import from_pretrained
  checks: dict = {}
  if fmt == FORMAT_HF:
    checks["transformers_logits_max_abs_diff"] = verify_lib.transformers_logits_diff(
        model, params, out_dir)
  else:
    loaded, loaded_params = from_pretrained(out_dir, dtype=model.config.param_dtype)
    checks.update(verify_lib.memory_forward_diff(model, params, loaded, loaded_params))
  if synthetic is not None:
    from msa_jax.data import from_config
    tok, data_cfg = synthetic
    task = from_config.make_task(data_cfg, 0)
    texts = []
    for i in range(4):
      ex = task(i)
      texts += [d.tokens for d in ex.docs] + [ex.question, ex.target]
    checks["tokenizer_round_trip"] = verify_lib.tokenizer_round_trip(tok, out_dir, texts)
  return checks
