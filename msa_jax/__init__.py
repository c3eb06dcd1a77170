"""msa_jax: Memory Sparse Attention (MSA) on a Qwen3 backbone, in JAX/Flax."""
from msa_jax.batch import MSABatch
from msa_jax.config import ModelConfig, preset
from msa_jax.model import MSAModel, MSAOutput

__version__ = "0.1.0"


def from_pretrained(path, **kwargs):
  """Loads ``(model, params)`` from an HF Qwen3 dir, an MSA-4B dir or an msa_jax checkpoint.

  See :func:`msa_jax.export.convert.from_pretrained` for the options.
  """
  from msa_jax.export.convert import from_pretrained as _load
  return _load(path, **kwargs)


def save_pretrained(model, params, path, format="hf", **kwargs):
  """Writes a Hugging Face Qwen3 (``format="hf"``) or MSA-4B (``format="msa"``) dir.

  See :func:`msa_jax.export.convert.save_pretrained` for the options.
  """
  from msa_jax.export.convert import save_pretrained as _save
  return _save(model, params, path, format=format, **kwargs)


__all__ = ["MSABatch", "ModelConfig", "MSAModel", "MSAOutput", "from_pretrained", "preset",
           "save_pretrained"]
