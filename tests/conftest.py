"""Shared test set-up: numerics strict enough to catch shape bugs, a `gpu` marker, compiled
programs freed after each test module."""
import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if not os.environ.get("MSA_TEST_GPU"):   # CPU unless asked to test on the GPU
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# Synchronous CPU dispatch. The Mosaic GPU interpreter (kernel tests on CPU) runs JAX ops
# inside host callbacks on the same device; with async dispatch the main thread can
# enqueue ops that need the kernel's result ahead of the callback's own ops, and both
# wait forever (seen on a 2-core machine: an eager model.apply after a Pallas call).
jax.config.update("jax_cpu_enable_async_dispatch", False)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops every compiled program after each test module.

  A CPU executable keeps its JIT-compiled code in memory mappings of its own, and jax's
  caches keep every executable of the process: over the suite's thousands of programs one
  pytest process grew past Linux's 65,530 mappings a process (``vm.max_map_count``), and
  XLA segfaulted compiling or loading the next program (CI, 2026-12-05, three times at
  ~95 % of the suite; ~28,000 mappings at half of it). ``jax.clear_caches()`` and a
  collection free them: 6,344 mappings after ``test_model_kernels.py`` alone, 648 after
  clearing. Module fixtures are torn down before this one (autouse fixtures come first).
  """
  yield
  jax.clear_caches()
  gc.collect()


def _has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a GPU (run with MSA_TEST_GPU=1 on a GPU machine)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
