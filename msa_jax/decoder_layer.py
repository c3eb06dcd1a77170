"""One Qwen3 decoder block with MSA's two paths: ``encode`` (documents, prefix) and
``active`` (the active tokens over ``[context ; selected chunks ; own causal]``)."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from msa_jax import attention as attention_lib
from msa_jax import kernel_shards, routing
from msa_jax.config import ModelConfig
from msa_jax.layer_memory import LayerContext
from msa_jax.layers import MLP, RMSNorm, dense

BATCH_LENGTH_EMBED = ("batch", "length", "embed")
BATCH_LENGTH_HEADS = ("batch", "length", "heads", "head_dim")
BATCH_LENGTH_KV = ("batch", "length", "kv_heads", "head_dim")
# The logical axes of sparse attention's operands: q, own k and v, own mask, then the
# context's k, v and mask
_ATTEND_AXES = (BATCH_LENGTH_HEADS, BATCH_LENGTH_KV, BATCH_LENGTH_KV, ("batch", "length"),
                BATCH_LENGTH_KV, BATCH_LENGTH_KV, ("batch", "length"))
# The residual after attention (the MLP block's input), named for remat_policy="mlp_input".
MLP_INPUT = "mlp_input"


class DecoderLayer(nn.Module):
  """One Qwen3 block; a router layer also owns ``router_q_proj``/``router_k_proj``."""

  cfg: ModelConfig
  is_router: bool = False

  def setup(self):
    cfg = self.cfg
    norm = lambda name, axis="norm", heads="heads": RMSNorm(
        cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, axis, cfg.rms_norm_vjp,
        cfg.qk_norm_rope_vjp, heads, name=name)
    hd = cfg.num_heads * cfg.head_dim
    kvd = cfg.num_kv_heads * cfg.head_dim
    self.input_layernorm = norm("input_layernorm")
    self.q_proj = dense(hd, cfg, ("embed", "q_heads"), "q_proj")
    self.k_proj = dense(kvd, cfg, ("embed", "kv_heads"), "k_proj")
    self.v_proj = dense(kvd, cfg, ("embed", "kv_heads"), "v_proj")
    self.o_proj = dense(cfg.hidden_size, cfg, ("q_heads", "embed"), "o_proj")
    self.q_norm = norm("q_norm", "head_dim")
    self.k_norm = norm("k_norm", "head_dim", "kv_heads")
    if self.is_router:
      self.router_q_proj = dense(hd, cfg, ("embed", "q_heads"), "router_q_proj")
      self.router_k_proj = dense(kvd, cfg, ("embed", "kv_heads"), "router_k_proj")
    self.post_attention_layernorm = norm("post_attention_layernorm")
    self.mlp = MLP(cfg, name="mlp")

  def _heads(self, x, n):
    return x.reshape(*x.shape[:-1], n, self.cfg.head_dim)

  def _project(self, x_btd, pos_bt):
    cfg = self.cfg
    h = self.input_layernorm(x_btd)
    # All three projections read the same (padded) rows, so XLA can merge them into one
    # GEMM, as it does for the prefill; a decoding step's Q alone was a cuBLAS GEMV.
    h_rows, t = _gemm_rows(h), h.shape[1]
    q = self.q_norm(self._heads(self.q_proj(h_rows)[:, :t], cfg.num_heads), pos_bt,
                    cfg.rope_theta)
    k = self.k_norm(self._heads(self.k_proj(h_rows)[:, :t], cfg.num_kv_heads), pos_bt,
                    cfg.rope_theta)
    v = self._heads(self.v_proj(h_rows)[:, :t], cfg.num_kv_heads)
    q = nn.with_logical_constraint(q, BATCH_LENGTH_HEADS)
    k = nn.with_logical_constraint(k, BATCH_LENGTH_KV)
    v = nn.with_logical_constraint(v, BATCH_LENGTH_KV)
    return h, q, k, v

  def _finish(self, x_btd, attn_bthd):
    b, t, h, d = attn_bthd.shape
    x = x_btd + self.o_proj(attn_bthd.reshape(b, t, h * d))   # no -1: T may be 0 (no prefix)
    x = checkpoint_name(x, MLP_INPUT)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)

  def _xla_attention(self) -> bool:
    """The configured attention (``kernels``: auto | pallas | xla) is the XLA reference. The
    Mosaic GPU kernel tiles head_dim by 64 and runs on a GPU: "auto" falls back to XLA
    elsewhere."""
    from pallas_kernels import _platform
    return _platform.resolve(self.cfg.kernels) == "xla" or (
        self.cfg.kernels == "auto" and self.cfg.head_dim % 64)

  def _attend(self, *args):
    """Attention through the configured implementation: ``(q, k, v, mask)`` and optionally
    the context's ``(k, v, mask)``. The Pallas kernels run on each device's shard of a
    multi-device step (``kernel_shards.per_shard``)."""
    if self._xla_attention():
      return attention_lib.attend(*args)
    from pallas_kernels import sparse_attention  # GPU kernels load only when asked for
    cfg = self.cfg
    bs = sparse_attention.BlockSizes(pad_free=cfg.attention_pad_free,
                                     short_persistent=cfg.attention_short_persistent,
                                     short_persistent_bwd=cfg.attention_short_persistent_bwd)

    def attend(*a):
      return sparse_attention.attend(*a, implementation=cfg.kernels, block_sizes=bs)
    return kernel_shards.per_shard(attend, args, _ATTEND_AXES[:len(args)])

  def _attend_context(self, q, k_ctx, v_ctx, ctx_mask):
    """:meth:`_attend` over the context alone (``attention.attend_context``)."""
    if self._xla_attention():
      return attention_lib.attend_context(q, k_ctx, v_ctx, ctx_mask)
    from pallas_kernels import sparse_attention
    return sparse_attention.attend_context(q, k_ctx, v_ctx, ctx_mask,
                                           implementation=self.cfg.kernels)

  def encode(self, x_btd, pos_bt, mask_bt):
    """A causal, self-contained stream (a document or the prefix).

    Returns ``(x_out, k, v, rk)``; ``rk`` (router keys ``[B, T, Hkv, D]``) is
    None outside router layers.
    """
    h, q, k, v = self._project(x_btd, pos_bt)
    attn = self._attend(q, k, v, mask_bt)
    rk = None
    if self.is_router:
      rk = self._heads(self.router_k_proj(self._router_input(h)), self.cfg.num_kv_heads)
      if self.is_initializing():  # create router_q_proj even from a plain-LM init
        self.router_q_proj(h)
    return self._finish(x_btd, attn), k, v, rk

  def _router_input(self, h):
    """What the router projections read: ``h``; its gradient scaled by
    ``router_trunk_grad``."""
    scale = float(self.cfg.router_trunk_grad)
    if scale == 1.0:
      return h
    fixed = jax.lax.stop_gradient(h)
    # fixed + s·(h − fixed) is exactly h in the forward (h − fixed = 0); its gradient is s.
    return fixed if scale == 0.0 else fixed + scale * (h - fixed)

  def active(self, x_bmd, pos_bm, mask_bm, context: Optional[LayerContext], memory,
             route_mask_bm):
    """Active tokens: attend ``[context ; selected chunks ; own causal]``.

    ``memory`` (one layer of a memory source, see ``ExampleMemory``) is routed in a
    router layer; ``None`` means no routing here (e.g. a decoding step whose
    context already holds the selected chunks). Returns ``(x_out, k, v, decision, ctx)``:
    ``ctx`` is what the tokens attended before themselves (None if nothing).
    """
    cfg = self.cfg
    h, q, k, v = self._project(x_bmd, pos_bm)
    decision = None
    if self.is_router and memory is not None:
      rq = self._heads(self.router_q_proj(self._router_input(h)), cfg.num_heads)
      rq_bmf = routing.group_sum_queries(rq, cfg.num_kv_heads, cfg.routing_score)
      decision, mem_k, mem_v, mem_mask = memory.select(rq_bmf, route_mask_bm, cfg.top_k)
      mem_k, mem_v = mem_k.astype(k.dtype), mem_v.astype(v.dtype)
      context = (LayerContext(mem_k, mem_v, mem_mask) if context is None
                 else context.extend(mem_k, mem_v, mem_mask))
    if context is None:
      attn = self._attend(q, k, v, mask_bm)
    elif context.own_slot_b is not None:    # a decoding step: its own K/V into the cache first
      if decision is not None:
        raise ValueError("a context with own_slot_b (a decoding step's KV cache) is not "
                         "routed: pass memory=None")
      context = context.with_own(k, v)
      attn = self._attend_context(q, context.k_bsgd.astype(k.dtype),
                                  context.v_bsgd.astype(v.dtype), context.mask_bs)
    else:
      attn = self._attend(q, k, v, mask_bm, context.k_bsgd.astype(k.dtype),
                          context.v_bsgd.astype(v.dtype), context.mask_bs)
    return self._finish(x_bmd, attn), k, v, decision, context


_GEMM_MIN_ROWS = 8


def _gemm_rows(h_btd):
  """``h_btd`` with its token axis zero-padded to at least 8 rows (``B·T``) in all.

  For the Q/K/V projections of a decoding step: XLA's GPU simplifier rewrites a dot of under
  10M multiply-adds as a multiply and a reduce that write and read a weight-sized product.
  A one-token K or V projection at the 4B shape (1 × 2560 × 1024) took ~21 µs a layer that
  way on the H200 (0.75 ms of a 4.9 ms decoding step); with 8 rows it is a GEMM reading
  the weights once. Rows are independent: the real rows' outputs are unchanged.
  """
  b, t, _ = h_btd.shape
  if b * t >= _GEMM_MIN_ROWS or b * t == 0:
    return h_btd
  return jnp.pad(h_btd, ((0, 0), (0, -(-_GEMM_MIN_ROWS // b) - t), (0, 0)))
