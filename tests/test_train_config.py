"""The two-phase schedule of SPEC §4 and the errors a bad training config gives.

Schedule (paper §3.3, SPEC §4), checked on the 4b recipe's own config values:
router warm-up ``L = 0.1·L_LM + L_aux`` at lr 1e-4 (after a short linear ramp),
then main ``L = L_LM + 0.1·L_aux`` with the lr annealed (cosine) to 6e-6 at
``num_steps``. ``learning_rate_schedule(cfg)(i)`` and ``loss_weights(cfg, i)``
take the 0-based index ``i`` of the step being taken (``TrainState.step``
before the update); the metrics row of that step is logged as ``step = i + 1``.

No test here compiles a model: each bad config fails before any work is done.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from msa_jax import sharding
from msa_jax.config import ModelConfig
from msa_jax.optimizer import learning_rate_schedule, loss_weights
from msa_jax.trainer import train_and_evaluate, validate_config

from train_common import CONFIG_FILE, REPO, get_config


def lr_at(cfg, i: int) -> float:
  return float(learning_rate_schedule(cfg)(i))


def weights_at(cfg, i: int) -> tuple[float, float]:
  lm, aux = loss_weights(cfg, i)
  return float(lm), float(aux)


# ----------------------------------------------------------------------------- schedule


def test_4b_recipe_has_the_paper_phase_values():
  c = get_config("4b")
  assert (c.num_steps, c.optim.warmup_phase_steps) == (20_000, 1_000)
  assert c.optim.warmup_phase_lr == 1e-4 and c.optim.final_lr == 6e-6
  assert (c.optim.warmup_lm_weight, c.optim.warmup_aux_weight) == (0.1, 1.0)
  assert (c.optim.main_lm_weight, c.optim.main_aux_weight) == (1.0, 0.1)
  assert c.loss.infonce_temperature == 0.1
  m = ModelConfig.from_dict(c.model)       # Qwen3-4B with MSA: P 64, k 16, routers 18-35
  assert (m.vocab_size, m.num_layers, m.hidden_size) == (151936, 36, 2560)
  assert (m.pooling_chunk_size, m.top_k, m.router_layer_ids) == (64, 16, tuple(range(18, 36)))


def test_4b_loss_weights_switch_exactly_at_the_phase_boundary():
  c = get_config("4b")
  warm = c.optim.warmup_phase_steps
  for i in (0, 1, warm // 2, warm - 1):
    assert weights_at(c, i) == pytest.approx((0.1, 1.0), rel=1e-6), i     # 0.1·LM + aux
  for i in (warm, warm + 1, c.num_steps // 2, c.num_steps - 1):
    assert weights_at(c, i) == pytest.approx((1.0, 0.1), rel=1e-6), i     # LM + 0.1·aux


def test_4b_learning_rate_at_the_phase_boundaries():
  c = get_config("4b")
  warm, n, ramp = c.optim.warmup_phase_steps, c.num_steps, c.optim.lr_ramp_steps
  # Linear ramp 0 → 1e-4 over lr_ramp_steps, then flat 1e-4 for the rest of the warm-up.
  assert lr_at(c, 0) == 0.0
  assert lr_at(c, ramp // 2) == pytest.approx(0.5e-4, rel=1e-5)
  for i in (ramp, ramp + 1, warm // 2, warm - 1):
    assert lr_at(c, i) == pytest.approx(1e-4, rel=1e-5), i
  # Main phase starts at main_phase_lr (1e-4: continuous) and anneals to 6e-6 at num_steps.
  assert lr_at(c, warm) == pytest.approx(1e-4, rel=1e-5)
  mid = warm + (n - warm) // 2
  assert lr_at(c, mid) == pytest.approx((1e-4 + 6e-6) / 2, rel=1e-4)       # cosine midpoint
  assert lr_at(c, n - 1) == pytest.approx(6e-6, rel=1e-3)
  assert lr_at(c, n) == pytest.approx(6e-6, rel=1e-6)
  assert lr_at(c, n + 1000) == pytest.approx(6e-6, rel=1e-6)              # stays at the floor
  main = [lr_at(c, i) for i in range(warm, n + 1, 500)]
  assert all(a >= b for a, b in zip(main, main[1:])), "main phase lr must only decrease"


def test_schedule_without_warmup_phase_ramps_then_anneals():
  c = get_config("smoke")
  c.num_steps, c.optim.warmup_phase_steps, c.optim.lr_ramp_steps = 100, 0, 10
  assert lr_at(c, 0) == 0.0
  assert lr_at(c, 10) == pytest.approx(c.optim.main_phase_lr, rel=1e-5)
  assert lr_at(c, 100) == pytest.approx(c.optim.final_lr, rel=1e-5)
  assert weights_at(c, 0) == pytest.approx((1.0, 0.1), rel=1e-6)         # main phase at once


def _cosine(lr0, lr1, frac):
  """float64 reference: cosine from lr0 at frac 0 to lr1 at frac 1."""
  return lr1 + (lr0 - lr1) * 0.5 * (1 + np.cos(np.pi * frac))


@pytest.mark.parametrize("warm", [150, 0])
def test_decay_steps_hold_the_lr_then_anneal(warm):
  """optim.decay_steps > 0 (warmup-stable-decay): main_phase_lr held until the last
  decay_steps steps, then the cosine to final_lr over exactly those; 0 keeps the cosine
  over the whole main phase."""
  c = get_config("tiny")
  c.num_steps, c.optim.warmup_phase_steps, c.optim.lr_ramp_steps = 6000, warm, 20
  c.optim.main_phase_lr, c.optim.final_lr, c.optim.decay_steps = 2e-3, 1e-5, 1000
  start = warm if warm else 20                 # main phase begins after warm-up or ramp
  for i in (start, start + 1, 3000, 4999):
    assert lr_at(c, i) == pytest.approx(2e-3, rel=1e-6), i
  for i in (5000, 5250, 5500, 5999, 6000):
    assert lr_at(c, i) == pytest.approx(_cosine(2e-3, 1e-5, (i - 5000) / 1000), rel=1e-4), i
  c.optim.decay_steps = 0
  mid = start + (6000 - start) // 2
  assert lr_at(c, mid) == pytest.approx(_cosine(2e-3, 1e-5, 0.5), rel=1e-4)
  validate_config(c)


@pytest.mark.parametrize("decay", [-1, 5851])
def test_decay_steps_outside_the_main_phase_are_refused(decay):
  c = get_config("tiny")
  c.num_steps, c.optim.warmup_phase_steps, c.optim.decay_steps = 6000, 150, decay
  with pytest.raises(ValueError, match=r"optim.decay_steps=-?\d+ must be between 0 .* "
                                       r"main phase's 5850 steps"):
    validate_config(c)


def test_global_position_span_needs_global_rope():
  c = get_config("tiny")
  c.data.global_position_span = 16_384
  with pytest.raises(ValueError, match="model.rope_mode is 'document'.*rope_mode=global"):
    validate_config(c)
  c.model.rope_mode = "global"
  validate_config(c)
  c.data.global_position_span = -5
  with pytest.raises(ValueError, match="global_position_span must be >= 0"):
    validate_config(c)


def test_smoke_recipe_phases():
  c = get_config("smoke")
  warm = c.optim.warmup_phase_steps
  assert 0 < warm < c.num_steps
  # The smoke recipe warms the router up on L_aux alone (README: "Smoke run").
  assert weights_at(c, warm - 1) == pytest.approx((0.0, 1.0), rel=1e-6)
  assert weights_at(c, warm) == pytest.approx((1.0, 0.1), rel=1e-6)
  assert lr_at(c, c.num_steps) == pytest.approx(c.optim.final_lr, rel=1e-5)


def test_loss_weights_trace_under_jit():
  c = get_config("4b")
  f = jax.jit(lambda i: loss_weights(c, i))
  np.testing.assert_allclose(np.asarray(f(999)), [0.1, 1.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(f(1000)), [1.0, 0.1], rtol=1e-6)


# ----------------------------------------------------------------------------- bad configs


def _smoke(**model_overrides):
  c = get_config("smoke")
  for k, v in model_overrides.items():
    setattr(c.model, k, v)
  return c


@pytest.mark.parametrize("overrides, message", [
    (dict(router_layers=(3,)), "router layer 3 is out of range for 3 layers (valid: 0..2)"),
    (dict(router_layers=(-1,)), "router layer -1 is out of range"),
    (dict(top_k=0), "top_k (k) must be >= 1, got 0"),
    (dict(pooling_chunk_size=0), "pooling_chunk_size (P) must be >= 1, got 0"),
])
def test_bad_model_config_is_rejected_before_any_work(tmp_path, overrides, message):
  cfg = _smoke(**overrides)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    train_and_evaluate(cfg, str(workdir))
  assert message in str(e.value)
  assert str(e.value).startswith("bad model config:")
  assert not workdir.exists(), "a rejected config must not leave a workdir behind"
  with pytest.raises(ValueError, match=r"^bad model config"):
    ModelConfig(**{**ModelConfig().to_dict(), "num_layers": 3, "router_layers": None,
                   **overrides})


def test_unknown_model_key_lists_the_valid_keys():
  cfg = _smoke()
  with cfg.model.unlocked():
    cfg.model.topk = 4
  with pytest.raises(ValueError, match=r"unknown keys \['topk'\]; valid keys: .*'top_k'"):
    validate_config(cfg)


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError) as e:
    get_config("nope")
  assert "unknown variant 'nope'" in str(e.value)
  for v in ("4b", "0.6b", "tiny", "smoke"):
    assert repr(v) in str(e.value)


def test_4b_without_init_from_says_it_needs_a_checkpoint(tmp_path):
  cfg = get_config("4b")
  assert cfg.init_from == ""
  with pytest.raises(ValueError) as e:
    train_and_evaluate(cfg, str(tmp_path / "run"))
  msg = str(e.value)
  assert "pretrained Qwen3 checkpoint" in msg
  assert "--config.init_from=" in msg and ":smoke" in msg
  assert not (tmp_path / "run").exists()


def test_warmup_longer_than_run_is_rejected():
  cfg = get_config("smoke")
  cfg.num_steps, cfg.optim.warmup_phase_steps = 10, 11
  with pytest.raises(ValueError, match=r"optim.warmup_phase_steps \(11\) exceeds num_steps \(10\)"):
    validate_config(cfg)
  cfg.optim.warmup_phase_steps = 10      # the whole run in warm-up is allowed
  validate_config(cfg)


@pytest.mark.parametrize("field, value, message", [
    ("num_steps", 0, "num_steps must be >= 1, got 0"),
    ("batch_size", 0, "batch_size must be >= 1, got 0"),
])
def test_nonpositive_run_lengths_are_rejected(field, value, message):
  cfg = get_config("smoke")
  setattr(cfg, field, value)
  if field == "num_steps":
    cfg.optim.warmup_phase_steps = 0
  with pytest.raises(ValueError, match=message):
    validate_config(cfg)


def test_mesh_shape_must_match_the_device_count(tmp_path):
  assert jax.device_count() == 8
  with pytest.raises(ValueError, match=r"needs 12 devices but 8 are available; set "
                                       r"config.mesh_shape"):
    sharding.make_mesh((3, 2, 2))
  with pytest.raises(ValueError, match=r"mesh shape \[3, -1, 1\] does not divide 8 devices"):
    sharding.make_mesh((3, -1, 1))
  with pytest.raises(ValueError, match="at most one entry may be -1"):
    sharding.make_mesh((-1, -1, 1))
  with pytest.raises(ValueError, match=r"must have 3 entries"):
    sharding.make_mesh((8, 1))
  assert dict(sharding.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  cfg = get_config("smoke")
  cfg.mesh_shape = (2, 2, 1)
  with pytest.raises(ValueError, match="needs 4 devices but 8 are available"):
    train_and_evaluate(cfg, str(tmp_path / "run"))


def test_batch_must_split_over_the_batch_mesh_axes(tmp_path):
  cfg = get_config("smoke")
  cfg.batch_size, cfg.mesh_shape = 4, (8, 1, 1)
  with pytest.raises(ValueError, match=r"batch_size 4 must be a multiple of 8 \(the data × "
                                       r"fsdp mesh axes"):
    train_and_evaluate(cfg, str(tmp_path / "run"))


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "msa_jax.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_bad_variant_exits_nonzero_with_the_message(tmp_path):
  r = _cli(f"--config={CONFIG_FILE}:nope", f"--workdir={tmp_path / 'run'}")
  assert r.returncode == 1
  assert "unknown variant 'nope' of configs/16k_to_100m.py" in r.stderr
  assert not (tmp_path / "run").exists()


def test_cli_4b_without_init_from_exits_nonzero_with_the_message(tmp_path):
  r = _cli(f"--config={CONFIG_FILE}:4b", f"--workdir={tmp_path / 'run'}")
  assert r.returncode == 1
  assert "needs accelerators: set --config.init_from=" in r.stderr


def test_cli_bad_override_exits_nonzero_with_the_message(tmp_path):
  r = _cli(f"--config={CONFIG_FILE}:smoke", "--config.model.top_k=0",
           f"--workdir={tmp_path / 'run'}")
  assert r.returncode == 1
  assert "top_k (k) must be >= 1, got 0" in r.stderr


def test_a_weighted_routing_loss_without_an_upper_half_router_layer_is_refused():
  """The tiny recipe with 4 layers and router layer 1 (session 11's invalid "l4" run: 8 GPU
  minutes with aux 0): refused before any work, naming both fixes; allowed with the
  routing loss off or with oracle routing, and with a router layer in the upper half."""
  cfg = get_config("tiny")
  cfg.model.num_layers, cfg.model.router_layers = 4, (1,)
  with pytest.raises(ValueError, match=r"router_layers \[1\] of 4 layers are all below layer 2.*"
                     r"router_layers=\(3,\).*main_aux_weight=0"):
    validate_config(cfg)
  cfg.model.router_layers = (2,)
  validate_config(cfg)
  cfg.model.router_layers = (1,)
  cfg.loss.oracle_routing = True
  validate_config(cfg)
  cfg.loss.oracle_routing = False
  cfg.optim.warmup_aux_weight = cfg.optim.main_aux_weight = 0.0
  validate_config(cfg)


def test_aux_loss_covers_the_router_layers_of_the_upper_half():
  """SPEC §4: L_aux is averaged over the router layers in the upper half of the model."""
  from msa_jax.config import ModelConfig
  from msa_jax.train_step import aux_loss_layers
  every = ModelConfig(num_layers=6, hidden_size=8, intermediate_size=8, num_heads=2,
                      num_kv_heads=1, head_dim=4, vocab_size=16, router_layers="all")
  assert every.router_layer_ids == (0, 1, 2, 3, 4, 5)
  assert aux_loss_layers(every) == [3, 4, 5]
  assert aux_loss_layers(every.replace(router_layers=None)) == [0, 1, 2]   # default: layers 3-5
  assert aux_loss_layers(every.replace(router_layers=(0, 1))) == []   # none above: no aux term


def test_xla_flags_are_added_before_jax_starts_and_the_environment_wins():
  """``config.xla_flags`` joins XLA_FLAGS before the first computation (a fresh process);
  a flag the environment already names keeps the environment's value; once the backends
  started, nothing changes (XLA read its flags) and the caller is told."""
  import os
  import subprocess
  import sys
  code = (
      "import jax, jax.numpy as jnp\n"
      "from msa_jax.trainer import apply_xla_flags\n"
      "out = apply_xla_flags('--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=1')\n"
      "print(out)\n"
      "print(float(jnp.ones(3).sum()))\n")
  env = dict(os.environ, XLA_FLAGS="--xla_gpu_autotune_level=4", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  flags_line, total = res.stdout.split("\n")[:2]
  assert flags_line.split() == ["--xla_gpu_autotune_level=4",
                                "--xla_gpu_enable_triton_gemm=false"]
  assert total == "3.0"
  from msa_jax.trainer import apply_xla_flags
  import jax.numpy as jnp
  jnp.ones(1).block_until_ready()                       # backends started in this process
  seen = []
  before = os.environ.get("XLA_FLAGS", "")
  assert apply_xla_flags("--xla_gpu_enable_triton_gemm=false", log=seen.append) == before
  assert os.environ.get("XLA_FLAGS", "") == before and "not applied" in seen[0]


def test_recipes_compile_gpu_matmuls_with_cublas_not_triton():
  for variant in ("smoke", "tiny", "0.6b", "4b"):
    assert "--xla_gpu_enable_triton_gemm=false" in get_config(variant).xla_flags.split()


def test_init_from_loads_a_checkpoint_with_the_recipes_msa_fields(tmp_path):
  """``config.init_from``: the checkpoint's weights under the recipe's MSA fields and dtypes;
  a checkpoint of another shape is refused with the fields that differ."""
  import flax.linen as nn
  import jax.numpy as jnp
  from msa_jax.export.msa_jax_checkpoint import save_msa_jax_checkpoint
  from msa_jax.model import MSAModel
  from msa_jax.trainer import load_pretrained
  saved_cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=2, num_kv_heads=1, head_dim=16, router_layers=(1,),
                          pooling_chunk_size=4, top_k=2)
  model = MSAModel(saved_cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32)))["params"]
  ckpt = save_msa_jax_checkpoint(model, params, str(tmp_path / "ckpt"))
  run_cfg = saved_cfg.replace(pooling_chunk_size=8, top_k=4, dtype="bfloat16",
                              remat_policy="full", scan_layers=True)
  got = load_pretrained(ckpt, run_cfg)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the recipes' implementation switches (kernels, fused passes) are not the checkpoint's
  # to match: the 4b and 0.6b recipes start from a Hugging Face Qwen3 with them on
  from msa_jax.config import IMPLEMENTATION_FIELDS
  from msa_jax.trainer import resolve_model_config
  recipe = resolve_model_config(get_config("4b"))
  switches = {f: getattr(recipe, f) for f in IMPLEMENTATION_FIELDS}
  assert switches["attention_short_persistent"] and switches["attention_pad_free"]
  got = load_pretrained(ckpt, saved_cfg.replace(**switches))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match=r"differs from the config's \(hidden_size: checkpoint 32, "
                     r"config 64.*set --config.model.<field>"):
    load_pretrained(ckpt, saved_cfg.replace(hidden_size=64))


def test_a_trainer_run_starts_from_init_from(tmp_path):
  """The trainer's path: the smoke recipe's model saved as an msa_jax checkpoint becomes the
  train state of a new run (``TrainSetup.state_from_params``), optimizer state fresh."""
  import flax.linen as nn
  from msa_jax import trainer
  from msa_jax.export.msa_jax_checkpoint import save_msa_jax_checkpoint
  cfg = get_config("smoke")
  setup = trainer.TrainSetup(cfg, sharding.make_mesh(cfg.mesh_shape))
  params = jax.tree.map(lambda x: np.asarray(x) + 0.5,
                        jax.device_get(nn.unbox(setup.init_state(1).params)))
  cfg.init_from = save_msa_jax_checkpoint(setup.model, params, str(tmp_path / "ckpt"))
  state = setup.state_from_params(trainer.load_pretrained(cfg.init_from, setup.model_cfg))
  assert int(state.step) == 0
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)


def test_adam_first_moment_dtype_is_configurable():
  from msa_jax.optimizer import make_optimizer
  cfg = get_config("smoke")
  params = {"w": np.ones((4, 4), np.float32)}
  assert make_optimizer(cfg).init(params)[1][0].mu["w"].dtype == np.float32
  cfg.optim.mu_dtype = "bfloat16"
  state = make_optimizer(cfg).init(params)[1][0]
  assert state.mu["w"].dtype == jax.numpy.bfloat16 and state.nu["w"].dtype == np.float32
  cfg.optim.mu_dtype = "float16"
  with pytest.raises(ValueError, match="optim.mu_dtype must be"):
    make_optimizer(cfg)
