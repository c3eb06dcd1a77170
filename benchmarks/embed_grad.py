r"""The token embedding's gradient at the 0.6b step's shape: each ``model.embed_grad``.

In the 0.6b training step (16K memory tokens, batch 32) the embedding gradient of the
documents' 542,464 tokens was one scatter-add of bf16 rows into a bf16 ``[151936, 1024]``
table copy: 114 ms of a 4,543 ms step on the H200 (BENCHMARKS.md, session 27), against
~1 ms to stream its bytes. The kv task's documents use few distinct tokens (644 in 68K),
so many rows land on the same table entries at once. This times the lookup's backward
alone (the cotangent given) for ``msa_jax.layers.EMBED_GRADS``:

* ``autodiff``: JAX's transpose of ``take`` on the bf16 table copy (bf16 scatter-add);
* ``f32_scatter``: the rows scattered into float32 zeros (native float atomics);
* ``sorted``: the ids sorted and the rows permuted to match first, then the float32 scatter;

with ids drawn from (a) the recipe's kv documents (a real batch's token histogram) and
(b) uniform over the vocabulary (no collisions to speak of), against a floor: a pure read
of the cotangent plus writing the float32 gradient once (``read_bandwidth_gbs`` in the
same run). Each method's gradient is checked against the float32 one before timing.

Run: python -m benchmarks.embed_grad [--tokens 542464] [--vocab 151936] [--dim 1024]
Prints a table and writes ``embed_grad.json`` to ``$OUT`` (or benchmarks/results).
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import out_dir, read_bandwidth_gbs, time_ms, write_json
from msa_jax import layers


def kv_token_ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
  """``n`` document token ids with the 0.6b recipe's kv-task histogram (one real batch of
  its documents, resampled), folded into ``vocab``."""
  from benchmarks import train_step
  cfg = train_step.recipe("0.6b", 16384, False, "1,1,1")
  batch = train_step.host_batch(cfg, cfg.model, 2)
  docs = np.asarray(batch.doc_tokens)[np.asarray(batch.doc_mask)]
  return np.random.default_rng(seed).choice(docs % vocab, size=n).astype(np.int32)


def backward(grad: str, vocab: int, dim: int):
  """jitted ``(table f32 [V, D], ids [N], g bf16 [N, D]) -> d table`` for ``grad``."""
  emb = layers.Embed(vocab, dim, dtype=jnp.bfloat16, grad=grad)

  def pull(table, ids, g):
    _, vjp = jax.vjp(lambda t: emb.apply({"params": {"embedding": t}}, ids), table)
    return vjp(g)[0]
  return jax.jit(pull)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tokens", type=int, default=5216 * 104)
  p.add_argument("--vocab", type=int, default=151936)
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--read_bytes", type=int, default=4 << 30,
                 help="size of the read-bandwidth probe (the floor's bandwidth)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  n, v, d = args.tokens, args.vocab, args.dim
  bw = read_bandwidth_gbs(args.read_bytes)
  floor_ms = (n * d * 2 + v * d * 4) / bw / 1e6
  table = jnp.asarray(np.random.default_rng(1).normal(size=(v, d)), jnp.float32)
  g = jnp.asarray(np.random.default_rng(2).normal(size=(n, d)), jnp.bfloat16)
  id_sets = {"kv": kv_token_ids(n, v), "uniform":
             np.random.default_rng(3).integers(0, v, size=n).astype(np.int32)}
  rows = []
  print(f"{jax.devices()[0]}: read {bw:.0f} GB/s; floor (read the bf16 cotangent, write the "
        f"f32 gradient) {floor_ms:.3f} ms")
  print(f"{'ids':8} {'distinct':>8} {'method':12} {'ms':>9} {'x floor':>8} {'rel err':>9}")
  fns = {grad: backward(grad, v, d) for grad in layers.EMBED_GRADS}
  for name, ids_np in id_sets.items():
    ids = jnp.asarray(ids_np)
    want = fns["f32_scatter"](table, ids, g)
    for grad, fn in fns.items():
      got = fn(table, ids, g)
      err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
      ms = time_ms(fn, table, ids, g, iters=5)
      rows.append({"ids": name, "distinct": int(len(np.unique(ids_np))), "method": grad,
                   "ms": ms, "floor_ms": floor_ms, "rel_err_vs_f32": err})
      print(f"{name:8} {rows[-1]['distinct']:8d} {grad:12} {ms:9.3f} {ms / floor_ms:8.2f} "
            f"{err:9.2e}")
  result = {"tokens": n, "vocab": v, "dim": d, "read_gbs": bw, "rows": rows}
  path = args.out or os.path.join(out_dir(), "embed_grad.json")
  write_json(path, result)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
