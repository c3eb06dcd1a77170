"""Checkpoint conversion: HF Qwen3 and MSA-4B safetensors, and msa_jax (orbax) checkpoints."""
from msa_jax.export.convert import (abstract_params, from_pretrained, init_router_params,
                                    save_pretrained)
from msa_jax.export.errors import CheckpointError
from msa_jax.export.msa_jax_checkpoint import save_msa_jax_checkpoint
from msa_jax.export.names import TENSOR_FAMILIES, tensor_entries

__all__ = ["CheckpointError", "TENSOR_FAMILIES", "abstract_params", "from_pretrained",
           "init_router_params", "save_msa_jax_checkpoint", "save_pretrained", "tensor_entries"]
