"""Quantised banks (issue 11): fp8/int8 K̄R with per-chunk scales, int8 K̄/V̄ with per-(chunk,
kv-head) scales, against float64 numpy and against the float bank.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from msa_jax.inference import bank as bank_lib
from msa_jax.inference import quantize
from msa_jax.inference.bank_routing import sharded_top_k, tiled_top_k
from msa_jax.inference.encode import encode_corpus
from msa_jax.inference.memory import DeviceBank
from tests import reference_numpy as R
from tests.test_inference_bank import random_bank
from tests.test_inference_engine import _engine_logits, setup  # noqa: F401  (fixture)

fast_compile = R.fast_compile_fixture()
E4M3_REL = 2.0 ** -4        # half an ulp of a 3-bit mantissa, relative
E4M3_SUBNORMAL = 2.0 ** -10  # half the e4m3 subnormal step (2^-9), in units of the scale


def _rows(rng, c=300, f=64):
  x = rng.normal(size=(c, f)) * rng.uniform(0.01, 10, (c, 1))   # rows of very different size
  x[3] = 0.0                                                      # an all-zero chunk
  x[7, 5] = 1e3                                                   # an outlier
  return x.astype(np.float32)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_quantise_round_trip_is_within_its_bound(dtype):
  """Per element, against float64: int8 errs by at most half a step (scale/2); e4m3 by half
  an ulp (2^-4 relative) or half the subnormal step. The row's largest magnitude maps to
  ±QMAX; an all-zero row gets scale 1 and zero codes; jax and numpy dequantise alike."""
  rng = np.random.default_rng(0)
  x = _rows(rng)
  codes, scale = quantize.quantise(x, dtype, 1)
  assert codes.dtype == np.dtype(jnp.dtype(dtype)) and scale.shape == (x.shape[0],)
  x64 = x.astype(np.float64)
  scale64 = np.abs(x64).max(1) / quantize.QMAX[dtype]
  np.testing.assert_allclose(scale[scale64 > 0], scale64[scale64 > 0], rtol=1e-6)
  assert scale[3] == 1.0 and not np.any(codes[3].astype(np.float32))
  deq = codes.astype(np.float64) * scale.astype(np.float64)[:, None]
  err = np.abs(deq - x64)
  if dtype == "int8":
    bound = 0.5 * scale[:, None] * (1 + 1e-5)
  else:
    bound = np.maximum(E4M3_REL * np.abs(x64), E4M3_SUBNORMAL * scale[:, None]) * (1 + 1e-5)
  assert np.all(err <= bound), float((err / bound).max())
  peak = np.abs(codes.astype(np.float32)).max(1)
  np.testing.assert_array_equal(peak[scale64 > 0], quantize.QMAX[dtype])
  np.testing.assert_allclose(np.asarray(quantize.dequantise(jnp.asarray(codes),
                                                            jnp.asarray(scale), jnp.float32)),
                             quantize.dequantise_np(codes, scale), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn", "bfloat16"])
def test_device_quantise_equals_numpy(dtype):
  """The on-device quantiser (synthetic banks) gives numpy's codes and scales bit for bit."""
  x = _rows(np.random.default_rng(2))
  want_c, want_s = quantize.quantise(x, dtype, 1)
  got_c, got_s = quantize.quantise_jax(jnp.asarray(x), dtype, 1)
  np.testing.assert_array_equal(np.asarray(got_c).view(np.uint8 if dtype != "bfloat16"
                                                        else np.uint16),
                                want_c.view(np.uint8 if dtype != "bfloat16" else np.uint16))
  if want_s is None:
    assert got_s is None
  else:
    np.testing.assert_array_equal(np.asarray(got_s), want_s)


