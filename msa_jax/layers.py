"""Qwen3 building blocks: RMSNorm, RoPE, SwiGLU MLP, projections (SPEC §1)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from msa_jax.config import ModelConfig


def dense(features: int, cfg: ModelConfig, axes: tuple[str, str], name: str) -> nn.Dense:
  """A bias-free linear layer with logically partitioned kernel ``[in, out]``."""
  return nn.Dense(
      features, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.normal(cfg.initializer_range), axes),
      name=name)


class RMSNorm(nn.Module):
  """RMSNorm in float32 with a learned scale; output in ``dtype``."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    y = x32 * jax.lax.rsqrt(var + self.eps) * scale
    return y.astype(self.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
  """cos/sin tables ``[..., D]`` for integer positions (rotate-half layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  pos = positions.astype(jnp.float32)[..., None]
  angles = pos * inv_freq.reshape((1,) * (pos.ndim - 1) + (-1,))
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthd, positions_bt, theta: float):
  """Rotary embedding with the rotate-half convention, computed in float32."""
  cos, sin = rope_cos_sin(positions_bt, x_bthd.shape[-1], theta)
  cos, sin = cos[..., None, :], sin[..., None, :]
  x = x_bthd.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x_bthd.dtype)


class MLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = dense(cfg.intermediate_size, cfg, ("embed", "mlp"), "gate_proj")(x)
    up = dense(cfg.intermediate_size, cfg, ("embed", "mlp"), "up_proj")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return dense(cfg.hidden_size, cfg, ("mlp", "embed"), "down_proj")(h)
