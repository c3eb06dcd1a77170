"""MSA data: examples, tokenizers, synthetic tasks, Memory Interleave, collation, grain pipeline.

Modules (import by full path, e.g. ``from msa_jax.data.collate import collate``):
  example     ``Example``/``Document``: one unpadded, validated sample
  tokenizer   ``WordTokenizer`` (built-in, synthetic tasks), ``HFTokenizer`` (local HF dir)
  synthetic   kv retrieval / multi-hop tasks, ``smoke_kv_task``, ``TaskMixture``
  niah        RULER-style NIAH suite (8 subtasks)
  interleave  Memory Interleave expansion and the inference-time id parser
  collate     ``BucketShapes``, ``choose_bucket``, ``collate`` -> ``MSABatch``, padding waste
  jsonl       JSONL readers (per-example rows, shared corpus + queries)
  pipeline    grain pipeline: shuffle, shard, expand, bucket, collate; checkpointable
"""
