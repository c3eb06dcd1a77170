"""Synthetic banks (``benchmarks.synth_bank``) and the TTFT benchmark at a tiny size on CPU."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from benchmarks import synth_bank
from msa_jax.inference import bank as bank_lib
from msa_jax.inference import quantize
from msa_jax.inference.bank_routing import sharded_top_k, tiled_top_k
from msa_jax.inference.memory import DeviceBank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_cfg():
  return synth_bank.model_config_of("tiny")


def test_doc_lengths_reach_the_tokens_asked_for(tiny_cfg):
  rec = synth_bank.doc_lengths("tiny", 20_000)
  assert rec.sum() >= 20_000 and rec[:-1].sum() < 20_000
  logn = synth_bank.doc_lengths("tiny", 50_000, "lognormal:40:1")
  assert logn.sum() >= 50_000 and logn.min() >= 1 and logn.max() <= 32 * 40
  assert 20 < np.median(logn) < 80
  with pytest.raises(ValueError, match="lognormal:MEDIAN:SIGMA"):
    synth_bank.doc_lengths("tiny", 10, "uniform")


def test_synthetic_bank_on_disk_is_a_valid_bank_refused_without_the_flag(tiny_cfg, tmp_path):
  """The written bank passes verification, its K̄R rows are unit vectors up to fp8 rounding,
  its size matches ``bank_bytes``; a model fingerprint check refuses it unless allowed."""
  lengths = synth_bank.doc_lengths("tiny", 3_000)
  path = str(tmp_path / "syn")
  synth_bank.write_synthetic_bank(path, tiny_cfg, lengths, kr_dtype="float8_e4m3fn",
                                  kv_dtype="int8", window_docs=100, log=lambda *_: None)
  bank = bank_lib.open_bank(path, verify=True)
  assert bank.manifest["synthetic"] and bank.num_tokens == lengths.sum()
  layer = bank.router_layers[0]
  norms = np.linalg.norm(quantize.dequantise_np(bank.kr(layer), bank.scale(layer, "kr")), axis=1)
  np.testing.assert_allclose(norms, 1.0, atol=2 ** -4)
  size = synth_bank.bank_bytes(tiny_cfg, lengths, "float8_e4m3fn", "int8")
  on_disk = sum(os.path.getsize(os.path.join(path, n)) for n in bank.manifest["arrays"]
                if n.startswith("layer_"))
  assert on_disk == size["kr"] + size["kv"]
  with pytest.raises(bank_lib.BankError, match="synthetic.*allow_synthetic=True"):
    bank_lib.open_bank(path, "0" * 32)
  assert bank_lib.open_bank(path, "0" * 32, allow_synthetic=True).num_docs == len(lengths)


def test_device_bank_in_memory_has_the_loaded_banks_layout(tiny_cfg, tmp_path):
  """Built on 4 memory devices without disk: the same chunk→document map, document table
  and array shapes/dtypes as ``DeviceBank.load`` gives the on-disk bank of the same lengths;
  padding rows are zero with scale 1; routing over it equals routing its rows on one device."""
  lengths = synth_bank.doc_lengths("tiny", 4_000, "lognormal:12:0.8")
  mesh = Mesh(np.array(jax.devices()[:4]), ("memory",))
  mem = synth_bank.synthetic_device_bank(tiny_cfg, lengths, kr_dtype="int8", kv_dtype="int8",
                                         mesh=mesh, pad_to=256, log=lambda *_: None)
  path = str(tmp_path / "syn")
  synth_bank.write_synthetic_bank(path, tiny_cfg, lengths, kr_dtype="int8", kv_dtype="int8",
                                  log=lambda *_: None)
  disk = DeviceBank.load(bank_lib.open_bank(path), mesh, pad_to=256, log=lambda *_: None)
  for name in ("chunk_doc", "doc_shard", "doc_row", "doc_chunks"):
    np.testing.assert_array_equal(np.asarray(getattr(mem, name)), np.asarray(getattr(disk, name)))
  layer = mem.bank.router_layers[0]
  for part in ("kr", "k", "v"):
    a, b = getattr(mem, part)[layer], getattr(disk, part)[layer]
    assert (a.shape, a.dtype) == (b.shape, b.dtype), part
    assert mem.scales[part][layer].shape == disk.scales[part][layer].shape
  pad = np.asarray(mem.chunk_doc) < 0
  assert not np.asarray(mem.kr[layer])[pad].any()
  assert np.all(np.asarray(mem.scales["kr"][layer])[pad] == 1)
  real = ~pad
  norms = np.linalg.norm(quantize.dequantise_np(np.asarray(mem.kr[layer])[real],
                                                np.asarray(mem.scales["kr"][layer])[real]), axis=1)
  np.testing.assert_allclose(norms, 1.0, atol=0.02)
  rng = np.random.default_rng(0)
  f = tiny_cfg.num_kv_heads * tiny_cfg.head_dim
  rq = jnp.asarray(rng.normal(size=(2, 5, f)).astype(np.float32))
  mask = jnp.ones((2, 5), bool)
  s4, d4 = sharded_top_k(mesh, rq, mask, mem.kr[layer], mem.chunk_doc, 4,
                         kr_scale_c=mem.scales["kr"][layer])
  s1, d1 = tiled_top_k(rq, mask, jnp.asarray(np.asarray(mem.kr[layer])[real]),
                       jnp.asarray(np.asarray(mem.chunk_doc)[real]), 4,
                       kr_scale_c=jnp.asarray(np.asarray(mem.scales["kr"][layer])[real]))
  np.testing.assert_array_equal(np.asarray(d4), np.asarray(d1))
  np.testing.assert_allclose(np.asarray(s4), np.asarray(s1), rtol=1e-6)


@pytest.mark.slow
def test_ttft_benchmark_runs_at_a_tiny_size(tmp_path):
  """The one-command H200 benchmark, at 20k tokens of the tiny shape on CPU (~30 s)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  subprocess.run([sys.executable, "-m", "benchmarks.ttft", "--shape=tiny", "--tokens=20000",
                  f"--out={tmp_path}"], cwd=ROOT, env=env, check=True, capture_output=True,
                 timeout=600)
  result = json.load(open(tmp_path / "ttft.json"))
  assert {r["kr_dtype"] for r in result["route"]} == {"bfloat16", "float8_e4m3fn", "int8"}
  assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in result["route"])
  assert all(r["read_ms"] > 0 and r["x_read"] == pytest.approx(r["ms"] / r["read_ms"])
             for r in result["route"])
  (t,) = result["ttft"]
  assert t["tokens"] >= 20_000 and t["ttft_ms_b1"] > 0 and t["decode_ms_per_token_b8"] > 0
  assert t["read_all_layers_ms"] > 0 and t["route_all_layers_ms_b1"] > 0
  assert t["decode_loop_ms_per_token_b1"] > 0 and t["decode_loop_ms_per_token_b8"] > 0
  assert t["host_peak_bytes"] > 0 and t["e2e_wall_ms"] > 0