def test_kv_scale_is_per_chunk_and_head():
  """K̄ [C, Hkv, D] gets one scale per (chunk, head): each head's slice is quantised alone."""
  rng = np.random.default_rng(1)
  k = rng.normal(size=(20, 2, 16)).astype(np.float32)
  k[:, 1] *= 100                                            # heads of very different size
  codes, scale = quantize.quantise(k, "int8", 1)
  assert scale.shape == (20, 2)
  for h in range(2):
    c_h, s_h = quantize.quantise(k[:, h], "int8", 1)
    np.testing.assert_array_equal(codes[:, h], c_h)
    np.testing.assert_array_equal(scale[:, h], s_h)
  err = np.abs(quantize.dequantise_np(codes, scale) - k)
  assert np.all(err <= 0.5 * scale[..., None] * (1 + 1e-5))


def test_unknown_precision_names_the_flag():
  with pytest.raises(ValueError, match="--kr_dtype='int4'.*float8_e4m3fn"):
    quantize.check_dtype("int4", "kr")
  with pytest.raises(ValueError, match="--kv_dtype='float8_e4m3fn'.*int8"):
    quantize.check_dtype("float8_e4m3fn", "kv")


def _routing_case(seed):
  rng = np.random.default_rng(seed)
  doc_chunks = rng.integers(1, 10, 200)
  kr, chunk_doc = random_bank(rng, doc_chunks, f=32)
  rq = rng.normal(size=(3, 4, 32)).astype(np.float32)
  mask = np.ones((3, 4), bool)
  mask[1, 2:] = False
  return rq, mask, kr, chunk_doc


@pytest.mark.parametrize("dtype,tile", [("int8", 64), ("float8_e4m3fn", 37), ("int8", None)])
def test_quantised_routing_equals_routing_on_dequantised_keys(dtype, tile):
  """The scan on codes × per-chunk scale selects exactly what routing the dequantised
  float32 keys selects (scores ≤ 1e-6 relative); against the unquantised keys every selected
  document's score is within the bound max‖rq‖·max‖K̄R − deq‖ of its exact score, and the
  overlap of the top-k sets is high."""
  rq, mask, kr, chunk_doc = _routing_case(4)
  k = 8
  codes, scale = quantize.quantise(kr, dtype, 1)
  deq = quantize.dequantise_np(codes, scale)
  args = (jnp.asarray(rq), jnp.asarray(mask))
  s_q, d_q = tiled_top_k(*args, jnp.asarray(codes), jnp.asarray(chunk_doc), k, tile,
                         kr_scale_c=jnp.asarray(scale))
  s_d, d_d = tiled_top_k(*args, jnp.asarray(deq), jnp.asarray(chunk_doc), k, tile)
  np.testing.assert_array_equal(np.asarray(d_q), np.asarray(d_d))
  np.testing.assert_allclose(np.asarray(s_q), np.asarray(s_d), rtol=1e-6, atol=1e-7)
  s_f, d_f = tiled_top_k(*args, jnp.asarray(kr), jnp.asarray(chunk_doc), k, tile)
  # exact (float64) document scores of the quantised winners
  s64 = np.einsum("bmf,cf->bmc", rq.astype(np.float64), kr.astype(np.float64))
  s64 = np.where(mask[:, :, None], s64, -np.inf).max(1)
  doc64 = np.full((3, chunk_doc.max() + 1), -np.inf)
  for b in range(3):
    np.maximum.at(doc64[b], chunk_doc, s64[b])
  bound = (np.linalg.norm(rq, axis=-1).max() * np.linalg.norm(kr - deq, axis=-1).max())
  got = np.asarray(s_q)
  exact = np.take_along_axis(doc64, np.asarray(d_q), 1)
  assert np.all(np.abs(got - exact) <= bound * (1 + 1e-4) + 1e-6)
  overlap = np.mean([len(set(np.asarray(d_q)[b]) & set(np.asarray(d_f)[b])) / k
                     for b in range(3)])
  assert overlap >= (0.85 if dtype == "int8" else 0.6), overlap


