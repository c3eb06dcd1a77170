"""Multi-host set-up (msa_jax.distributed): environment detection, flag checks, shape
agreement between processes, grain shards, and real two-process runs on localhost
(CPU devices, jax.distributed) against the single-process result."""
import json
import os
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from msa_jax import distributed
from msa_jax.batch import MSABatch
from msa_jax.data.pipeline import example_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES")


@pytest.fixture
def clean_env(monkeypatch):
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_detect_cluster_from_environment(clean_env):
  assert distributed.detect_cluster() is None
  clean_env.setenv("SLURM_JOB_ID", "7")
  clean_env.setenv("SLURM_PROCID", "0")
  clean_env.setenv("SLURM_NTASKS", "1")
  assert distributed.detect_cluster() is None        # a one-task job: one process
  clean_env.setenv("SLURM_STEP_NUM_TASKS", "8")
  assert distributed.detect_cluster() == "slurm"
  for name in CLUSTER_VARS:
    clean_env.delenv(name, raising=False)
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0")
  assert distributed.detect_cluster() is None
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0,t1k-w-1")
  assert distributed.detect_cluster() == "tpu"
  clean_env.setenv("OMPI_COMM_WORLD_SIZE", "4")
  assert distributed.detect_cluster() == "ompi"
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  assert distributed.detect_cluster() == "jax_env"


def test_initialize_is_a_no_op_for_one_process_and_checks_flags(clean_env):
  assert distributed.initialize() is False
  assert distributed.initialize(mode="off") is False
  with pytest.raises(ValueError, match="--distributed=off contradicts"):
    distributed.initialize(num_processes=2, mode="off")
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.initialize("localhost:1", 2, 2)
  with pytest.raises(ValueError, match="without --coordinator_address"):
    distributed.initialize(num_processes=2, process_id=0)
  with pytest.raises(ValueError, match="choose one of"):
    distributed.initialize(mode="yes")
  assert not jax.distributed.is_initialized()


def _batch(b, t, n, l, m, fill):
  def arr(shape, dtype):
    return np.full(shape, fill, dtype)
  return MSABatch(prefix_tokens=arr((b, t), np.int32), prefix_mask=arr((b, t), bool),
                  doc_tokens=arr((b, n, l), np.int32), doc_mask=arr((b, n, l), bool),
                  active_tokens=arr((b, m), np.int32), active_mask=arr((b, m), bool),
                  question_mask=arr((b, m), bool), targets=arr((b, m), np.int32),
                  loss_mask=arr((b, m), bool), positive_docs=arr((b, n), bool))


def test_pad_to_common_shape_pads_with_masked_slots():
  mine = _batch(2, 1, 3, 4, 5, fill=7)
  other = np.asarray([2, 2, 5, 2, 6])           # another process's (B, T, N, L, M)
  padded = distributed.pad_to_common_shape(
      mine, allgather=lambda dims: np.stack([dims, other]))
  assert padded.shape_summary == dict(batch=2, prefix=2, docs=5, doc_len=4, active=6)
  np.testing.assert_array_equal(padded.doc_tokens[:, :3, :], 7)
  assert not padded.doc_mask[:, 3:].any() and not padded.doc_tokens[:, 3:].any()
  assert not padded.prefix_mask[:, 1:].any() and not padded.positive_docs[:, 3:].any()
  assert not padded.active_mask[:, 5:].any() and not padded.loss_mask[:, 5:].any()
  assert padded.active_mask[:, :5].all()
  with pytest.raises(ValueError, match="local batch sizes differ"):
    distributed.pad_to_common_shape(
        mine, allgather=lambda dims: np.stack([dims, np.asarray([3, 1, 3, 4, 5])]))


def test_pad_to_common_shape_keeps_the_active_gap_last():
  """Global-RoPE gaps [B, N+1]: new document slots get no gap and the gap before the active
  tokens stays in the last column, so every position is unchanged by the padding."""
  from msa_jax import positions
  mine = _batch(2, 1, 3, 4, 5, fill=1).replace(
      doc_position_gaps=np.asarray([[10, 20, 30, 40], [1, 2, 3, 4]], np.int32))
  other = np.asarray([2, 1, 5, 4, 5])
  padded = distributed.pad_to_common_shape(mine, allgather=lambda dims: np.stack([dims, other]))
  np.testing.assert_array_equal(padded.doc_position_gaps,
                                [[10, 20, 30, 0, 0, 40], [1, 2, 3, 0, 0, 4]])
  before, after = (positions.stream_positions(
      x.prefix_mask, x.doc_mask, x.active_mask, top_k=1, rope_mode="global",
      doc_gaps_bn1=x.doc_position_gaps) for x in (mine, padded))
  np.testing.assert_array_equal(after[2], before[2])               # active positions
  np.testing.assert_array_equal(after[1][:, :3], before[1])        # the real documents
  np.testing.assert_array_equal(before[2][:, 0], [1 + (10 + 20 + 30 + 40) + 3 * 4, 1 + (1 + 2 + 3 + 4) + 3 * 4])


