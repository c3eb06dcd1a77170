"""Declarative tensor-name table: PyTorch (HF Qwen3 / MSA-4B) names ↔ msa_jax param paths.

One row per tensor family, used by both the reader and the writer (SPEC §7).
``{i}`` in a template is the layer index. Linear weights are ``[out, in]`` in
PyTorch and ``[in, out]`` in Flax, so their rows carry ``transpose=True``.
"""
from __future__ import annotations

import dataclasses

from msa_jax.config import ModelConfig

FORMAT_HF = "hf"    # transformers Qwen3ForCausalLM
FORMAT_MSA = "msa"  # the authors' MSA-4B release
FORMATS = (FORMAT_HF, FORMAT_MSA)

# Where a family exists.
SCOPE_MODEL = "model"            # once per model
SCOPE_UNTIED_HEAD = "untied_head"  # once, only when the embedding is not tied
SCOPE_LAYER = "layer"            # every decoder layer
SCOPE_ROUTER = "router"          # router layers, MSA format only

# The MSA-4B release's scalar InfoNCE temperature tensor (not an msa_jax parameter).
TEMPERATURE_NAME = "temperature"
# Old HF checkpoints may carry RoPE buffers; they are recomputed, so reading ignores them.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorFamily:
  """One row of the table: a PyTorch name template and the matching Flax param path."""

  torch_name: str
  param_path: tuple[str, ...]
  transpose: bool
  scope: str


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One concrete tensor: a family row with the layer index filled in."""

  torch_name: str
  param_path: tuple[str, ...]
  transpose: bool
  is_router: bool


def _layer(torch_suffix: str, *param_path: str, transpose: bool = False,
           scope: str = SCOPE_LAYER) -> TensorFamily:
  return TensorFamily(f"model.layers.{{i}}.{torch_suffix}", ("layers_{i}",) + param_path,
                      transpose, scope)


TENSOR_FAMILIES: tuple[TensorFamily, ...] = (
    TensorFamily("model.embed_tokens.weight", ("embed_tokens", "embedding"), False, SCOPE_MODEL),
    _layer("input_layernorm.weight", "input_layernorm", "scale"),
    _layer("self_attn.q_proj.weight", "q_proj", "kernel", transpose=True),
    _layer("self_attn.k_proj.weight", "k_proj", "kernel", transpose=True),
    _layer("self_attn.v_proj.weight", "v_proj", "kernel", transpose=True),
    _layer("self_attn.o_proj.weight", "o_proj", "kernel", transpose=True),
    _layer("self_attn.q_norm.weight", "q_norm", "scale"),
    _layer("self_attn.k_norm.weight", "k_norm", "scale"),
    _layer("self_attn.router_q_proj.0.weight", "router_q_proj", "kernel", transpose=True,
           scope=SCOPE_ROUTER),
    _layer("self_attn.router_k_proj.0.weight", "router_k_proj", "kernel", transpose=True,
           scope=SCOPE_ROUTER),
    _layer("post_attention_layernorm.weight", "post_attention_layernorm", "scale"),
    _layer("mlp.gate_proj.weight", "mlp", "gate_proj", "kernel", transpose=True),
    _layer("mlp.up_proj.weight", "mlp", "up_proj", "kernel", transpose=True),
    _layer("mlp.down_proj.weight", "mlp", "down_proj", "kernel", transpose=True),
    TensorFamily("model.norm.weight", ("norm", "scale"), False, SCOPE_MODEL),
    TensorFamily("lm_head.weight", ("lm_head", "kernel"), True, SCOPE_UNTIED_HEAD),
)


def _fill(family: TensorFamily, i: int | None) -> TensorEntry:
  fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
  return TensorEntry(fmt(family.torch_name), tuple(fmt(p) for p in family.param_path),
                     family.transpose, family.scope == SCOPE_ROUTER)


def tensor_entries(cfg: ModelConfig, fmt: str, with_router: bool | None = None) -> list[TensorEntry]:
  """Every tensor of ``fmt`` for a model of shape ``cfg``, in file order.

  ``with_router`` (default: ``fmt == "msa"``) includes the router projections of
  ``cfg``'s router layers; the HF Qwen3 format has none.
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
  if with_router is None:
    with_router = fmt == FORMAT_MSA
  router_ids = set(cfg.router_layer_ids)
  head = [f for f in TENSOR_FAMILIES if f.scope == SCOPE_MODEL and f.param_path[0] != "norm"]
  per_layer = [f for f in TENSOR_FAMILIES if f.scope in (SCOPE_LAYER, SCOPE_ROUTER)]
  tail = [f for f in TENSOR_FAMILIES if f.param_path[0] == "norm"]
  if not cfg.tie_word_embeddings:
    tail += [f for f in TENSOR_FAMILIES if f.scope == SCOPE_UNTIED_HEAD]
  entries = [_fill(f, None) for f in head]
  for i in range(cfg.num_layers):
    for f in per_layer:
      if f.scope == SCOPE_ROUTER and not (with_router and i in router_ids):
        continue
      entries.append(_fill(f, i))
  entries += [_fill(f, None) for f in tail]
  return entries


def router_entries(cfg: ModelConfig) -> list[TensorEntry]:
  """The router projections of ``cfg``'s router layers (MSA-format names)."""
  return [e for e in tensor_entries(cfg, FORMAT_MSA) if e.is_router]


def is_ignorable(name: str, cfg: ModelConfig) -> bool:
  """Names a reader may skip: RoPE buffers, a redundant tied ``lm_head``, ``temperature``."""
  if name.endswith(IGNORED_SUFFIXES) or name == TEMPERATURE_NAME:
    return True
  return name == "lm_head.weight" and cfg.tie_word_embeddings