def test_quantised_memory_parallel_routing_equals_one_device():
  """fp8 keys sharded over 8 memory devices (scales sharded with them) route as on one."""
  rq, mask, kr, chunk_doc = _routing_case(5)
  codes, scale = quantize.quantise(kr, "float8_e4m3fn", 1)
  s1, d1 = tiled_top_k(jnp.asarray(rq), jnp.asarray(mask), jnp.asarray(codes),
                       jnp.asarray(chunk_doc), 6, 16, kr_scale_c=jnp.asarray(scale))
  from msa_jax.inference.memory import shard_plan
  chunks = np.bincount(chunk_doc)
  bounds = shard_plan(chunks, 8)
  cb = np.concatenate([[0], np.cumsum(chunks)])[bounds]
  rows = int(np.diff(cb).max()) + 4
  kr_s = np.zeros((8 * rows, codes.shape[1]), codes.dtype)
  sc_s = np.ones((8 * rows,), np.float32)
  doc_s = np.full((8 * rows,), -1, np.int32)
  for s in range(8):
    n = cb[s + 1] - cb[s]
    kr_s[s * rows:s * rows + n] = codes[cb[s]:cb[s + 1]]
    sc_s[s * rows:s * rows + n] = scale[cb[s]:cb[s + 1]]
    doc_s[s * rows:s * rows + n] = chunk_doc[cb[s]:cb[s + 1]]
  mesh = Mesh(np.array(jax.devices()[:8]), ("memory",))
  s8, d8 = sharded_top_k(mesh, jnp.asarray(rq), jnp.asarray(mask), jnp.asarray(kr_s),
                         jnp.asarray(doc_s), 6, tile=16, kr_scale_c=jnp.asarray(sc_s))
  np.testing.assert_array_equal(np.asarray(d8), np.asarray(d1))
  np.testing.assert_allclose(np.asarray(s8), np.asarray(s1), rtol=1e-6)


# --------------------------------------------------------------------------- banks and engine
def _requantised_bank(setup, tmp, kr_dtype, kv_dtype):
  ex, _, model, params, _, _ = setup
  path = str(tmp / f"bank_{kr_dtype}_{kv_dtype}")
  corpus = str(tmp / "corpus.jsonl")
  if not os.path.exists(corpus):
    with open(corpus, "w") as f:
      for d in ex.docs:
        f.write(json.dumps({"id": d.doc_id, "tokens": d.tokens}) + "\n")
  encode_corpus(model, params, corpus, path, tokenizer=None, prefix_tokens=ex.prefix,
                window_tokens=10, kr_dtype=kr_dtype, kv_dtype=kv_dtype, log=lambda *_: None)
  return path


@pytest.fixture(scope="module")
def quant_banks(setup, tmp_path_factory):  # noqa: F811
  tmp = tmp_path_factory.mktemp("quant")
  return {dt: _requantised_bank(setup, tmp, *dt)
          for dt in [("float32", "int8"), ("float8_e4m3fn", "int8"), ("int8", "float32")]}


def test_manifest_records_precisions_and_scales_are_arrays(quant_banks):
  bank = bank_lib.open_bank(quant_banks[("float8_e4m3fn", "int8")], verify=True)
  m = bank.manifest
  assert (m["kr_dtype"], m["kv_dtype"]) == ("float8_e4m3fn", "int8")
  assert m["kr_scale"] == "per chunk" and m["kv_scale"] == "per chunk and kv head"
  layer = bank.router_layers[0]
  assert bank.kr(layer).dtype == np.dtype(jnp.float8_e4m3fn) and bank.k(layer).dtype == np.int8
  assert bank.scale(layer, "kr").shape == (bank.num_chunks,)
  assert bank.scale(layer, "v").shape == (bank.num_chunks, m["model_config"]["num_kv_heads"])
  assert m["arrays"][f"layer_{layer:02d}.k_scale"]["segments"]      # checksummed like the rest
  assert bank.prefix_kv[0][0].dtype == np.float32                   # prefix in the model dtype
  plain = bank_lib.open_bank(quant_banks[("int8", "float32")])
  assert plain.scale(layer, "k") is None and plain.scale(layer, "kr") is not None


def _run_engine(setup, path, shards=1, placement="device"):  # noqa: F811
  ex, batch, model, params, out, _ = setup
  return _engine_logits((ex, batch, model, params, out, path), shards, placement)


