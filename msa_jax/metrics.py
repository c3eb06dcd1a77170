"""Training telemetry: metrics.jsonl, TensorBoard events, a console progress line, MFU."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak per device (vendor figures), used for MFU where known.
_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v5 lite": 197e12,
               "tpu v5": 459e12, "tpu v4": 275e12, "tpu v6": 918e12}


def device_peak_flops(device=None) -> tuple[float, str]:
  """Peak FLOP/s of one device and where the number came from.

  Vendor dense-bf16 peaks for known accelerators; elsewhere (a CPU) a measured
  float32 matmul rate, so MFU stays meaningful on the smoke run.
  """
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for key, peak in _PEAK_FLOPS.items():
    if key in kind:
      return peak, f"vendor peak ({device.device_kind})"
  return matmul_rate(jnp.float32, 512, device=device), \
      f"measured f32 matmul ({device.device_kind})"


def matmul_rate(dtype=jnp.bfloat16, n: Optional[int] = None, reps: int = 20,
                device=None) -> float:
  """Measured FLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype`` on ``device``.

  The attainable dense rate, the second MFU denominator beside the vendor peak.
  ``n`` defaults to 8192 on an accelerator (compute bound) and 512 on a CPU (cheap).
  """
  device = device or jax.devices()[0]
  if n is None:
    n = 512 if device.platform == "cpu" else 8192
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def model_flops_per_token(cfg, context_len: int) -> float:
  """The textbook estimate 6·params + 12·layers·heads·D·context per token.

  Kept for parameter counting (``launch/results.py``: its 6·N term at context 0); the
  trainer's MFU uses ``msa_jax.flops.step_flops``, which counts what the step does.
  """
  per_layer = (cfg.hidden_size * cfg.num_heads * cfg.head_dim * 2
               + cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim * 2
               + 3 * cfg.hidden_size * cfg.intermediate_size)
  params = cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context_len
  return 6.0 * params + attn


def to_python(metrics: dict[str, Any]) -> dict[str, Any]:
  """Device scalars/arrays to JSON-able Python values."""
  out = {}
  for k, v in metrics.items():
    a = np.asarray(v)
    out[k] = a.item() if a.ndim == 0 else a.tolist()
  return out


SUPERSEDED_FILE = "metrics.superseded.jsonl"


def rewind_rows(path: str, resume_step: int) -> int:
  """Keeps the rows of ``path`` up to ``resume_step``: the rows logged after the checkpoint a
  run resumes from (steps that will be trained again) and any torn last line (a kill
  mid-write) move to ``metrics.superseded.jsonl`` beside it, so metrics.jsonl never holds a
  step twice and nothing is deleted. Returns how many lines moved."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep, moved = [], []
  for line in lines:
    try:
      step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      moved.append(line if line.endswith("\n") else line + "\n")
      continue
    (keep if step <= resume_step else moved).append(line)
  if not moved:
    return 0
  with open(os.path.join(os.path.dirname(path), SUPERSEDED_FILE), "a") as f:
    f.writelines(moved)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)
  return len(moved)


class MetricsWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

  ``resume_step``: the step the run restarts from; rows after it (from the interrupted
  attempt) move to ``metrics.superseded.jsonl`` (``rewind_rows``).
  """

  def __init__(self, workdir: str, enable_tensorboard: bool = True, resume_step: int = 0):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() == 0:
      moved = rewind_rows(self.path, resume_step)
      if moved:
        print(f"metrics: {moved} row(s) logged after step {resume_step} by the interrupted "
              f"run moved to {SUPERSEDED_FILE} (those steps are trained again)", flush=True)
    self._file = open(self.path, "a", buffering=1)
    self._tb = None
    if enable_tensorboard and jax.process_index() == 0:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:  # e.g. a GPU image without it: metrics.jsonl still has everything
        logging.warning("tensorboardX is not installed: metrics go to %s only (pip install "
                        "tensorboardX, or pass --config.tensorboard=False to silence this)",
                        self.path)
      else:
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": int(step), **to_python(metrics)}
    if jax.process_index() == 0:
      self._file.write(json.dumps(row) + "\n")
      if self._tb is not None:
        for k, v in row.items():
          if k != "step" and isinstance(v, (int, float)) and np.isfinite(v):
            self._tb.add_scalar(k.replace("@", "_at_"), v, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A one-line console report with rate and ETA."""

  def __init__(self, total_steps: int, start_step: int = 0, stream=sys.stdout):
    self.total, self.start, self.stream = total_steps, start_step, stream
    self.t0 = time.perf_counter()

  def line(self, step: int, m: dict[str, Any]) -> str:
    elapsed = time.perf_counter() - self.t0
    done = max(step - self.start, 1)
    eta = elapsed / done * max(self.total - step, 0)
    keys = [("lm_loss", "lm {:.3f}"), ("lm_loss_answer", "lm answers {:.3f}"),
            ("lm_loss_retrieval", "lm ids {:.3f}"), ("aux_loss", "aux {:.3f}"),
            ("router_recall@1", "R@1 {:.2f}"), ("router_recall@5", "R@5 {:.2f}"),
            ("tokens_per_sec", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}"),
            ("mfu_measured", "({:.1%} of measured)")]
    parts = [fmt.format(m[k]) for k, fmt in keys if k in m and m[k] is not None]
    return (f"step {step}/{self.total} ({step / max(self.total, 1):.0%}) | " + " | ".join(parts)
            + f" | elapsed {_hms(elapsed)} ETA {_hms(eta)}")

  def report(self, step: int, m: dict[str, Any]) -> None:
    if jax.process_index() == 0:
      print(self.line(step, m), file=self.stream, flush=True)


def _hms(seconds: float) -> str:
  s = int(seconds)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
