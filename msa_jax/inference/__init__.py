"""Inference (SPEC §5): the on-disk memory bank, the encoder, the engine, Memory Interleave.

  bank.py          the bank format: writer (append, commit, resume) and reader (memory maps)
  encode.py        stage 1: corpus → bank (``python -m msa_jax.encode``)
  bank_routing.py  tiled, memory-parallel top-k routing over a bank
  memory.py        a bank placed on a mesh; the memory source the model routes through
  engine.py        stages 2-3: prefill (route + KV cache) and KV-cache decode steps
  interleave.py    generation with Memory Interleave over a bank or per-example memories
  memory_engine.py ``MemoryEngine``: checkpoint + bank → answers
"""
from msa_jax.inference.bank import BankError, MemoryBank, open_bank
from msa_jax.inference.memory_engine import MemoryEngine

__all__ = ["BankError", "MemoryBank", "MemoryEngine", "open_bank"]