def test_int8_kv_bank_gives_the_float_banks_logits(setup, quant_banks):  # noqa: F811
  """Int8 K̄/V̄ (K̄R float32, so the same documents are selected): the engine's logits are
  within 2% normwise of the float32 bank's. Why 2%: each dequantised element errs by at most
  half a step, amax/254 of its (chunk, head) row, i.e. ≤ 0.4% of the row's largest entry;
  through softmax attention and two more layers of this random tiny model the measured
  error is 1.6e-3 (the bound leaves 12x room); a bug (a scale on the wrong axis, a missing dequantise) gives O(1) errors.
  The host-placed int8 bank (codes + scales cross, dequantised on the device) equals the
  device-placed one, and so does the bank sharded over 8 memory devices."""
  ex, batch, model, params, out, float_path = setup
  want, sel_f = _run_engine(setup, float_path)
  got, sel_q = _run_engine(setup, quant_banks[("float32", "int8")])
  for a, b in zip(sel_f, sel_q):
    np.testing.assert_array_equal(a, b)
  err = R.rel_err(got, want)
  assert 0 < err < 2e-2, err
  host, _ = _run_engine(setup, quant_banks[("float32", "int8")], 8, "host")
  assert R.rel_err(host, got) < 1e-6
  sharded, _ = _run_engine(setup, quant_banks[("float32", "int8")], 8, "device")
  assert R.rel_err(sharded, got) < 1e-6


def test_quantised_kr_bank_routes_like_its_dequantised_keys(setup, quant_banks):  # noqa: F811
  """fp8 K̄R + int8 K̄/V̄ through the whole engine: each router layer picks the documents that
  routing the dequantised keys picks (numpy float64 document scores)."""
  ex, batch, model, params, out, _ = setup
  path = quant_banks[("float8_e4m3fn", "int8")]
  logits, selected = _run_engine(setup, path)
  assert np.all(np.isfinite(logits))
  bank = bank_lib.open_bank(path)
  float_bank = bank_lib.open_bank(setup[5])
  for layer, sel in zip(bank.router_layers, selected):
    deq = quantize.dequantise_np(bank.kr(layer), bank.scale(layer, "kr"), np.float64)
    np.testing.assert_allclose(deq, np.asarray(float_bank.kr(layer), np.float64),
                               atol=E4M3_REL + 1e-6)
    assert len(sel) == model.config.top_k


def test_resume_with_another_precision_is_refused(setup, quant_banks):  # noqa: F811
  ex, _, model, params, _, _ = setup
  path = quant_banks[("int8", "float32")]
  corpus = os.path.join(os.path.dirname(path), "corpus.jsonl")
  with pytest.raises(bank_lib.BankError, match="started with --kr_dtype=int8.*float8_e4m3fn"):
    encode_corpus(model, params, corpus, path, tokenizer=None, prefix_tokens=ex.prefix,
                  kr_dtype="float8_e4m3fn", log=lambda *_: None)
  with pytest.raises(ValueError, match="--kv_dtype='float8_e4m3fn'"):
    encode_corpus(model, params, corpus, path + "_new", tokenizer=None, prefix_tokens=ex.prefix,
                  kv_dtype="float8_e4m3fn", log=lambda *_: None)


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return str(dst)


