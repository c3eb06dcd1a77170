"""RoPE angles at the positions of a global-RoPE bank (up to 100M and past): exact enough at
any int32 position, and the plain float32 product (transformers') below 4,096."""
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import rope_precision
from msa_jax import layers


@pytest.mark.parametrize("head_dim", [32, 128])
def test_rope_angles_match_float64_at_every_int32_scale(head_dim):
  inv_freq = layers.rope_inv_freq(head_dim, 1e6)
  pos = np.concatenate([np.arange(0, 300), 4096 + np.arange(-3, 3), [16_752_639, 99_861_439],
                        np.arange(2**31 - 40, 2**31)]).astype(np.int64)
  angles = layers.rope_angles(jnp.asarray(pos, jnp.int32), head_dim, 1e6)
  err = rope_precision.angle_error(angles, pos, inv_freq)
  assert err.max() < 2e-3, err.max()
  # The old float32 product is wrong by radians at 100M (the failure this guards against).
  plain = rope_precision.float32_product_angles(pos, head_dim, 1e6)
  assert rope_precision.angle_error(plain, pos, inv_freq).max() > 1.0


def test_rope_angles_are_the_float32_product_below_4096():
  """Bit for bit what transformers computes (float32 position × float32 frequency) where
  a document-RoPE model ever looks: the HF parity of the model is untouched."""
  pos = np.arange(4096, dtype=np.int32)
  expect = rope_precision.float32_product_angles(pos, 64, 1e6)
  np.testing.assert_array_equal(np.asarray(layers.rope_angles(jnp.asarray(pos), 64, 1e6)),
                                np.asarray(expect))


def test_rope_inv_freq_is_the_rounded_float64_frequency():
  w = layers.rope_inv_freq(128, 1e6)
  assert w.dtype == np.float32 and w.shape == (64,)
  np.testing.assert_allclose(w, 1e6 ** (-np.arange(0, 128, 2) / 128), rtol=6e-8)


def test_apply_rope_at_a_large_position_matches_the_float64_rotation():
  """The whole rotation (rotate-half) at position 99,861,439 against float64."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 2, 1, 32)).astype(np.float32)
  pos = np.array([[99_861_438, 99_861_439]], np.int32)
  y = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), 1e6), np.float64)
  w = layers.rope_inv_freq(32, 1e6).astype(np.float64)
  ang = pos[0, :, None].astype(np.float64) * w[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  x64 = x[0, :, 0].astype(np.float64)
  rot = np.concatenate([-x64[:, 16:], x64[:, :16]], -1)
  np.testing.assert_allclose(y[0, :, 0], x64 * cos + rot * sin, atol=5e-3)


def test_rope_precision_benchmark_writes_its_table(tmp_path):
  rope_precision.main(["--positions=16384,99861440", f"--out={tmp_path}"])
  import json
  rows = json.load(open(tmp_path / "rope_precision.json"))["rows"]
  assert rows[1]["float32_product"]["max_error_rad"] > 1.0
  assert rows[1]["rope_angles"]["max_error_rad"] < 2e-3
