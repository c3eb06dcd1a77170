"""Kernel benchmarks; shared timing helpers live here."""
from __future__ import annotations

import datetime
import functools
import json
import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp


def time_ms(fn, *args, warmup: int = 2, iters: int = 10, reps: int = 5) -> float:
  """Median wall time (ms) of ``fn(*args)`` per call, device-synchronised.

  Each rep launches ``iters`` calls back to back and waits once, so the launch
  overhead hides behind device work; the median over ``reps`` is returned.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) * 1e3 / iters)
  return statistics.median(samples)


def copy_bandwidth_gbs(num_bytes: int = 4 << 30) -> float:
  """Device copy bandwidth (GB/s, bytes read + bytes written) on a large bf16 buffer."""
  x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: a + jnp.bfloat16(1))
  ms = time_ms(f, x, iters=5)
  del x
  return 2 * num_bytes / ms / 1e6


def read_bandwidth_gbs(num_bytes: int = 4 << 30) -> float:
  """Device read bandwidth (GB/s): a sum over a large bf16 buffer (reads only, one scalar
  written). The floor of a kernel that streams its operand once."""
  x = jnp.ones((num_bytes // 2 // 4096, 4096), jnp.bfloat16)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  ms = time_ms(f, x, iters=5)
  del x
  return num_bytes / ms / 1e6


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


def device_memory_stat(key: str):
  """One ``memory_stats()`` entry of the first device (``peak_bytes_in_use``,
  ``bytes_limit``, ...), or None where the backend does not report it."""
  return (jax.devices()[0].memory_stats() or {}).get(key)


def compiled_need_bytes(compiled) -> int:
  """Device bytes a compiled program needs by XLA's ``memory_analysis``: temporaries,
  arguments and outputs, less the outputs that alias arguments."""
  mem = compiled.memory_analysis()
  return (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes)


def attempt(row: dict, key: str, fn) -> None:
  """``row[key] = fn()``, or the error under ``key + '_error'`` (its type and first 300
  characters): a baseline or tiling that does not compile is a result, not a crash."""
  try:
    row[key] = fn()
  except Exception as e:  # noqa: BLE001
    row[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"


GPU_FIELDS = ("uuid", "name", "driver_version", "clocks.max.sm", "power.limit",
              "memory.total")


@functools.cache
def gpu_identity() -> tuple[dict, ...] | None:
  """Each NVIDIA GPU's identity and limits as ``nvidia-smi`` reports them (``GPU_FIELDS``:
  UUID, name, driver, top SM clock in MHz, power limit in W, memory in MiB), or None where
  there is no ``nvidia-smi``. Machines of one kind differ by a few percent (the 0.6b step
  took 1,967 and 2,023 ms on two H100s, BENCHMARKS.md session 39): the UUID says which
  card gave a number. Asked once a process (a benchmark writes its JSON after every row)."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=" + ",".join(GPU_FIELDS),
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=20, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return tuple(dict(zip(GPU_FIELDS, (v.strip() for v in line.split(","))))
               for line in out.splitlines() if line.strip())


def write_json(path: str, payload: dict) -> None:
  """Writes ``payload`` with device, jax version, UTC date and ``XLA_FLAGS`` added (XLA
  flags change compile time and kernel choice, e.g. GPU autotuning), and on an NVIDIA
  machine each GPU's identity (:func:`gpu_identity`, under ``gpus``)."""
  payload = dict(payload, device=device_name(), jax=jax.__version__,
                 date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 xla_flags=os.environ.get("XLA_FLAGS", ""))
  gpus = gpu_identity()
  if gpus is not None:
    payload["gpus"] = [dict(g) for g in gpus]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(payload, fh, indent=1)


def out_dir() -> str:
  """``$OUT`` on the device machine, else ``benchmarks/results``."""
  return os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")


def gpu_kernel_times(fn, *args, calls: int = 3) -> list[tuple[str, float]]:
  """Per-kernel device time (µs per call) of ``fn(*args)`` from a profiler trace.

  Returns ``[(kernel name, µs)]``, longest first, averaged over ``calls`` calls (the
  device stream lines of ``benchmarks.profile_summary``).
  """
  import tempfile
  from benchmarks import profile_summary
  with tempfile.TemporaryDirectory() as tmp:
    summary = profile_summary.profile_calls(lambda: jax.block_until_ready(fn(*args)), tmp,
                                            calls=calls, top=10_000, log=lambda _: None)
  return [(r["name"], 1e3 * r["ms"]) for r in summary["rows"]]