def test_corrupt_or_missing_scales_are_named(quant_banks, tmp_path):
  """A flipped byte in a scale file fails verification naming the file; a zero / NaN scale
  is refused when the bank is placed even without verify; a manifest whose kr_dtype says
  int8 with no scale array, or whose dtype disagrees with the array's, is refused."""
  path = _copy(quant_banks[("float8_e4m3fn", "int8")], tmp_path / "b")
  bank = bank_lib.open_bank(path)
  name = f"layer_{bank.router_layers[0]:02d}.k_scale"
  with open(os.path.join(path, name), "r+b") as f:
    f.seek(4)
    f.write(np.float32(0.0).tobytes())
  with pytest.raises(bank_lib.BankError, match=f"{name} is corrupt: segment 0"):
    bank_lib.open_bank(path, verify=True)
  with pytest.raises(bank_lib.BankError, match=f"{name} is corrupt: row 0 .*positive and finite"):
    DeviceBank.load(bank_lib.open_bank(path), log=lambda *_: None)
  mpath = os.path.join(path, bank_lib.MANIFEST)
  m = json.load(open(mpath))
  del m["arrays"][f"layer_{bank.router_layers[0]:02d}.kr_scale"]
  json.dump(m, open(mpath, "w"))
  with pytest.raises(bank_lib.BankError, match="float8_e4m3fn codes but the manifest has no"):
    bank_lib.open_bank(path)
  path2 = _copy(quant_banks[("int8", "float32")], tmp_path / "c")
  m = json.load(open(os.path.join(path2, bank_lib.MANIFEST)))
  m["kv_dtype"] = "bfloat16"
  json.dump(m, open(os.path.join(path2, bank_lib.MANIFEST), "w"))
  with pytest.raises(bank_lib.BankError, match="stored as float32 but the manifest's kv_dtype"):
    bank_lib.open_bank(path2)


def test_bank_without_precision_fields_still_opens(setup, tmp_path):  # noqa: F811
  """A bank written before issue 11 (no kr_scale / kv_scale keys) opens and places."""
  path = _copy(setup[5], tmp_path / "old")
  mpath = os.path.join(path, bank_lib.MANIFEST)
  m = json.load(open(mpath))
  m.pop("kr_scale", None)
  m.pop("kv_scale", None)
  json.dump(m, open(mpath, "w"))
  bank = bank_lib.open_bank(path, verify=True)
  assert bank.scale(bank.router_layers[0], "kr") is None
  placed = DeviceBank.load(bank, log=lambda *_: None)
  assert all(s is None for s in placed.scales["kr"].values())
  with pytest.raises(ValueError, match="score_dtype must be one of .*'kernel'"):
    DeviceBank.load(bank, score_dtype="float16", log=lambda *_: None)


def test_pallas_placement_of_a_quantised_bank_builds_its_layouts_once(quant_banks):
  """routing_impl="pallas" places fp8 K̄R as codes (the fused kernel reads them) and builds the
  kernel's bank layouts once, per memory shard, from each shard's own chunk map."""
  from msa_jax.inference.bank_routing import (CODES_KEY, CODES_ROW, LAYOUT_TILES, RUNS_KEY,
                                              chunk_runs, routing_layouts)
  from pallas_kernels.route_tail import run_codes
  bank = bank_lib.open_bank(quant_banks[("float8_e4m3fn", "int8")])
  mesh = Mesh(np.array(jax.devices()[:2]), ("memory",))
  placed = DeviceBank.load(bank, mesh, routing_impl="pallas", log=lambda *_: None)
  assert placed.settings.routing == "pallas"
  layer = bank.router_layers[0]
  assert placed.kr[layer].dtype == jnp.float8_e4m3fn and placed.scales["kr"][layer] is not None
  assert sorted(placed.route_layouts) == sorted((RUNS_KEY, CODES_KEY) + LAYOUT_TILES)
  assert placed.arrays()["route_layouts"] is placed.route_layouts
  doc = np.asarray(placed.chunk_doc).reshape(2, -1)
  for tile in LAYOUT_TILES:
    got = placed.route_layouts[tile]
    for s in range(2):
      want = routing_layouts(jnp.asarray(doc[s]), (tile,))[tile]
      t = want.loc_tc.shape[0]
      np.testing.assert_array_equal(np.asarray(got.loc_tc)[s * t:(s + 1) * t], want.loc_tc)
      np.testing.assert_array_equal(np.asarray(got.slot_doc_tc)[s * t:(s + 1) * t],
                                    want.slot_doc_tc)
  runs = placed.route_layouts[RUNS_KEY]   # the unfused kernel's: each shard's own runs
  for s in range(2):
    for got, want in zip(runs, chunk_runs(jnp.asarray(doc[s]))):
      n = want.shape[0]
      np.testing.assert_array_equal(np.asarray(got)[s * n:(s + 1) * n], want)
    d = jnp.asarray(doc[s])
    want = run_codes(chunk_runs(d)[0], CODES_ROW, d >= 0)
    n = want.shape[0]
    np.testing.assert_array_equal(np.asarray(placed.route_layouts[CODES_KEY])[s * n:(s + 1) * n],
                                  want)
  assert DeviceBank.load(bank, mesh, log=lambda *_: None).route_layouts is None   # xla


