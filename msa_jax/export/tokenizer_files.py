"""Tokenizer and ``generation_config.json`` files of an exported checkpoint dir.

The authors' engine (and ``transformers``) loads the tokenizer from the model dir
(``AutoTokenizer.from_pretrained(DIR)``). An export therefore carries the tokenizer
the checkpoint was trained with:

* an HF Qwen3 / MSA-4B source dir: its tokenizer files and ``generation_config.json``,
  copied as they are;
* a training workdir on a JSONL task: the files of its ``data.tokenizer_dir``;
* a training workdir on a synthetic task (kv, niah): the task's ``WordTokenizer``
  saved in Hugging Face ``tokenizers`` format (``WordTokenizer.save_pretrained``);
* an msa_jax checkpoint: the tokenizer files in its dir, if any (an export carries them).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from msa_jax.data.tokenizer import SpecialTokens
from msa_jax.export.errors import CheckpointError

# Files a Hugging Face tokenizer dir may hold (tokenizers, sentencepiece, BPE vocab/merges).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"


def copy_tokenizer_files(source_dir: str, out_dir: str,
                         include_generation_config: bool = True) -> list[str]:
  """Copies the tokenizer files (and ``generation_config.json``) ``source_dir`` has.

  Returns the destination paths (empty when the source has none).
  """
  names = TOKENIZER_FILES + ((GENERATION_CONFIG,) if include_generation_config else ())
  written = []
  for name in names:
    src = os.path.join(source_dir, name)
    if os.path.isfile(src):
      dst = os.path.join(out_dir, name)
      shutil.copyfile(src, dst)
      written.append(dst)
  return written


def generation_config_dict(specials: SpecialTokens) -> dict:
  """Greedy decoding that stops where ``msa_jax.generate`` stops.

  ``eos_token_id`` lists ``<eos>`` (end of the answer) and ``<id-end>`` (end of a
  retrieval round: the caller injects the named documents and generates again).
  """
  config = {"eos_token_id": [int(specials.eos), int(specials.id_end)],
            "pad_token_id": int(specials.pad), "do_sample": False}
  if specials.bos is not None:
    config["bos_token_id"] = int(specials.bos)
  return config


def write_generation_config(out_dir: str, specials: SpecialTokens) -> str:
  path = os.path.join(out_dir, GENERATION_CONFIG)
  with open(path, "w") as f:
    json.dump(generation_config_dict(specials), f, indent=2)
  return path


def special_token_config(specials: SpecialTokens) -> dict:
  """The top-level ``config.json`` keys ``bos/eos/pad_token_id`` (transformers' fallbacks)."""
  return {"bos_token_id": specials.bos, "eos_token_id": int(specials.eos),
          "pad_token_id": int(specials.pad)}


def workdir_tokenizer(data_cfg):
  """The tokenizer of a training workdir's ``data`` config, and its source dir if any.

  Returns ``(tokenizer, hf_dir_or_None)``: a JSONL task's ``data.tokenizer_dir``
  (copied on export) or the synthetic task's ``WordTokenizer`` (``None``).
  """
  from msa_jax.data import from_config
  try:
    tok = from_config.tokenizer_of(data_cfg)
  except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
    raise CheckpointError(f"the workdir's data config names no usable tokenizer: {e}") from None
  hf_dir: Optional[str] = getattr(tok, "path", None)
  return tok, hf_dir
