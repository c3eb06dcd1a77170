"""``pallas_kernels.small_top_k``: the routing tail's top-k of a short row in one kernel,
interpreted on the CPU against ``route_tail.tree_top_k`` and a float64 numpy sort (ties to
the lower key), and lowered for CUDA at the engine's shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import route_tail, small_top_k


def _numpy_top_k(x, keys, k):
  """Values and keys of the k best (value desc, key asc) of each row; float64 numpy."""
  out_v, out_k = [], []
  for xr, kr in zip(x.astype(np.float64), keys):
    order = np.lexsort((kr, -xr))[:k]
    out_v.append(xr[order])
    out_k.append(kr[order])
  return np.array(out_v), np.array(out_k)


def _case(n, b, seed, ties, neg_inf=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, n)).astype(np.float32)
  if ties:   # few distinct values: ties decided by the key
    x = np.round(x * 2) / 2
  if neg_inf:
    x[:, rng.choice(n, size=min(neg_inf, n), replace=False)] = -np.inf
  return x


@pytest.mark.parametrize("n", [5, 200, 1000, 4096, 15625])
@pytest.mark.parametrize("ties", [False, True])
def test_index_keys_match_the_tree_and_numpy_interpret(n, ties):
  x = _case(n, 2, n, ties)
  got_v, got_i = small_top_k.top_k(jnp.asarray(x), 16, interpret=True)
  idx = np.broadcast_to(np.arange(n), x.shape)
  want_v, want_i = _numpy_top_k(x, idx, min(16, n))
  np.testing.assert_array_equal(np.asarray(got_v), want_v.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(got_i), want_i)
  tree_v, tree_i = route_tail.tree_top_k(jnp.asarray(x), 16)
  np.testing.assert_array_equal(np.asarray(got_i), np.asarray(tree_i))


@pytest.mark.parametrize("n,k", [(4096, 16), (2048, 5), (300, 16)])
def test_given_keys_and_minus_inf_interpret(n, k):
  """Keys (unique, not in index order) break ties; -inf entries never beat a finite one."""
  x = _case(n, 3, 7 + n, ties=True, neg_inf=n // 3)
  rng = np.random.default_rng(n)
  keys = np.stack([rng.permutation(n) * 3 + 1 for _ in range(3)]).astype(np.int32)
  got_v, got_k = small_top_k.top_k(jnp.asarray(x), k, jnp.asarray(keys), interpret=True)
  want_v, want_k = _numpy_top_k(x, keys, k)
  np.testing.assert_array_equal(np.asarray(got_v), want_v.astype(np.float32))
  finite = np.isfinite(want_v)
  np.testing.assert_array_equal(np.asarray(got_k)[finite], want_k[finite])


def test_fewer_finite_entries_than_k_interpret():
  x = np.full((1, 3000), -np.inf, np.float32)
  x[0, [17, 2999, 1500]] = [1.0, 3.0, 1.0]
  got_v, got_i = small_top_k.top_k(jnp.asarray(x), 16, interpret=True)
  assert np.asarray(got_v)[0, :3].tolist() == [3.0, 1.0, 1.0]
  assert np.asarray(got_i)[0, :3].tolist() == [2999, 17, 1500]
  assert np.all(np.isneginf(np.asarray(got_v)[0, 3:]))


def test_plan_limits():
  assert small_top_k.plan(16385, 16) is None and small_top_k.plan(100, 17) is None
  p = small_top_k.plan(15625, 16)   # 100M tokens of 100-token documents: 15,625 rows
  assert p.n_pad == 16384 and p.widths == (128, 32) and p.final == 512
  assert small_top_k.top_k(jnp.zeros((1, 20000)), 16, interpret=True) is None


@pytest.mark.parametrize("n,keys", [(15625, False), (4096, True)])
def test_lowers_for_the_gpu(n, keys):
  """Mosaic GPU's static checks (copies, register layouts) pass at the engine's shapes
  (lowering runs on a CPU; the compiled comparison is the GPU test)."""
  sds = jax.ShapeDtypeStruct
  fn = jax.jit(lambda x, k: small_top_k.top_k(x, 16, k, interpret=False))
  key_arg = sds((1, n), jnp.int32) if keys else None
  text = fn.trace(sds((1, n), jnp.float32), key_arg).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize("n,b", [(15625, 1), (15625, 8), (4096, 8), (1000, 1), (200, 2)])
def test_gpu_compiled_equals_the_tree(n, b):
  x = jnp.asarray(_case(n, b, n + b, ties=True, neg_inf=n // 5))
  keys = jnp.asarray(np.stack([np.random.default_rng(i).permutation(n)
                               for i in range(b)]).astype(np.int32))
  for kk in (None, keys):
    got = small_top_k.top_k(x, 16, kk)
    want = route_tail.tree_top_k(x, 16, keys_bn=kk)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    finite = np.isfinite(np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1])[finite], np.asarray(want[1])[finite])


@pytest.mark.parametrize("rows,max_run", [(130, 2), (40, 5)])
def test_run_top_k_with_the_kernel_interpret(rows, max_run):
  """The run tail with ``method="pallas"`` (both top-k's in the kernel) chooses the runs,
  scores and keys of the XLA tree's (``"rank"``), with the bank's codes and run keys."""
  rng = np.random.default_rng(rows)
  c = rows * 128 - 37
  lens = []
  while sum(lens) < c - 20:
    lens.append(int(rng.integers(1, max_run + 1)))
  run_c = np.full(c, -1, np.int32)
  run_c[:sum(lens)] = np.repeat(np.arange(len(lens)), lens)
  run_key = np.full(c, -1, np.int32)
  run_key[:len(lens)] = rng.permutation(len(lens)) * 2
  s = jnp.asarray(np.round(rng.standard_normal((2, c)) * 3).astype(np.float32) / 3)
  codes = route_tail.run_codes(jnp.asarray(run_c), 128)
  args = (s, jnp.asarray(run_c), 16, 128, max_run)
  kw = dict(run_key_r=jnp.asarray(run_key), codes_c=codes)
  want = route_tail.run_top_k(*args, method="rank", **kw)
  got = route_tail.run_top_k(*args, method="pallas", **kw)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