def test_converting_a_float_bank_equals_encoding_quantised(setup, quant_banks, tmp_path):  # noqa: F811
  """``convert_bank`` (no model) writes the same arrays, byte for byte, as encoding the corpus
  with --kr_dtype/--kv_dtype; a quantised source is refused (it would quantise twice)."""
  direct = quant_banks[("float8_e4m3fn", "int8")]
  conv = str(tmp_path / "conv")
  bank_lib.convert_bank(setup[5], conv, kr_dtype="float8_e4m3fn", kv_dtype="int8",
                        docs_per_window=4, log=lambda *_: None)
  a, b = bank_lib.open_bank(direct, verify=True), bank_lib.open_bank(conv, verify=True)
  assert set(a.manifest["arrays"]) == set(b.manifest["arrays"])
  for name in list(a.manifest["arrays"]) + [bank_lib.DOCS_FILE]:
    assert open(os.path.join(direct, name), "rb").read() == \
        open(os.path.join(conv, name), "rb").read(), name
  for (ka, va), (kb, vb) in zip(a.prefix_kv, b.prefix_kv):
    np.testing.assert_array_equal(ka, kb)
    np.testing.assert_array_equal(va, vb)
  assert b.manifest["fingerprint"] == a.manifest["fingerprint"] and b.manifest["complete"]
  with pytest.raises(bank_lib.BankError, match="convert from the unquantised bank"):
    bank_lib.convert_bank(direct, str(tmp_path / "twice"), kr_dtype="int8", kv_dtype="int8")


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_bfloat16_scoring_of_codes_is_within_the_query_rounding(dtype):
  """``score_dtype="bfloat16"`` (tensor-core scores: codes exact in bfloat16, the queries
  rounded to bfloat16) gives each selected document a score within
  scale·Σ|rq − bf16(rq)|·|code| of the float32 path's, and nearly the same selection."""
  rq, mask, kr, chunk_doc = _routing_case(6)
  codes, scale = quantize.quantise(kr, dtype, 1)
  np.testing.assert_array_equal(codes.astype(jnp.bfloat16).astype(np.float32),
                                codes.astype(np.float32))          # codes are exact in bf16
  args = (jnp.asarray(rq), jnp.asarray(mask), jnp.asarray(codes), jnp.asarray(chunk_doc), 8, 32)
  s32, d32 = tiled_top_k(*args, kr_scale_c=jnp.asarray(scale))
  s16, d16 = tiled_top_k(*args, kr_scale_c=jnp.asarray(scale), score_dtype="bfloat16")
  rq_err = np.abs(rq - rq.astype(jnp.bfloat16).astype(np.float32)).max()
  bound = rq_err * (np.abs(codes.astype(np.float32)).sum(1) * scale).max()
  # documents picked by both: their scores agree within the bound
  for b in range(3):
    both = np.intersect1d(np.asarray(d32)[b], np.asarray(d16)[b])
    for d in both:
      a = np.asarray(s32)[b][np.asarray(d32)[b] == d][0]
      c = np.asarray(s16)[b][np.asarray(d16)[b] == d][0]
      assert abs(a - c) <= bound * (1 + 1e-3) + 1e-6
    assert len(both) >= 7
  with pytest.raises(ValueError, match="score_dtype must be one of"):
    tiled_top_k(*args, score_dtype="float16")


