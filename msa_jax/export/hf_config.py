"""``config.json`` ↔ :class:`ModelConfig` for HF Qwen3 and the MSA-4B release (SPEC §7).

Plain JSON dicts, so conversion needs no ``transformers`` install; the tests
check that ``transformers.Qwen3Config`` loads what is written here.
"""
from __future__ import annotations

from typing import Any

from msa_jax.config import ModelConfig, parse_router_layers
from msa_jax.export.errors import CheckpointError
from msa_jax.export.names import FORMAT_HF, FORMAT_MSA

MODEL_TYPE_QWEN3 = "qwen3"
MODEL_TYPE_MSA = "msa"
MODEL_TYPE_TO_FORMAT = {MODEL_TYPE_QWEN3: FORMAT_HF, MODEL_TYPE_MSA: FORMAT_MSA}

# The authors' release values of ``msa_config`` (SPEC §7). ``router_layer_idx``,
# ``top_k_docs``, ``pooling_kernel_size`` and ``rewrite_position`` are replaced by the
# model's own; ``doc_top_k`` and ``routing_score`` are added (see ``msa_config_dict``).
MSA_RELEASE_CONFIG: dict[str, Any] = {
    "router_layer_idx": "18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35",
    "top_k_docs": 16,
    "pooling_kernel_size": 64,
    "decouple_router": True,
    "head_reduce_method": "mean",
    "query_reduce_method": "max",
    "chunk_reduce_method": "max",
    "decouple_pooling_mode": "mean",
    "aux_loss_method": "INFONCE_DECOUPLE",
    "infonce_loss_temp": 0.1,
    "rewrite_position": True,
    "aux_loss": False,
    "lmloss_weigth": 1.0,  # sic, the release's spelling
    "auxloss_weight": 0.1,
    "recloss_weight": 0.0,
    "ansloss_weight": 1.0,
}
# msa_config values msa_jax computes; any other value is an error on read.
_MSA_SUPPORTED = {
    "decouple_router": True,
    "head_reduce_method": "mean",
    "query_reduce_method": "max",
    "chunk_reduce_method": "max",
    "decouple_pooling_mode": "mean",
}
DEFAULT_MAX_POSITION_EMBEDDINGS = 40960
# msa_jax's key in msa_config for ModelConfig.routing_score; absent (the release) → cosine.
ROUTING_SCORE_KEY = "routing_score"


def checkpoint_format(hf: dict, where: str = "config.json") -> str:
  """``"hf"`` for ``model_type`` qwen3, ``"msa"`` for msa; otherwise a CheckpointError."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPE_TO_FORMAT:
    raise CheckpointError(
        f"{where}: unknown model_type {model_type!r}; msa_jax reads "
        f"{sorted(MODEL_TYPE_TO_FORMAT)} (Qwen3ForCausalLM or the MSA-4B release)")
  return MODEL_TYPE_TO_FORMAT[model_type]


def _rope_theta(hf: dict, where: str) -> float:
  """``rope_theta`` (older transformers) or ``rope_parameters.rope_theta`` (newer)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for block, name in ((params, "rope_parameters"), (scaling, "rope_scaling")):
    kind = block.get("rope_type", block.get("type", "default"))
    if kind != "default":
      raise CheckpointError(f"{where}: {name}.rope_type {kind!r} is not supported "
                            "(msa_jax implements plain RoPE)")
  theta = params.get("rope_theta", hf.get("rope_theta"))
  if theta is None:
    raise CheckpointError(f"{where}: no rope_theta (nor rope_parameters.rope_theta)")
  return float(theta)


def _check_supported(hf: dict, where: str) -> None:
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
  if hf.get("attention_bias", False):
    raise CheckpointError(f"{where}: attention_bias=true is not supported (Qwen3 has none)")
  if hf.get("use_sliding_window", False):
    raise CheckpointError(f"{where}: use_sliding_window=true is not supported")


