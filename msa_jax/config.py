"""Model configuration: Qwen3 shapes plus the MSA memory settings (SPEC §1, §3)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
from absl import logging

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What a rematerialised layer keeps for the backward (``model.remat_policy_fn``): "none"
# (no remat: every activation is kept), "full" (nothing: the layer's forward runs again in
# the backward), "dots" (matmul outputs without batch dimensions; the rest is recomputed),
# "mlp_input" (the residual after attention, the MLP block's input: one hidden-size
# activation a token a layer; the backward recomputes all but o_proj).
REMAT_POLICIES = ("none", "full", "dots", "mlp_input")
# ModelConfig fields that choose how the model computes its values and gradients (memory,
# kernels, fused passes), not what: the same function and gradient, up to rounding. A run
# may change them on resume (run_config.MAY_CHANGE_ON_RESUME).
COMPUTE_SWITCHES = ("remat", "remat_policy", "scan_layers", "kernels", "rms_norm_vjp",
                    "attention_pad_free", "embed_grad", "qk_norm_rope_vjp",
                    "attention_short_persistent", "attention_short_persistent_bwd", "rope_tables")
# Fields that change neither the parameters nor the forward values: the compute switches and
# the router's gradient into the trunk (which does change training). A bank's model
# fingerprint and ``init_from``'s checkpoint check leave them out.
IMPLEMENTATION_FIELDS = COMPUTE_SWITCHES + ("router_trunk_grad",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the model's parameters and its forward computation.

  ``router_layers=None`` means the upper half of the layers (SPEC §3).

  ``remat_policy`` says what each layer keeps for the backward (``REMAT_POLICIES``).
  ``remat`` is the older boolean switch, still accepted from configs and saved run
  configs: ``True`` means ``remat_policy="full"`` (unless a policy other than "none" is
  given), ``False`` means "none"; after construction it always equals
  ``remat_policy != "none"``, and ``to_dict`` leaves it out. ``scan_layers`` runs each
  run of consecutive identical layers of the training forward as one ``lax.scan``
  (compile time independent of depth; same parameters, same results).
  """

  vocab_size: int = 151936
  hidden_size: int = 2560
  intermediate_size: int = 9728
  num_layers: int = 36
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  initializer_range: float = 0.02
  # MSA.
  router_layers: Optional[tuple[int, ...]] = None
  pooling_chunk_size: int = 64
  top_k: int = 16
  rope_mode: str = "document"          # "document" (parallel + global) | "global" (ablation)
  routing_tokens: str = "question"     # "question" | "question_and_target"
  routing_score: str = "cosine"        # "cosine" (SPEC §3) | "scaled_dot" (released engine)
  # The fraction of the routing loss's gradient that reaches the shared layers through the
  # router projections' input (1: SPEC's joint training; 0: the router projections read
  # the hidden state through stop_gradient, so the routing loss trains them only). The
  # forward is the same. On the reading task the full gradient keeps the reader from
  # learning to name documents (WORKSPACE.md "Why the ids stay at chance"). Configs saved
  # before this field replaced ``router_detach`` load with ``router_detach=True`` as 0.
  router_trunk_grad: float = 1.0
  # Numerics and implementation.
  dtype: str = "float32"               # compute dtype of activations and matmuls
  param_dtype: str = "float32"
  remat_policy: str = "none"           # one of REMAT_POLICIES
  remat: Optional[bool] = None         # legacy switch, see the class docstring
  scan_layers: bool = False
  kernels: str = "xla"                 # "auto" | "pallas" | "xla"
  # How RMSNorm's gradient is computed (layers.RMS_NORM_VJPS): "autodiff" (JAX's own) or
  # "lean" (a hand-written backward from the bf16 inputs; the same gradients to float32
  # rounding; on the H200 the 0.6b step's norm backward took as long with it, 2026-12-05,
  # BENCHMARKS.md "Training step at the recipes' shapes").
  rms_norm_vjp: str = "autodiff"
  # How the q/k norms and RoPE are differentiated (layers.NORM_ROPE_VJPS): "autodiff" (each
  # by JAX, the norm by rms_norm_vjp), "fused" (one hand-written backward for both,
  # layers.norm_rope_fused_vjp: no float32 copy of q need pass between them; the forward in
  # one pass, layers.norm_rope_one_pass) or "fused_bf16" (the same with RoPE's cotangent
  # written once in bf16, as JAX's backward is written; its step at batch 16 on an H100
  # 2.2 % faster than "fused", 2026-12-06, BENCHMARKS.md "Training step at the recipes'
  # shapes") or "pallas" (fused_bf16's values through the Mosaic GPU kernels of
  # pallas_kernels/norm_rope.py on a GPU, its XLA code elsewhere: the 0.6b recipe's; the
  # step 3.5 % faster than fused_bf16 on an H100, compile +10 s, 2026-12-06).
  qk_norm_rope_vjp: str = "autodiff"
  # The Pallas attention without pads of own tokens to whole tiles (sparse_attention
  # BlockSizes.pad_free: TMA reads and writes past the rows): the 0.6b step on the H200
  # went from 4,543 to 4,265 ms with it (2026-12-05); on in the 0.6b and 4b recipes.
  attention_pad_free: bool = False
  # The documents' attention forward (no context, at most 128 tokens) as one persistent
  # kernel streaming (document, head) items (sparse_attention BlockSizes.short_persistent):
  # 25 % faster than the tiled forward at the 0.6b step's documents on an H100
  # (benchmarks/doc_attention.py, 2026-12-05); on in the 0.6b and 4b recipes.
  attention_short_persistent: bool = False
  # Their backward (dQ, dK/dV) as persistent kernels too (sparse_attention BlockSizes.
  # short_persistent_bwd, pallas_kernels/sparse_attention_short_bwd.py): the tiled backward
  # took ~7.7 ms on an H100 against ~2.2 ms of bytes at the 0.6b step's documents
  # (2026-12-05); these ran no faster (11.25 against 11.22 ms forward + backward on an H100,
  # 2026-12-05, BENCHMARKS.md): off. (A one-pass backward, dQ, dK and dV a program per
  # (document, kv head), was slower still: 10.15 against 6.42 ms of kernels, removed.)
  attention_short_persistent_bwd: bool = False
  # RoPE's cos/sin computed once a stream (layers.rope_tables, outside the layer loop) and
  # read by every layer's q/k paths, instead of recomputed from the positions inside each
  # (the angles take two fmods a position; XLA may fuse them into the pass over every head).
  # The same values. On the CPU, one layer's q path forward + backward at a small shape ran
  # ~3 x faster with the tables given (benchmarks/norm_rope.py); in the 0.6b step on an H100
  # no gain (2026-12-05, BENCHMARKS.md): off in the recipes.
  rope_tables: bool = False
  # How the token embedding's gradient is summed (layers.EMBED_GRADS): "f32_scatter" or
  # "sorted" (into float32; sorted: the ids sorted first) or "autodiff" (JAX's scatter-add
  # into the compute dtype: in bf16 it lost up to 49 % of the kv task's gradient, and took
  # 521 ms against 1.8 at the 0.6b step's shape on the H200; benchmarks/embed_grad.py).
  embed_grad: str = "f32_scatter"

  def __post_init__(self):
    if self.router_layers is not None:
      object.__setattr__(self, "router_layers",
                         parse_router_layers(self.router_layers, self.num_layers))
    object.__setattr__(self, "remat_policy", _resolve_remat(self.remat, self.remat_policy))
    object.__setattr__(self, "remat", self.remat_policy != "none")
    self.validate()

  def validate(self) -> None:
    """Raises ``ValueError`` naming the bad field and how to fix it."""
    def need(ok, msg):
      if not ok:
        raise ValueError(f"bad model config: {msg}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim"):
      need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
    need(self.num_heads % self.num_kv_heads == 0,
         f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
    need(0.0 <= float(self.router_trunk_grad) <= 1.0,
         f"router_trunk_grad must be in [0, 1] (the fraction of the routing loss's gradient "
         f"reaching the shared layers), got {self.router_trunk_grad}")
    need(self.pooling_chunk_size >= 1,
         f"pooling_chunk_size (P) must be >= 1, got {self.pooling_chunk_size}")
    need(self.top_k >= 1, f"top_k (k) must be >= 1, got {self.top_k}")
    for i in self.router_layer_ids:
      need(0 <= i < self.num_layers,
           f"router layer {i} is out of range for {self.num_layers} layers "
           f"(valid: 0..{self.num_layers - 1})")
    need(len(set(self.router_layer_ids)) == len(self.router_layer_ids),
         f"router_layers has duplicates: {self.router_layers}")
    need(self.rope_mode in ("document", "global"),
         f"rope_mode must be 'document' or 'global', got {self.rope_mode!r}")
    need(self.routing_tokens in ("question", "question_and_target"),
         f"routing_tokens must be 'question' or 'question_and_target', got {self.routing_tokens!r}")
    need(self.routing_score in ("cosine", "scaled_dot"),
         f"routing_score must be 'cosine' (SPEC §3, as trained) or 'scaled_dot' (the "
         f"authors' released inference engine), got {self.routing_score!r}")
    need(self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    need(self.param_dtype in _DTYPES,
         f"param_dtype must be one of {sorted(_DTYPES)}, got {self.param_dtype!r}")
    need(isinstance(self.scan_layers, bool),
         f"scan_layers must be True or False, got {self.scan_layers!r}")
    need(self.kernels in ("auto", "pallas", "xla"),
         f"kernels must be 'auto', 'pallas' or 'xla', got {self.kernels!r}")
    need(isinstance(self.attention_pad_free, bool),
         f"attention_pad_free must be True or False, got {self.attention_pad_free!r}")
    need(isinstance(self.rope_tables, bool),
         f"rope_tables must be True or False, got {self.rope_tables!r}")
    need(isinstance(self.attention_short_persistent, bool),
         f"attention_short_persistent must be True or False, got "
         f"{self.attention_short_persistent!r}")
    need(isinstance(self.attention_short_persistent_bwd, bool),
         f"attention_short_persistent_bwd must be True or False, got "
         f"{self.attention_short_persistent_bwd!r}")
    need(self.embed_grad in ("autodiff", "f32_scatter", "sorted"),
         f"embed_grad must be 'autodiff', 'f32_scatter' or 'sorted', got {self.embed_grad!r}")
    need(self.rms_norm_vjp in ("autodiff", "lean"),
         f"rms_norm_vjp must be 'autodiff' or 'lean', got {self.rms_norm_vjp!r}")
    need(self.qk_norm_rope_vjp in ("autodiff", "fused", "fused_bf16", "pallas"),
         f"qk_norm_rope_vjp must be 'autodiff', 'fused', 'fused_bf16' or 'pallas', got "
         f"{self.qk_norm_rope_vjp!r}")

  @property
  def router_layer_ids(self) -> tuple[int, ...]:
    """Sorted router layer indices (default: the upper half)."""
    if self.router_layers is None:
      return tuple(range(self.num_layers // 2, self.num_layers))
    return tuple(sorted(self.router_layers))

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **kw) -> "ModelConfig":
    """A copy with fields changed. ``remat=True/False`` alone changes the policy
    ("full" unless one other than "none" is already set / "none"); ``remat_policy``
    alone sets ``remat`` to match."""
    if "remat" in kw and "remat_policy" not in kw:
      remat = kw.pop("remat")
      keep = self.remat_policy if self.remat_policy != "none" else "full"
      kw["remat_policy"] = keep if remat else "none"
    if "remat_policy" in kw and "remat" not in kw:
      kw["remat"] = None
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: Any) -> "ModelConfig":
    """Builds from a dict or ``ml_collections.ConfigDict``; unknown keys are errors."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    _upgrade_router_detach(d)
    _drop_retired_switches(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"bad model config: unknown keys {unknown}; valid keys: {sorted(names)}")
    if d.get("router_layers") is not None:
      d["router_layers"] = parse_router_layers(d["router_layers"], d.get("num_layers", cls.num_layers))
    return cls(**d)

  def to_dict(self) -> dict:
    """The fields as plain JSON types; the legacy ``remat`` is left out (it follows from
    ``remat_policy``), so a config built from this dict can change the policy alone."""
    d = dataclasses.asdict(self)
    d.pop("remat")
    if d["router_layers"] is not None:
      d["router_layers"] = list(d["router_layers"])
    return d


# Compute switches whose code was removed (each chose how, not what, the model computes):
# a saved config's value is dropped; what replaced it computes the same values and gradients
# up to rounding. Name: why it went.
RETIRED_SWITCHES = {
    "attention_short_one_pass_bwd": "the documents' one-pass attention backward, 1.6 x "
                                    "slower than the two-pass kernels on an H100 (session 33)",
}


def _drop_retired_switches(d: dict) -> None:
  """Drops :data:`RETIRED_SWITCHES` from a saved config's dict, warning where one was on."""
  for name, why in RETIRED_SWITCHES.items():
    if d.pop(name, False):
      logging.warning("model config: %s=True is ignored: removed (%s); the model computes "
                      "the same values with the remaining kernels", name, why)


def _upgrade_router_detach(d: dict) -> None:
  """A saved config's ``router_detach`` (the switch ``router_trunk_grad`` replaced): True
  is ``router_trunk_grad=0``, False changes nothing; both set and disagreeing is an error."""
  if "router_detach" not in d:
    return
  detach = d.pop("router_detach")
  if detach not in (True, False):
    raise ValueError(f"bad model config: router_detach must be True or False, got {detach!r}")
  if detach:
    if float(d.get("router_trunk_grad", 0.0)) != 0.0:
      raise ValueError(f"bad model config: router_detach=True and router_trunk_grad="
                       f"{d['router_trunk_grad']} disagree; router_trunk_grad alone says it "
                       "(0 is what router_detach=True was)")
    d["router_trunk_grad"] = 0.0


def _resolve_remat(remat: Optional[bool], policy: str) -> str:
  """The remat policy of a config that may set the legacy ``remat`` and/or ``remat_policy``."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"bad model config: remat_policy must be one of {list(REMAT_POLICIES)} "
                     f"(none: keep every activation; full: recompute each layer in the "
                     f"backward; dots: keep matmul outputs, recompute the rest; mlp_input: "
                     f"keep the residual after attention), got {policy!r}")
  if remat is None:
    return policy
  if remat not in (True, False):
    raise ValueError(f"bad model config: remat must be True or False, got {remat!r}; "
                     f"prefer remat_policy (one of {list(REMAT_POLICIES)})")
  if remat and policy == "none":
    return "full"
  if not remat and policy != "none":
    raise ValueError(f"bad model config: remat=False contradicts remat_policy={policy!r}; "
                     "set remat_policy='none' (remat is the older switch; drop it)")
  return policy


_DEFAULT_ROUTER_WORDS = ("none", "default")


def parse_router_layers(spec: Any, num_layers: int) -> Optional[tuple[int, ...]]:
  """Accepts a sequence of ints, "all", a comma string like "18,19,20", or None / "none" /
  "default" (None: the upper half). A one-word tuple such as ``("all",)`` or ``(None,)`` is
  what ``--config.model.router_layers=all`` / ``=None`` parses to."""
  if isinstance(spec, (tuple, list)) and len(spec) == 1 and (
      spec[0] is None or isinstance(spec[0], str)):
    spec = spec[0]
  if spec is None:
    return None
  bad = ValueError(f"bad model config: router_layers {spec!r} is not 'all', 'none' (the upper "
                   "half) or a list of layer indices like '18,19,20'")
  if isinstance(spec, str):
    word = spec.strip().lower()
    if word in _DEFAULT_ROUTER_WORDS:
      return None
    if word == "all":
      return tuple(range(num_layers))
    spec = [s for s in word.strip("()[]").split(",") if s.strip()]
  try:
    ids = [int(i) for i in spec]
  except (TypeError, ValueError):
    raise bad from None
  if any(isinstance(i, bool) or float(i) != int(i) for i in spec if not isinstance(i, str)):
    raise bad
  return tuple(ids)


PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": ModelConfig(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                              num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                              tie_word_embeddings=True),
    "qwen3-1.7b": ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                              num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                              tie_word_embeddings=True),
    "qwen3-4b": ModelConfig(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                            num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                            tie_word_embeddings=True),
    "qwen3-8b": ModelConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                            num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                            tie_word_embeddings=False),
    # Test shapes: head_dim != hidden / heads on purpose.
    "tiny": ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=32, pooling_chunk_size=4,
                        top_k=2),
}


def preset(name: str, **overrides) -> ModelConfig:
  """A named preset (``qwen3-0.6b``, ``qwen3-1.7b``, ``qwen3-4b``, ``qwen3-8b``, ``tiny``)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
