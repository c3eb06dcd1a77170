"""One process of a localhost multi-process run (started by tests/test_distributed.py).

  python tests/distributed_worker.py MODE COORDINATOR NUM_PROCESSES PROCESS_ID OUT

MODE ``arrays``: forms a global array from per-process batches of different shapes
(``pad_to_common_shape``), sums it on the global mesh, gathers it to every host and
writes what it saw to ``OUT/process_<id>.json``. MODE ``train``: trains the tests'
small config for a few steps with workdir ``OUT/run`` (as ``msa_jax.train`` would),
then evaluates (process 0 only).
Each process sees one CPU device; the global mesh has NUM_PROCESSES devices.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from msa_jax import distributed  # noqa: E402

TRAIN_STEPS = 3


def train_config(with_eval: bool = False):
  """The tests' small config cut to TRAIN_STEPS steps, checkpointed at the end."""
  from train_common import small_cfg
  cfg = small_cfg()
  cfg.num_steps = TRAIN_STEPS
  cfg.optim.warmup_phase_steps = 2   # both phases in 3 steps
  if with_eval:                       # on process 0, with parameters gathered from both
    cfg.eval.at_end = True
    cfg.eval.num_examples = cfg.eval.batch_size = 4
    cfg.eval.memory_multipliers = (1,)
  return cfg


def arrays(out: str) -> None:
  from jax.sharding import NamedSharding, PartitionSpec
  from msa_jax.batch import MSABatch
  from msa_jax.sharding import make_mesh
  p = jax.process_index()
  docs, doc_len = 3 + p, 4 - 2 * p           # shapes differ between the processes
  doc_tokens = np.arange(2 * docs * doc_len, dtype=np.int32).reshape(2, docs, doc_len) + 100 * p
  m = 5
  batch = MSABatch(
      prefix_tokens=np.zeros((2, 1), np.int32), prefix_mask=np.ones((2, 1), bool),
      doc_tokens=doc_tokens, doc_mask=np.ones((2, docs, doc_len), bool),
      active_tokens=np.ones((2, m), np.int32), active_mask=np.ones((2, m), bool),
      question_mask=np.zeros((2, m), bool), targets=np.ones((2, m), np.int32),
      loss_mask=np.ones((2, m), bool), positive_docs=np.ones((2, docs), bool))
  padded = distributed.pad_to_common_shape(batch)
  mesh = make_mesh((-1, 1, 1))
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  tokens = jax.make_array_from_process_local_data(sharding, padded.doc_tokens)
  mask = jax.make_array_from_process_local_data(sharding, padded.doc_mask)
  total = jax.jit(lambda t, k: (t * k).sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))
  host = distributed.gather_to_host({"tokens": tokens})
  distributed.wait_for_primary("worker_arrays")
  with open(os.path.join(out, f"process_{p}.json"), "w") as f:
    json.dump({"process_index": p, "process_count": jax.process_count(),
               "device_count": jax.device_count(), "primary": distributed.is_primary(),
               "padded_doc_shape": list(padded.doc_tokens.shape),
               "global_shape": list(tokens.shape), "masked_sum": int(total(tokens, mask)),
               "gathered": np.asarray(host["tokens"]).tolist()}, f)


def train(out: str) -> None:
  from msa_jax.trainer import train_and_evaluate
  last = train_and_evaluate(train_config(with_eval=True), os.path.join(out, "run"))
  with open(os.path.join(out, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump({"last": last, "device_count": jax.device_count()}, f)


def main():
  mode, coordinator, num, pid, out = sys.argv[1:6]
  assert distributed.initialize(coordinator, int(num), int(pid))
  {"arrays": arrays, "train": train}[mode](out)


if __name__ == "__main__":
  main()
