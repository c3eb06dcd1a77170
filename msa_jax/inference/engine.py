"""Stages 2-3 of inference (SPEC §5): route, assemble the context, decode with a KV cache.

``Engine`` answers questions from a memory through the model's own stage functions:
``decode_active`` on the question routes in every router layer (through a memory source:
a shared bank placed on a mesh, ``memory.BankMemory``, or per-example memories as in
training, ``model.ExampleMemory``) and returns each layer's context and K/V: the KV cache
is exactly that. Each decoding step is ``decode_active`` on one token whose context is
``[prefix ; selected chunks ; earlier active tokens]``; ``decode_tokens`` samples and decodes
a round's tokens in one device loop. The Memory Interleave loop (``interleave.py``) runs on
the host around these jitted functions.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from msa_jax.inference.memory import BankMemory, BankSettings
from msa_jax.model import ExampleMemory, LayerContext, MSAModel


KV_TILE = 128   # the attention kernel's key tile: a cache this long is read without padding


@flax.struct.dataclass
class DecodeCache:
  """The KV cache of a batch, one buffer per layer: ``[context ; active tokens ; padding]``.

  ``k[i]``, ``v[i]``: ``[B, L_i, Hkv, D]``: layer ``i``'s context (prefix ; selected
  chunks: ``S_i`` slots), then the active tokens' K/V (token ``j`` at slot ``S_i + j``,
  valid below the row's current slot), zero-padded to a multiple of ``KV_TILE``. A decoding
  step attends to the buffer as it is and writes its token in place: no per-step
  concatenation of context and cache, and no padding copy for the attention kernel.
  ``context_mask[i]``: bool ``[B, S_i]``, the valid context slots. ``active_slots``: the
  prefill's buffer length ``M``, the most active tokens the cache holds.
  """

  k: list
  v: list
  context_mask: list
  active_slots: int = flax.struct.field(pytree_node=False, default=0)

  @classmethod
  def from_prefill(cls, kv, m: int) -> "DecodeCache":
    """The cache of a prefill's per-layer ``LayerKV`` over ``m`` active slots."""
    k, v, masks = [], [], []
    for x in kv:
      b, s, g, d = x.context.k_bsgd.shape
      pad = -(-(s + m) // KV_TILE) * KV_TILE - s - m
      dt = x.k_bmgd.dtype

      def full(ctx, own):
        return jnp.concatenate([ctx.astype(dt), own.astype(dt),
                                jnp.zeros((b, pad, g, d), dt)], axis=1)
      k.append(full(x.context.k_bsgd, x.k_bmgd))
      v.append(full(x.context.v_bsgd, x.v_bmgd))
      masks.append(jnp.asarray(x.context.mask_bs, bool))
    return cls(k, v, masks, m)

  def contexts(self, cur_b) -> list[LayerContext]:
    """Each layer's buffer as the whole context of the token at active slot ``cur_b``: the
    valid context slots, the active tokens before it, and its own slot, where the layer
    writes the token's K/V before attending (``LayerContext.own_slot_b``)."""
    out = []
    for k, v, ctx_mask in zip(self.k, self.v, self.context_mask):
      s = ctx_mask.shape[1]
      active = jnp.arange(k.shape[1] - s, dtype=jnp.int32)
      mask = jnp.concatenate([ctx_mask, active[None] <= cur_b[:, None]], axis=1)
      out.append(LayerContext(k, v, mask, (s + cur_b).astype(jnp.int32)))
    return out


@flax.struct.dataclass
class PrefixContext:
  """Each layer's prefix K/V for a batch: ``k[i] [B, T, Hkv, D]``, ``mask [B, T]``."""

  k: list
  v: list
  mask: jax.Array

  def layer_contexts(self) -> list[LayerContext]:
    return [LayerContext(k, v, self.mask) for k, v in zip(self.k, self.v)]


def memory_source(kind: str, settings: Optional[BankSettings], mem_args, forced):
  """The memory source of a jitted step: ``bank`` (a placed bank) or ``examples``."""
  if kind == "bank":
    return BankMemory(mem_args, settings, forced)
  return ExampleMemory(mem_args, forced)


class _LeadingRows:
  """A memory source whose router layers route with the first ``rows`` slots only.

  The prefill's buffer is the question plus room for generated tokens; those slots never
  route (the routing mask excludes them), but every query row costs the routing kernel a
  row of its tile (80 rows pad to two 64-row wgmma tiles). Results are unchanged.
  """

  def __init__(self, memory, rows: int):
    self.memory, self.rows = memory, rows

  def layer(self, i: int):
    inner = self.memory.layer(i)
    return None if inner is None else _LeadingRowsLayer(inner, self.rows)


class _LeadingRowsLayer:
  """One layer of :class:`_LeadingRows`: routes with the first ``rows`` query rows."""

  def __init__(self, inner, rows: int):
    self.inner, self.rows = inner, rows

  def select(self, rq_bmf, route_mask_bm, top_k: int):
    return self.inner.select(rq_bmf[:, :self.rows], route_mask_bm[:, :self.rows], top_k)


def prefill(model: MSAModel, kind: str, settings, params, mem_args, prefix: PrefixContext,
            tokens_bm, q_len_b, active_start_b, forced=None, all_logits: bool = False,
            route_rows: Optional[int] = None):
  """Stage 2 on a batch of questions: route in every router layer and fill the KV cache.

  Args:
    tokens_bm: int32 ``[B, M]`` questions, left-aligned; slots from ``q_len_b`` on are room
      for generated tokens (their content does not matter).
    q_len_b: int32 ``[B]`` question lengths (>= 1).
    active_start_b: int32 ``[B]`` position of the first question token (SPEC §2: T + k).
    forced: a ``routing.Selection`` that replaces the router's choice (oracle), or None.
    route_rows: static; every question fits in the first ``route_rows`` slots
      (``max(q_len_b) <= route_rows``, checked by ``Engine.prefill``): routing reads only
      those rows. None routes with all ``M``.
  Returns ``(logits [B, vocab] of each question's last token, decisions per router layer,
  DecodeCache)``; ``all_logits`` returns ``[B, M, vocab]`` instead (tests).
  """
  b, m = tokens_bm.shape
  slots = jnp.arange(m, dtype=jnp.int32)
  mask = slots[None] < q_len_b[:, None]
  pos = active_start_b[:, None] + slots[None]
  memory = memory_source(kind, settings, mem_args, forced)
  if route_rows is not None and route_rows < m:
    memory = _LeadingRows(memory, route_rows)
  logits, decisions, kv = model.apply(
      {"params": params}, tokens_bm, pos, mask, mask, prefix.layer_contexts(), memory,
      return_kv=True, method=MSAModel.decode_active)
  last = (logits if all_logits else
          jnp.take_along_axis(logits, (q_len_b - 1)[:, None, None], axis=1)[:, 0])
  return last, decisions, DecodeCache.from_prefill(kv, m)


def decode_step(model: MSAModel, params, cache: DecodeCache, token_b, cur_b, active_start_b):
  """Stage 3, one token per row: the token at slot ``cur_b`` attends to its cached context.

  Each layer writes the token's K/V into its cache buffer first and attends to the buffer
  alone (``LayerContext.own_slot_b``): the attention kernel never pads a one-token own part
  into a tile of its own (two pads a layer, on the H200 ~3 µs and two launches).
  Returns ``(logits [B, vocab], cache with the token's K/V written at cur_b)``.
  """
  one = jnp.ones((token_b.shape[0], 1), bool)
  logits, _, kv = model.apply(
      {"params": params}, token_b[:, None], (active_start_b + cur_b)[:, None], one, one,
      cache.contexts(cur_b), None, return_kv=True, method=MSAModel.decode_active)
  k = [x.context.k_bsgd for x in kv]
  v = [x.context.v_bsgd for x in kv]
  return logits[:, 0], DecodeCache(k, v, cache.context_mask, cache.active_slots)


def sample(logits_bv, key, temperature: float, top_p: float):
  """Greedy (``temperature == 0``) or nucleus sampling of one token per row."""
  if temperature <= 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits = logits_bv.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p        # always keeps the best token
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def decode_tokens(model: MSAModel, params, cache: DecodeCache, logits_bv, key, cur_b,
                  active_start_b, finished_b, *, max_new_tokens: int, temperature: float,
                  top_p: float, stop_ids: tuple):
  """Up to ``max_new_tokens`` tokens per row in one device loop: sample, then (unless every
  row has stopped or this was the last token) one :func:`decode_step`, as the host loop of
  ``interleave.generate`` did token by token (the same key splits, so the same tokens).

  A row stops after sampling a token in ``stop_ids`` (kept) and samples nothing once
  ``finished_b`` holds for it (rows not in this round). No host round trip per token: the
  host loop paid a device→host copy of each token and two dispatches (with the model's
  parameters as arguments) per step.

  Returns ``(tokens [B, max_new_tokens] int32, -1 where nothing was sampled; key)``.
  """
  b = logits_bv.shape[0]
  stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

  def cond(carry):
    step, stopped = carry[0], carry[6]
    return (step < max_new_tokens) & ~jnp.all(stopped)

  def body(carry):
    step, key, logits, cache, cur, toks, finished = carry
    key, sub = jax.random.split(key)
    tok = sample(logits, sub, temperature, top_p)
    toks = toks.at[:, step].set(jnp.where(finished, -1, tok))
    finished = finished | jnp.any(tok[:, None] == stops[None, :], axis=1)
    more = (step + 1 < max_new_tokens) & ~jnp.all(finished)
    logits, cache = jax.lax.cond(
        more, lambda: decode_step(model, params, cache, tok, cur, active_start_b),
        lambda: (logits, cache))
    return step + 1, key, logits, cache, cur + 1, toks, finished

  toks = jnp.full((b, max_new_tokens), -1, jnp.int32)
  init = (jnp.int32(0), key, logits_bv, cache, cur_b.astype(jnp.int32), toks,
          finished_b.astype(bool))
  _, key, _, _, _, toks, _ = jax.lax.while_loop(cond, body, init)
  return toks, key


class Engine:
  """Jitted prefill / decode / sample for one model and one kind of memory.

  ``kind="bank"``: ``mem_args`` is ``DeviceBank.arrays()`` and ``settings`` its
  ``BankSettings``; ``kind="examples"``: ``mem_args`` is ``encode_documents``' output
  for the batch. One compile per (batch, buffer length).
  """

  def __init__(self, model: MSAModel, params, kind: str, settings: Optional[BankSettings] = None):
    if kind not in ("bank", "examples"):
      raise ValueError(f"kind must be 'bank' or 'examples', got {kind!r}")
    self.model, self.params, self.kind, self.settings = model, params, kind, settings
    self._prefill = jax.jit(functools.partial(prefill, model, kind, settings),
                            static_argnames=("all_logits", "route_rows"))
    self._decode = jax.jit(functools.partial(decode_step, model), donate_argnums=(1,))
    self._sample = jax.jit(sample, static_argnums=(2, 3))
    self._decode_tokens = jax.jit(
        functools.partial(decode_tokens, model),
        static_argnames=("max_new_tokens", "temperature", "top_p", "stop_ids"))

  # Host arguments are copied (``_own``): on CPU a jax array may alias a numpy argument's
  # memory, and a caller that then changes the numpy array in place would race the
  # asynchronously dispatched step (seen: wrong cache slots at large memories).
  def prefill(self, mem_args, prefix, tokens_bm, q_len_b, active_start_b, forced=None,
              route_rows: Optional[int] = None):
    """``prefill`` (see there); ``route_rows`` must hold the longest question."""
    if route_rows is not None and int(np.max(q_len_b)) > route_rows:
      raise ValueError(f"a question of {int(np.max(q_len_b))} tokens does not fit in "
                       f"route_rows={route_rows}: pass at least the longest question length")
    return self._prefill(self.params, mem_args, prefix, _own(tokens_bm), _own(q_len_b),
                         _own(active_start_b), forced, route_rows=route_rows)

  def decode(self, cache, token_b, cur_b, active_start_b):
    """``decode_step`` (see there); a host ``cur_b`` beyond the cache's slots is refused."""
    if not isinstance(cur_b, jax.Array):
      cur = int(np.max(cur_b))
      _check_room(cache, cur, f"decoding at active slot {cur}")
    return self._decode(self.params, cache, _own(token_b), _own(cur_b), _own(active_start_b))

  def sample(self, logits_bv, key, temperature: float = 0.0, top_p: float = 1.0):
    return self._sample(logits_bv, key, float(temperature), float(top_p))

  def decode_tokens(self, cache, logits_bv, key, cur_b, active_start_b, finished_b, *,
                    max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    stop_ids=()):
    """:func:`decode_tokens` (see there): ``(tokens [B, max_new_tokens], key)``. The cache
    must hold ``cur_b + max_new_tokens - 1`` active slots."""
    if not isinstance(cur_b, jax.Array):   # the last step writes slot cur + new - 2
      cur = int(np.max(cur_b))
      _check_room(cache, cur + max_new_tokens - 2,
                  f"{max_new_tokens} new tokens from active slot {cur}")
    return self._decode_tokens(self.params, cache, logits_bv, key, _own(cur_b),
                               _own(active_start_b), jnp.asarray(np.asarray(finished_b, bool)),
                               max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                               top_p=float(top_p), stop_ids=tuple(sorted(int(t) for t in stop_ids)))


def _check_room(cache: DecodeCache, last_slot: int, what: str) -> None:
  """Refuses a write at active slot ``last_slot`` beyond the cache's ``active_slots``."""
  if last_slot >= cache.active_slots:
    raise ValueError(f"{what}: its writes need {last_slot + 1} active slots, but the KV cache holds "
                     f"{cache.active_slots} active slots (the prefill's buffer): prefill with "
                     "a buffer long enough for the question and every new token")


def _own(x):
  """An int32 device array that owns its memory (never a view of a numpy argument)."""
  if isinstance(x, jax.Array):
    return x.astype(jnp.int32)
  return jnp.array(np.array(x, np.int32, copy=True))


def bank_prefix(bank, batch: int) -> PrefixContext:
  """A bank's stored prefix K/V broadcast to a batch."""
  t = len(bank.prefix_tokens)
  k = [jnp.broadcast_to(jnp.asarray(kk)[None], (batch, *kk.shape)) for kk, _ in bank.prefix_kv]
  v = [jnp.broadcast_to(jnp.asarray(vv)[None], (batch, *vv.shape)) for _, vv in bank.prefix_kv]
  return PrefixContext(k, v, jnp.ones((batch, t), bool))


def active_start(model_config, prefix_len: int, memory_tokens: int = 0) -> int:
  """Position of the first active token (SPEC §2): ``T + k``, or after all memory (global)."""
  if model_config.rope_mode == "document":
    return prefix_len + model_config.top_k
  return prefix_len + memory_tokens
