"""``msa_jax.kernel_shards.per_shard``: one-device kernels run on each device's shard of a
multi-device step (8 forced CPU devices, ``tests/conftest.py``).

The Mosaic GPU interpreter keeps one shared-memory model per process, so interpreted
kernels cannot run on several CPU devices at once: the numerics go through an XLA function
with the kernels' contract (rows and heads independent; the q/k norm's scale shared), and
the kernel paths are checked where they are traced and compiled.
"""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import kernel_shards, layers, sharding
from msa_jax.config import preset
from msa_jax.model import MSAModel
from tests.test_model_kernels import _batch

X_AXES = ("batch", "length", "heads", "head_dim")
AXES = (X_AXES, ("head_dim",), ("batch", "length"))


def _operands(b=8, t=16, h=4, d=128, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  scale = jnp.asarray(rng.normal(1.0, 0.3, size=(d,)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return x, scale, pos, g


def _norm_rope(x, scale, pos):
  return layers.norm_rope_fused_vjp(x, scale, pos, 1e-6, 1e6, jnp.float32)


def _loss_and_grads(fn):
  def loss(x, scale, pos, g):
    return jnp.sum(fn(x, scale, pos) * g)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _sharded(x, scale, pos):
  return kernel_shards.per_shard(_norm_rope, (x, scale, pos), AXES)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1), (1, 1, 4)])
def test_per_shard_equals_the_whole_arrays_and_sums_the_shared_gradient(mesh_shape):
  """Per shard (batch over data × fsdp, heads over tensor) the values and ``dx`` are the
  whole arrays' (XLA's float32 rounding apart, as it vectorises another shape), and the
  scale's gradient, which every shard shares, is the sum over the devices."""
  ops = _operands()
  want = _loss_and_grads(_norm_rope)(*ops)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    fn = _loss_and_grads(_sharded)
    assert "shard_map" in str(jax.make_jaxpr(_sharded)(*ops[:3]))
    got = fn(*ops)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1][0], want[1][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1][1], want[1][1], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(want[1][1]).max()) > 1.0      # a gradient worth summing


def test_whole_arrays_without_a_mesh_or_where_a_dimension_does_not_divide(caplog):
  """No mesh, a mesh of one device: the function as it is. A batch of 6 over 4 devices:
  the whole arrays, and a warning that names why."""
  ops = _operands(b=6)
  assert "shard_map" not in str(jax.make_jaxpr(_sharded)(*ops[:3]))
  with jax.set_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
    assert "shard_map" not in str(jax.make_jaxpr(_sharded)(*ops[:3]))
  with jax.set_mesh(sharding.make_mesh((1, 4, 1), jax.devices()[:4])), \
       nn.logical_axis_rules(sharding.DEFAULT_RULES), caplog.at_level(logging.WARNING):
    assert "shard_map" not in str(jax.make_jaxpr(_sharded)(*ops[:3]))
  assert "does not divide by the mesh" in caplog.text


def test_norm_rope_kernels_compile_per_shard_without_gathering_their_operands():
  """The q/k norm + RoPE kernels (``qk_norm_rope_vjp="pallas"``, interpreted) on a
  mesh: their forward and backward run inside a ``shard_map``, and the compiled step
  gathers none of ``x`` (on the whole arrays XLA all-gathered the kernels' operands onto
  every device: 30 all-gathers in this program)."""
  x, scale, pos, g = _operands()
  x, g = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)

  def loss(x, scale, pos, g):
    y = layers.norm_rope_pallas_vjp(x, scale, pos, 1e-6, 1e6, jnp.bfloat16, interpret=True)
    return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32))
  mesh = sharding.make_mesh((2, 2, 2))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None,
                                                                    "tensor", None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    args = (jax.device_put(x, spec), scale, pos, jax.device_put(g, spec))
    assert "shard_map" in str(jax.make_jaxpr(fn)(*args))
    hlo = fn.lower(*args).compile().as_text()
  assert "all-gather" not in hlo


