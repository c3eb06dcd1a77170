"""MSA data: examples, tokenizers, synthetic tasks, Memory Interleave, collation, grain pipeline.

Import modules by full path, e.g. ``from msa_jax.data.collate import collate``.
"""