def test_grain_shard_options_give_disjoint_equal_shards():
  source = list(range(10))
  shards = [list(example_dataset(source, seed=3, num_epochs=1,
                                 shard_options=grain.sharding.ShardOptions(i, 3, True)))
            for i in range(3)]
  assert [len(s) for s in shards] == [3, 3, 3]
  everything = sum(shards, [])
  assert len(set(everything)) == 9 and set(everything) <= set(source)
  # Without shard_options the process_index/process_count pair shards the same way.
  same = list(example_dataset(source, seed=3, num_epochs=1, process_index=1, process_count=3))
  assert same[:3] == shards[1]
  with pytest.raises(ValueError, match=r"not in \[0, 2\)"):
    example_dataset(source, seed=0, process_index=2, process_count=2)


def free_port() -> int:
  """A free TCP port on localhost (portpicker when installed)."""
  try:
    import portpicker
    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      return s.getsockname()[1]


def run_two_processes(mode: str, out, timeout: int) -> list[dict]:
  """Starts the worker twice (process 0 and 1) on one coordinator; their JSON reports."""
  address = f"localhost:{free_port()}"
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
  procs = [subprocess.Popen([sys.executable, WORKER, mode, address, "2", str(i), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-3000:]}"
  reports = []
  for i in range(2):
    with open(os.path.join(out, f"process_{i}.json")) as f:
      reports.append(json.load(f))
  return reports


def test_two_processes_form_one_global_array(tmp_path):
  reports = run_two_processes("arrays", tmp_path, timeout=120)
  for i, r in enumerate(reports):
    assert (r["process_index"], r["process_count"], r["device_count"]) == (i, 2, 2)
    assert r["primary"] == (i == 0)
    # Process 0 had 3 docs of 4 tokens, process 1 had 4 docs of 2: both padded to 4 × 4.
    assert r["padded_doc_shape"] == [2, 4, 4] and r["global_shape"] == [4, 4, 4]
    assert r["masked_sum"] == sum(range(24)) + sum(range(100, 116))
  gathered = np.asarray(reports[0]["gathered"])
  np.testing.assert_array_equal(gathered, reports[1]["gathered"])
  np.testing.assert_array_equal(gathered[:2, :3], np.arange(24).reshape(2, 3, 4))
  np.testing.assert_array_equal(gathered[2:, :, :2], np.arange(100, 116).reshape(2, 4, 2))
  assert not gathered[:2, 3:].any() and not gathered[2:, :, 2:].any()


@pytest.mark.slow
def test_two_process_training_matches_one_process_on_two_devices(tmp_path):
  """Two processes of 1 CPU device each vs one process on 2 devices, same global batches.

  The reference feeds each step the concatenation of process 0's and process 1's
  shards (what the global array holds); losses, gradient norms and final
  parameters must agree.
  """
  sys.path.insert(0, HERE)
  import distributed_worker
  from msa_jax import checkpointing, sharding
  from msa_jax.data import from_config
  from msa_jax.trainer import TrainSetup, count_tokens
  import orbax.checkpoint as ocp

  run_two_processes("train", tmp_path, timeout=600)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == list(range(1, distributed_worker.TRAIN_STEPS + 1))
  with open(tmp_path / "run" / "eval.json") as f:          # written by process 0 alone
    evaluation = json.load(f)["rows"]
  assert len(evaluation) == 1 and evaluation[0]["num_examples"] == 4
  assert 0.0 <= evaluation[0]["router_recall@1"] <= 1.0

  cfg = distributed_worker.train_config()
  mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:2])
  setup = TrainSetup(cfg, mesh)
  shards = [from_config.make_train_iterator(
      cfg.data, seed=cfg.seed, batch_size=cfg.batch_size,
      chunk_size=setup.model_cfg.pooling_chunk_size, process_index=i, process_count=2,
      verbose=False) for i in range(2)]
  state = setup.init_state(cfg.seed)
  for row in rows:
    local = [next(it) for it in shards]
    dims = [np.asarray(list(b.shape_summary.values())) for b in local]
    local = [distributed.pad_to_common_shape(b, allgather=lambda _: np.stack(dims))
             for b in local]
    batch = jax.tree.map(lambda *xs: np.concatenate(xs), *local)
    state, metrics = setup.step(state, setup.put_batch(batch))
    # Logged: process 0's tokens × 2 (the shards are alike); here: both shards' tokens.
    assert row["tokens_per_step"] == pytest.approx(count_tokens(batch), rel=0.25)
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "router_recall@5"):
      np.testing.assert_allclose(float(metrics[key]), row[key], rtol=2e-5, atol=1e-6,
                                 err_msg=f"{key} at step {row['step']}")

  manager = checkpointing.make_manager(str(tmp_path / "run"), 2, 1, False)
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(setup.abstract_state)))["state"]
  for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