def test_model_attention_kernels_trace_per_shard_on_a_mesh():
  """``MSAModel`` with ``kernels="pallas"`` traced under a mesh: its attention kernels sit
  inside ``shard_map`` (the documents' and the active tokens'); without a mesh they do not.
  The XLA attention (``kernels="xla"``) is never wrapped."""
  cfg = preset("tiny", num_layers=2, router_layers=(1,), top_k=2, pooling_chunk_size=4,
               head_dim=64)
  batch = _batch(np.random.default_rng(0))
  xla_model = MSAModel(cfg.replace(kernels="xla"))
  params = nn.unbox(xla_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
  model = MSAModel(cfg.replace(kernels="pallas"))

  def jaxpr(m):
    return str(jax.make_jaxpr(lambda p: m.apply({"params": p}, batch).logits_bmv)(params))
  assert "shard_map" not in jaxpr(model)
  with jax.set_mesh(sharding.make_mesh((1, 2, 1), jax.devices()[:2])), \
       nn.logical_axis_rules(sharding.DEFAULT_RULES):
    assert jaxpr(model).count("shard_map") >= 2
    assert "shard_map" not in jaxpr(xla_model)


def test_local_shape_is_each_devices_shard_or_the_whole_array():
  """``local_shape``: batch over data × fsdp and heads over tensor on a (2, 2, 2) mesh;
  the whole shape without a mesh or where a dimension does not divide."""
  shape = (8, 16, 4, 128)
  assert kernel_shards.local_shape(shape, X_AXES) == shape
  with jax.set_mesh(sharding.make_mesh((2, 2, 2))), \
       nn.logical_axis_rules(sharding.DEFAULT_RULES):
    assert kernel_shards.local_shape(shape, X_AXES) == (2, 16, 2, 128)
    assert kernel_shards.local_shape((6, 16, 4, 128), X_AXES) == (6, 16, 4, 128)


@pytest.mark.parametrize("min_tokens,want_kernels", [(64, False), (32, True)])
def test_norm_rope_kernels_threshold_counts_each_devices_tokens(monkeypatch, min_tokens,
                                                                want_kernels):
  """On a GPU the q/k norm kernels start from ``KERNEL_MIN_TOKENS`` tokens *per device*:
  8 x 16 = 128 tokens over a batch sharded 4 ways is 32 a device, below 64 (the XLA code,
  no ``shard_map``) and not below 32 (the kernels, per shard). Traced only."""
  from pallas_kernels import _platform
  monkeypatch.setattr(_platform, "on_gpu", lambda: True)
  monkeypatch.setattr(layers, "KERNEL_MIN_TOKENS", min_tokens)
  x, scale, pos, _ = _operands()
  x = x.astype(jnp.bfloat16)

  def fn(x, scale, pos):
    return layers.norm_rope_pallas_vjp(x, scale, pos, 1e-6, 1e6, jnp.bfloat16)
  with jax.set_mesh(sharding.make_mesh((2, 2, 2))), \
       nn.logical_axis_rules(sharding.DEFAULT_RULES):
    assert ("shard_map" in str(jax.make_jaxpr(fn)(x, scale, pos))) == want_kernels


@pytest.mark.parametrize("heads_axis,local_heads", [("heads", 1), ("kv_heads", 4)])
def test_norm_rope_kernels_shard_heads_by_their_own_logical_axis(monkeypatch, heads_axis,
                                                                 local_heads):
  """Each kernel call sees the heads its logical axis gives it: under rules that spread
  q's heads over ``tensor`` and keep k's (``kv_heads``) whole, a ``(1, 1, 4)`` mesh
  hands the kernels 1 of q's 4 heads and all 4 of k's (not a resharded k)."""
  from pallas_kernels import _platform
  monkeypatch.setattr(_platform, "on_gpu", lambda: True)
  monkeypatch.setattr(layers, "KERNEL_MIN_TOKENS", 1)
  seen = []

  def fake_kernels(x, scale, rope, *static):
    seen.append(x.shape)
    return x
  monkeypatch.setattr(layers, "_norm_rope_kernels", fake_kernels)
  x, scale, pos, _ = _operands()
  rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "kv_heads") + (("kv_heads", None),)
  with jax.set_mesh(sharding.make_mesh((1, 1, 4), jax.devices()[:4])), \
       nn.logical_axis_rules(rules):
    jax.make_jaxpr(lambda x, s, p: layers.norm_rope_pallas_vjp(
        x.astype(jnp.bfloat16), s, p, 1e-6, 1e6, jnp.bfloat16, heads_axis=heads_axis))(
            x, scale, pos)
  assert seen == [(8, 16, local_heads, 128)]