@pytest.mark.slow
def test_encode_cli_flags_write_a_quantised_bank_the_engine_answers_from(tmp_path):
  """``python -m msa_jax.encode --kr_dtype=float8_e4m3fn --kv_dtype=int8`` on a trained run:
  the manifest records both, ``MemoryEngine.load`` routes it with the XLA scan, and its
  selections equal the float bank's on most questions (barely trained model: near-ties)."""
  import subprocess
  import sys
  from msa_jax.data import write_task
  from msa_jax.inference import MemoryEngine
  from msa_jax.trainer import train_and_evaluate
  from train_common import REPO, small_cfg
  cfg = small_cfg()
  workdir = str(tmp_path / "run")
  train_and_evaluate(cfg, workdir)
  corpus, questions = str(tmp_path / "corpus.jsonl"), str(tmp_path / "q.jsonl")
  write_task.write_jsonl(write_task.corpus_rows(cfg, 200, cfg.seed), corpus, 200, "corpus")
  write_task.write_jsonl(write_task.question_rows(cfg, 200, cfg.seed, 8), questions, 8,
                         "questions")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  banks = {}
  for name, flags in (("float", []), ("quant", ["--kr_dtype=float8_e4m3fn", "--kv_dtype=int8"])):
    banks[name] = str(tmp_path / name)
    out = subprocess.run([sys.executable, "-m", "msa_jax.encode", f"--checkpoint={workdir}",
                          f"--corpus={corpus}", f"--bank={banks[name]}", *flags],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
  m = bank_lib.open_bank(banks["quant"], verify=True).manifest
  assert (m["kr_dtype"], m["kv_dtype"]) == ("float8_e4m3fn", "int8")
  assert "K̄R float8_e4m3fn, K̄/V̄ int8" in out.stdout
  rows = [json.loads(line) for line in open(questions)]
  picks = {}
  for name, path in banks.items():
    engine = MemoryEngine.load(workdir, path, batch_size=4, log=lambda *_: None)
    assert engine.device_bank.settings.routing == "xla"          # CPU; and quantised K̄R
    picks[name] = [a["selected_doc_ids"] for a in engine.generate(rows, max_new_tokens=4)]
  same = np.mean([a == b for a, b in zip(picks["float"], picks["quant"])])
  assert same >= 0.75, same


def test_auto_routing_picks_the_kernel_on_a_gpu_for_every_precision(monkeypatch):
  """On a GPU 'auto' picks the Pallas route for bf16, fp8 and int8 K̄R and any k (its 8-bit
  path passed its compiled tests on the H200, BENCHMARKS.md); elsewhere, or for a key width
  the kernels do not tile, the XLA scan."""
  from msa_jax.inference.memory_engine import default_routing
  from pallas_kernels import _platform
  monkeypatch.setattr(_platform, "on_gpu", lambda: True)
  assert default_routing(16, 1024, "bfloat16") == "pallas"
  assert default_routing(16, 1024, "float8_e4m3fn") == "pallas"
  assert default_routing(16, 1024, "int8") == "pallas"
  assert default_routing(100, 1024, "int8") == "pallas"    # past the fused kernel's list
  assert default_routing(16, 96, "bfloat16") == "xla"     # F not a multiple of 64
  monkeypatch.setattr(_platform, "on_gpu", lambda: False)
  assert default_routing(16, 1024, "bfloat16") == "xla"


@pytest.mark.parametrize("kr_dtype", ["int8", "float32"])
def test_encoder_refuses_non_finite_chunks(setup, tmp_path, kr_dtype):  # noqa: F811
  """A checkpoint that encodes to NaN is named, for quantised and float banks alike, and
  nothing of it is committed."""
  ex, _, model, params, _, _ = setup
  bad = jax.tree.map(lambda x: x * jnp.nan, params)
  corpus = str(tmp_path / "corpus.jsonl")
  with open(corpus, "w") as f:
    for d in ex.docs:
      f.write(json.dumps({"id": d.doc_id, "tokens": d.tokens}) + "\n")
  path = str(tmp_path / "bank")
  with pytest.raises(ValueError, match="non-finite keys/values"):
    encode_corpus(model, bad, corpus, path, tokenizer=None, prefix_tokens=ex.prefix,
                  window_tokens=10, kr_dtype=kr_dtype, kv_dtype="int8", log=lambda *_: None)
  m = json.load(open(os.path.join(path, bank_lib.MANIFEST)))
  assert m["num_docs"] == 0 and not m["complete"]