def test_ttft_random_model_has_the_init_tree():
  """``benchmarks.ttft.random_model`` draws parameters leaf by leaf (the 4B init program
  compiled for minutes): same tree, shapes and dtypes as ``model.init``; norms are ones,
  matrices normal(0, 0.02)."""
  import flax.linen as nn
  from benchmarks import ttft
  model, params = ttft.random_model("tiny")
  ref = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  meta = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
  assert meta(params) == meta(ref)
  leaves = jax.tree_util.tree_leaves(params)
  assert all(np.all(np.asarray(x) == 1) for x in leaves if x.ndim == 1)
  emb = np.asarray(params["embed_tokens"]["embedding"], np.float32)
  assert abs(emb.std() - 0.02) < 1e-3 and abs(emb.mean()) < 1e-3


def test_ttft_route_impl_options_override_block_sizes():
  from benchmarks import ttft
  assert ttft.split_impl("pallas-f256:programs_per_sm=2:skip_beaten=false") == (
      "pallas-f256", {"programs_per_sm": 2, "skip_beaten": False})
  bs = ttft.route_impl_args("pallas-f256:programs_per_sm=2:stages=3", 1024, None)["block_sizes"]
  assert (bs.features, bs.programs_per_sm, bs.stages, bs.fused) == (256, 2, 3, True)
  # A field the name also sets: the explicit value wins (it raised a TypeError before).
  bs = ttft.route_impl_args("pallas:fp8_query_terms=1:features=256", 1024, None,
                            "float8_e4m3fn")["block_sizes"]
  assert (bs.fp8_query_terms, bs.features) == (1, 256)
  bs = ttft.route_impl_args("pallas-fp8q1:fp8_query_terms=2", 1024, None,
                            "float8_e4m3fn")["block_sizes"]
  assert bs.fp8_query_terms == 2
  bs = ttft.route_impl_args("pallas:tail_method=sort:tail_row=1024", 1024, None)["block_sizes"]
  assert (bs.tail_method, bs.tail_row) == ("sort", 1024)
  # "pallas" is the engine's route: unfused since 2026-12-04, tiles by key dtype; the
  # fused kernel's options name the fused kernel; -segmax is the unfused route's old tail
  for dtype, chunks in (("bfloat16", 256), ("int8", 256), ("float8_e4m3fn", 128)):
    kw = ttft.route_impl_args("pallas", 1024, None, dtype)
    assert (kw["block_sizes"].fused, kw["block_sizes"].chunks) == (False, chunks)
    assert "max_doc_chunks" not in kw                     # the bank's own bound is used
  # fp8 query terms: the unfused route's default is one (2026-12-05); -fp8q2 names two
  terms = {i: ttft.route_impl_args(i, 1024, None, "float8_e4m3fn")["block_sizes"].fp8_query_terms
           for i in ("pallas", "pallas-unfused-fp8q2", "pallas-unfused-fp8q1", "pallas-fused")}
  assert terms == {"pallas": 1, "pallas-unfused-fp8q2": 2, "pallas-unfused-fp8q1": 1,
                   "pallas-fused": 2}
  assert ttft.route_impl_args("pallas-nofold", 1024, None)["block_sizes"].fused is True
  assert ttft.route_impl_args("pallas-unfused-segmax", 1024, None)["max_doc_chunks"] is None
  for bad in ("pallas:nonsense=1", "pallas:stages", "xla:stages=2", "pallas-f512"):
    with pytest.raises(ValueError, match="route implementation"):
      ttft.split_impl(bad)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_host_placed_synthetic_bank_fetches_its_host_rows(tiny_cfg, kv_dtype):
  """``kv_placement="host"``: no K̄/V̄ on the devices; the engine's host fetch returns each
  selected document's rows of the host arrays (dequantised), padding slots masked; a
  device-placed bank has no host K̄/V̄ to read and says so."""
  from msa_jax import routing
  from msa_jax.inference import memory
  lengths = synth_bank.doc_lengths("tiny", 3_000, "lognormal:12:0.8")
  mem = synth_bank.synthetic_device_bank(tiny_cfg, lengths, kr_dtype="int8", kv_dtype=kv_dtype,
                                         kv_placement="host", pad_to=256, log=lambda *_: None)
  layer = mem.bank.router_layers[0]
  assert mem.k[layer] is None and mem.settings.host_fetch is not None
  host = mem.bank.host_kv[layer]
  assert host["k"].shape == (mem.bank.num_chunks, tiny_cfg.num_kv_heads, tiny_cfg.head_dim)
  assert np.all(np.isfinite(np.asarray(host["v"], np.float32)))
  docs = np.array([[3, 17], [0, 40]], np.int32)
  sel = routing.Selection(jnp.asarray(docs), jnp.array([[True, True], [True, False]]))
  cmax = mem.settings.max_doc_chunks
  k, v, mask = memory._host_gather(mem.settings.host_fetch, layer, sel, cmax, 2, "float32")
  start, n = mem.bank.doc_index[:, 3], mem.bank.doc_index[:, 4]
  scale = np.ones((mem.bank.num_chunks, tiny_cfg.num_kv_heads), np.float32) \
      if host["k_scale"] is None else host["k_scale"]
  for row in range(2):
    for slot in range(2):
      got_k = np.asarray(k)[row, slot * cmax:(slot + 1) * cmax]
      got_mask = np.asarray(mask)[row, slot * cmax:(slot + 1) * cmax]
      if row == 1 and slot == 1:                       # an invalid selection: nothing
        assert not got_mask.any()
        continue
      j = docs[row, slot]
      rows = slice(start[j], start[j] + n[j])
      want = np.asarray(host["k"][rows], np.float32) * scale[rows][..., None]
      np.testing.assert_allclose(got_k[:n[j]], want, rtol=1e-6)
      assert got_mask[:n[j]].all() and not got_mask[n[j]:].any()
  device = synth_bank.synthetic_device_bank(tiny_cfg, lengths, kr_dtype="int8", kv_dtype="int8",
                                            pad_to=256, log=lambda *_: None)
  with pytest.raises(ValueError, match="kv_placement='host'"):
    device.bank.k(layer)
