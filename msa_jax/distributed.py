"""Multi-host set-up: ``jax.distributed.initialize`` from flags or the environment.

One process per host (TPU VM) or per GPU (SLURM: ``srun`` starts one task per GPU)
joins one global mesh. ``initialize`` decides whether to start the distributed
runtime:

* explicit ``coordinator_address``/``num_processes``/``process_id`` (the
  ``--coordinator_address`` ... flags of ``msa_jax.train``) always do;
* ``mode="auto"`` (the default) also does when the environment names more than
  one process: ``JAX_COORDINATOR_ADDRESS`` (then JAX reads the rest from its
  ``JAX_*`` variables or a cluster), a SLURM step of several tasks, an Open MPI
  job of several ranks, or a multi-worker Cloud TPU slice; JAX itself then
  finds the coordinator, the process count and id (``jax.distributed``'s
  cluster detection);
* ``mode="on"`` always calls ``jax.distributed.initialize()`` (e.g. Kubernetes),
  ``mode="off"`` never does (one process, whatever the environment says).

The training loop then uses :func:`is_primary` (only process 0 writes metrics,
config, evals and plots), :func:`pad_to_common_shape` (every process's local
batch must have the same shape to form one global array) and
:func:`gather_to_host` (full parameters on every host for evaluation).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import numpy as np

MODES = ("auto", "on", "off")


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def detect_cluster() -> Optional[str]:
  """The multi-process environment this process runs in, or None for a single process.

  Returns ``"jax_env"`` (``JAX_COORDINATOR_ADDRESS`` set), ``"slurm"`` (a job step of
  > 1 task), ``"ompi"`` (> 1 rank) or ``"tpu"`` (a slice of > 1 worker).
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "jax_env"
  if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
    if max(_int_env("SLURM_STEP_NUM_TASKS"), _int_env("SLURM_NTASKS")) > 1:
      return "slurm"
  if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "tpu"
  return None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, mode: str = "auto",
               initialization_timeout: int = 300) -> bool:
  """Starts the distributed runtime when asked or when the environment calls for it.

  Returns True when ``jax.distributed.initialize`` ran (now or earlier). Must run
  before anything touches a JAX device. Raises ``ValueError`` naming the flag to fix
  for an incomplete or inconsistent explicit set-up.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: choose one of {MODES}")
  if jax.distributed.is_initialized():
    return True
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if mode == "off":
    if given:
      raise ValueError(f"--distributed=off contradicts {sorted(given)}; drop those flags or use "
                       "--distributed=auto")
    return False
  if given and num_processes is not None and process_id is not None:
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
  if given and not os.environ.get("JAX_COORDINATOR_ADDRESS") and coordinator_address is None:
    if detect_cluster() is None:
      raise ValueError(f"{sorted(given)} given without --coordinator_address (host:port of "
                       "process 0) and no cluster environment to take it from; pass it")
  if mode == "auto" and not given and detect_cluster() is None:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=initialization_timeout)
  return True


def is_primary() -> bool:
  """True on process 0: the one that writes metrics, config, evals and plots."""
  return jax.process_index() == 0


def describe() -> str:
  """One line: process index/count and local/global device counts."""
  return (f"process {jax.process_index()}/{jax.process_count()}, "
          f"{jax.local_device_count()} local of {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)")


def _allgather_ints(values: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(values))


def pad_to_common_shape(batch, allgather: Callable[[np.ndarray], np.ndarray] = _allgather_ints):
  """Pads this process's local ``MSABatch`` to the largest shape over all processes.

  Each process buckets its own shard, so two processes can pick different buckets
  for the same step; the global array needs one shape. Padding adds masked slots
  (prefix, document, token and active positions whose masks are False), exactly
  what collation adds inside a larger bucket, so the loss is unchanged. One
  process returns ``batch`` as is. ``allgather`` maps ``[k]`` ints to
  ``[process_count, k]`` (tests inject one).
  """
  if jax.process_count() == 1 and allgather is _allgather_ints:
    return batch
  summary = batch.shape_summary
  dims = np.asarray([summary[k] for k in ("batch", "prefix", "docs", "doc_len", "active")],
                    np.int64)
  all_dims = np.asarray(allgather(dims)).reshape(-1, dims.size)
  if len(set(all_dims[:, 0].tolist())) != 1:
    raise ValueError(f"local batch sizes differ between processes {all_dims[:, 0].tolist()}; "
                     "every process must read batch_size / process_count examples a step")
  _, t, n, l, m = all_dims.max(axis=0).tolist()

  def pad(x, target):
    x = np.asarray(x)
    widths = [(0, want - have) for have, want in zip(x.shape, target)]
    return np.pad(x, widths) if any(w for _, w in widths) else x

  b = int(dims[0])
  gaps = batch.doc_position_gaps
  if gaps is not None:
    # [B, N+1]: the last column is the gap before the active tokens; new document slots
    # (padding) go before it, with no gap.
    gaps = np.asarray(gaps)
    local_n = gaps.shape[1] - 1
    padded = np.zeros((b, n + 1), gaps.dtype)
    padded[:, :local_n] = gaps[:, :local_n]
    padded[:, n] = gaps[:, local_n]
    gaps = padded
  return batch.replace(doc_position_gaps=gaps,
      prefix_tokens=pad(batch.prefix_tokens, (b, t)), prefix_mask=pad(batch.prefix_mask, (b, t)),
      doc_tokens=pad(batch.doc_tokens, (b, n, l)), doc_mask=pad(batch.doc_mask, (b, n, l)),
      active_tokens=pad(batch.active_tokens, (b, m)), active_mask=pad(batch.active_mask, (b, m)),
      question_mask=pad(batch.question_mask, (b, m)), targets=pad(batch.targets, (b, m)),
      loss_mask=pad(batch.loss_mask, (b, m)), positive_docs=pad(batch.positive_docs, (b, n)))


def gather_to_host(tree: Any) -> Any:
  """Every leaf as a full numpy array on every process (a collective: all must call it).

  On one process the tree is returned as is. Evaluation runs the generator on one
  host's devices, which cannot read parameters sharded over other hosts.
  """
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def wait_for_primary(name: str, timeout_s: int = 24 * 3600) -> None:
  """A barrier over all processes (e.g. while process 0 evaluates alone); no-op on one."""
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp
  ocp.multihost.sync_global_processes(name, timeout=timeout_s)
