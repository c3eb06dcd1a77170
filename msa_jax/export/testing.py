"""Reference checkpoints for tests: random tiny ``transformers`` Qwen3 models (needs torch).

Nothing here is imported by the converter; ``torch``/``transformers`` load lazily.
"""
from __future__ import annotations

import numpy as np


def random_qwen3(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=24, tie_word_embeddings=False,
                 rope_theta=1e6, dtype="float32", seed=0):
  """An eval-mode eager ``Qwen3ForCausalLM`` with every weight random.

  Norm scales are ``1 + 0.1·N(0,1)`` rather than ones, so a mis-mapped norm shows.
  """
  import torch
  from transformers import Qwen3Config, Qwen3ForCausalLM
  config = Qwen3Config(
      vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_hidden_layers=num_layers, num_attention_heads=num_heads,
      num_key_value_heads=num_kv_heads, head_dim=head_dim,
      tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta,
      max_position_embeddings=512)
  torch.manual_seed(seed)
  model = Qwen3ForCausalLM._from_config(config, attn_implementation="eager",
                                        dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.05 * torch.randn_like(p))
  return model.to(getattr(torch, dtype)).eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  """float32 logits ``[B, T, vocab]`` of a torch causal LM on int ids."""
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def read_safetensors_dir(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a (sharded) safetensors dir, as numpy (bf16 as ``ml_dtypes``)."""
  from msa_jax.export.safetensors_io import SafetensorsReader
  with SafetensorsReader(directory) as reader:
    return {name: reader.read(name) for name in reader.names()}