def model_config_from_hf(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
  """A :class:`ModelConfig` from a Qwen3 or MSA ``config.json`` dict.

  MSA's ``msa_config`` maps to ``router_layers`` (``router_layer_idx``),
  ``top_k`` (``top_k_docs``, or the engine's ``doc_top_k``; they must agree),
  ``pooling_chunk_size`` (``pooling_kernel_size``), ``rope_mode``
  (``rewrite_position``: true → "document", false → "global") and
  ``routing_score`` (msa_jax's own key; absent, as in the release → "cosine",
  what the model was trained with: pass ``routing_score="scaled_dot"`` to route
  as the released engine does).
  A plain Qwen3 config gets the default router layers (upper half).
  ``overrides`` are ModelConfig fields applied last.
  """
  fmt = checkpoint_format(hf, where)
  _check_supported(hf, where)
  try:
    heads = int(hf["num_attention_heads"])
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        rope_theta=_rope_theta(hf, where),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
  except KeyError as e:
    raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
  if fmt == FORMAT_MSA:
    fields.update(_msa_fields(hf, fields["num_layers"], where))
  fields.update(overrides)
  try:
    return ModelConfig.from_dict(fields)
  except ValueError as e:
    raise CheckpointError(f"{where}: {e}") from None


def _msa_fields(hf: dict, num_layers: int, where: str) -> dict:
  msa = hf.get("msa_config")
  if not isinstance(msa, dict):
    raise CheckpointError(f"{where}: model_type 'msa' needs an 'msa_config' object")
  for key, want in _MSA_SUPPORTED.items():
    if key in msa and msa[key] != want:
      raise CheckpointError(f"{where}: msa_config.{key}={msa[key]!r} is not supported "
                            f"(msa_jax computes {want!r})")
  out = {}
  if "router_layer_idx" in msa:
    out["router_layers"] = parse_router_layers(msa["router_layer_idx"], num_layers)
  if "top_k_docs" in msa:
    out["top_k"] = int(msa["top_k_docs"])
  if "doc_top_k" in msa:
    if "top_k_docs" in msa and int(msa["doc_top_k"]) != int(msa["top_k_docs"]):
      raise CheckpointError(
          f"{where}: msa_config.doc_top_k={msa['doc_top_k']} differs from top_k_docs="
          f"{msa['top_k_docs']}; the authors' engine uses doc_top_k, their training "
          "top_k_docs: set both to the k the model was trained with")
    out["top_k"] = int(msa["doc_top_k"])
  if "pooling_kernel_size" in msa:
    out["pooling_chunk_size"] = int(msa["pooling_kernel_size"])
  if "rewrite_position" in msa:
    out["rope_mode"] = "document" if msa["rewrite_position"] else "global"
  if ROUTING_SCORE_KEY in msa:
    out["routing_score"] = msa[ROUTING_SCORE_KEY]
  return out


def router_layer_idx(cfg: ModelConfig) -> str:
  """The release's ``router_layer_idx``: ``"all"`` or a comma string like ``"18,19"``."""
  ids = cfg.router_layer_ids
  if ids == tuple(range(cfg.num_layers)):
    return "all"
  return ",".join(str(i) for i in ids)


def msa_config_dict(cfg: ModelConfig) -> dict:
  """The ``msa_config`` object: release values with the model's own settings.

  ``top_k_docs`` (the authors' training) and ``doc_top_k`` (their inference
  engine: documents per query and the question's position offset ``3 + doc_top_k``)
  both hold the model's k; ``rewrite_position`` is false for ``rope_mode="global"``.
  ``routing_score`` is msa_jax's own key (their engine ignores it and routes by the
  scaled dot product whatever it says), so that ``from_pretrained`` restores it.
  """
  msa = dict(MSA_RELEASE_CONFIG)
  msa["router_layer_idx"] = router_layer_idx(cfg)
  msa["top_k_docs"] = cfg.top_k
  msa["doc_top_k"] = cfg.top_k
  msa["pooling_kernel_size"] = cfg.pooling_chunk_size
  msa["rewrite_position"] = cfg.rope_mode == "document"
  msa[ROUTING_SCORE_KEY] = cfg.routing_score
  return msa


def hf_config_dict(cfg: ModelConfig, fmt: str, dtype_name: str,
                   extra: dict | None = None) -> dict:
  """``config.json`` content for ``fmt`` ("hf" or "msa") with weights of ``dtype_name``.

  ``extra`` adds or replaces top-level keys (e.g. ``max_position_embeddings``,
  ``bos_token_id``), which ModelConfig does not hold.
  """
  hf = {
      "architectures": ["Qwen3ForCausalLM"],
      "model_type": MODEL_TYPE_QWEN3,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": DEFAULT_MAX_POSITION_EMBEDDINGS,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": cfg.num_layers,
      "initializer_range": cfg.initializer_range,
      "use_cache": True,
      "torch_dtype": dtype_name,
      "dtype": dtype_name,
  }
  if fmt == FORMAT_MSA:
    hf["architectures"] = ["MSAForCausalLM"]
    hf["model_type"] = MODEL_TYPE_MSA
    hf["msa_config"] = msa_config_dict(cfg)
  elif fmt != FORMAT_HF:
    raise ValueError(f"unknown checkpoint format {fmt!r}; choose 'hf' or 'msa'")
  hf.update(extra or {})
  return hf
