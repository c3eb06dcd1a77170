"""Loading what inference needs from a checkpoint: the model, its parameters, its tokenizer."""
from __future__ import annotations

import json
import os
from typing import Any, Optional


def load_model(checkpoint: str, **overrides):
  """``(model, params)`` of a training workdir or anything ``msa_jax.from_pretrained`` reads."""
  from msa_jax.export.convert import from_pretrained
  return from_pretrained(checkpoint, **overrides)


def training_config(checkpoint: str) -> Optional[Any]:
  """The training ``ConfigDict`` of a trainer workdir, else None.

  The newest config record wins (``config.<step>.json`` of an accepted resume, as
  ``from_pretrained`` reads it; ``msa_jax.run_config``), else ``config.json``.
  """
  from msa_jax.run_config import saved_config_path
  path = saved_config_path(checkpoint) or os.path.join(checkpoint, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    cfg = json.load(f)
  if "data" not in cfg or "model" not in cfg:
    return None   # an HF / MSA-4B config.json, not a training run's
  import ml_collections
  return ml_collections.ConfigDict(cfg)


def load_tokenizer(checkpoint: str, tokenizer_dir: str = ""):
  """The tokenizer that goes with ``checkpoint``.

  ``tokenizer_dir`` (a local Hugging Face tokenizer) wins; else a training workdir's task
  tokenizer (from its config.json); else the checkpoint dir itself when it holds HF
  tokenizer files. Raises ``ValueError`` naming what to pass when none is found.
  """
  from msa_jax.data.tokenizer import HFTokenizer
  if tokenizer_dir:
    return HFTokenizer(tokenizer_dir)
  cfg = training_config(checkpoint)
  if cfg is not None:
    from msa_jax.data import from_config
    return from_config.tokenizer_of(cfg.data)
  if any(os.path.isfile(os.path.join(checkpoint, f))
         for f in ("tokenizer.json", "tokenizer_config.json")):
    return HFTokenizer(checkpoint)
  raise ValueError(f"no tokenizer found for {checkpoint}: it is neither a training workdir nor "
                   "a dir with tokenizer files; pass --tokenizer_dir=/path/to/hf_tokenizer")


def task_prefix(checkpoint: str, tokenizer) -> list[int]:
  """The shared prefix of the run's task (what training put before the documents).

  A training workdir: its task's prefix (``from_config.prefix_of``); otherwise ``[bos]``
  when the tokenizer has one (as the JSONL task does), else nothing.
  """
  cfg = training_config(checkpoint)
  if cfg is not None:
    from msa_jax.data import from_config
    return from_config.prefix_of(cfg.data)
  bos = tokenizer.specials.bos
  return [bos] if bos is not None else []
