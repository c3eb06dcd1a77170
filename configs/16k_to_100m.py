r"""The MSA recipe: Qwen3-4B + Memory Sparse Attention, trained on 16K-token
memories and evaluated up to 100M tokens (paper §3.3-3.5, SPEC §4).

Variants through the config string (``--config=configs/16k_to_100m.py:VARIANT``):
  (none) / ``4b``  the paper recipe: Qwen3-4B-Instruct init (``init_from``), P 64, k 16,
                   router layers 18-35, τ 0.1, router warm-up then main phase,
                   memory curriculum 8k → 64k tokens; needs a checkpoint and accelerators.
  ``0.6b``         the same recipe on the Qwen3-0.6B shape (fast ablations).
  ``tiny``         a 2-layer width-256 model from scratch on the reading task (documents of
                   6 key-value facts, 2 of them stated again at the end, with a document
                   LM loss; the question names one key), 16K-token memories after a
                   5,800-step reader stage of 8-document memories at batch 128
                   (``data.memory_curriculum``, ``data.batch_curriculum``), documents of
                   1, 2, 4 then 6 facts (``data.facts_curriculum``), routing loss on the
                   smooth max against the whole batch's documents (``loss.aux_softmax``,
                   ``loss.aux_batch_negatives``); one GPU. ``--config.data.task=multihop``
                   / ``niah`` switch to 2-hop chains / the RULER-style suite with the same
                   alphabets.
  ``smoke``        a 3-layer width-64 model on the synthetic key-value task; a 2-core
                   CPU learns to route (recall@1 ≥ 0.9) and answer in minutes.
Any field can be overridden: ``--config.num_steps=100 --config.model.top_k=4``; tuple
fields take a comma list or a Python literal (``--config.model.router_layers=1,2``,
``--config.model.router_layers=all``, ``--config.model.router_layers=None`` for the
default upper half, ``--config.eval.memory_multipliers=1,4``,
``--config.data.memory_curriculum='((0,8192),(10000,65536))'``).
"""
import ml_collections
from ml_collections import config_dict

VARIANTS = ("4b", "0.6b", "tiny", "smoke")


def _model(preset: str, **overrides) -> ml_collections.ConfigDict:
  """A preset's fields with overrides, checked; ``vocab_size=0`` means "the task tokenizer's"."""
  from msa_jax.config import preset as model_preset
  checked = dict(overrides)
  if overrides.get("vocab_size") == 0:   # placeholder for the check only
    checked["vocab_size"] = 1
  fields = model_preset(preset, **checked).to_dict()
  fields["vocab_size"] = overrides.get("vocab_size", fields["vocab_size"])
  fields["router_layers"] = _tuple_field(fields["router_layers"])
  return ml_collections.ConfigDict(fields)


def _tuple_field(value):
  """A tuple-typed field, also when its value is None: config_flags cannot override a
  plain None (its type is NoneType), but parses a typed placeholder like any tuple."""
  return config_dict.placeholder(tuple) if value is None else tuple(value)


def _single_fact_kv(bracket_ids: bool) -> ml_collections.ConfigDict:
  """Key-value documents of one fact: a 3-token id, a 3-token key, a 2-token value
  (tiny and smoke).

  128-symbol id and key alphabets give 128³ = 2,097,152 unique ids and keys, so one
  shared corpus (``python -m msa_jax.data.write_task``) holds over 2M documents of 8
  tokens (10 with brackets), each with a unique id and key: a bank of 16M+ tokens.
  """
  return ml_collections.ConfigDict(dict(
      facts_per_doc=1, id_len=3, key_len=3, value_len=2, num_id_symbols=128,
      num_key_symbols=128, num_value_symbols=32, hops=1, fact_words=False,
      question_words=False, bracket_ids=bracket_ids, fact_slot_len=0, fact_gaps=0,
      restate_facts=0,
      positional_ids=False, answer_with_key=False))


def _reading_kv() -> ml_collections.ConfigDict:
  """The reading task (tiny): a document is a bare 4-token id then 6 facts ``key value``
  (4-token key, 2-token value): 40 tokens, 5 whole chunks of P 8; 16K tokens hold 409
  documents. The question is one key; the answer its value, so the reader must find the
  key among the document's 6.

  Sized for one shared corpus of 100M tokens (6,104 × 409 = 2,496,536 documents): 128⁴ =
  268M ids and keys, corpus-unique (``python -m msa_jax.data.write_task``), so each
  question has one gold fact in the bank. Alphabets of 128 symbols, not more: with 512
  key symbols the router never left chance on the CPU calibration (WORKSPACE.md).
  ``fact_slot_len=8`` (= P) pads the id and each fact with ``-`` to one chunk (56-token
  documents, every fact inside one chunk); it did not make the router learn on the CPU
  calibration either (cal9-cal12, cal16, cal22; WORKSPACE.md), so it stays 0 (packed).
  The tiny recipe restates 2 facts (``restate_facts``): 52-token documents, 315 in 16K
  tokens, 6,104 × 315 = 1,922,760 in 100M.
  """
  return ml_collections.ConfigDict(dict(
      facts_per_doc=6, id_len=4, key_len=4, value_len=2, num_id_symbols=128,
      num_key_symbols=128, num_value_symbols=64, hops=1, fact_words=False,
      question_words=False, bracket_ids=False, fact_slot_len=0, fact_gaps=0, restate_facts=0,
      positional_ids=False,
      answer_with_key=False))


def _reading_niah() -> ml_collections.ConfigDict:
  """The NIAH suite with the reading task's id/key alphabets: ``[ id ]`` + 34 text tokens
  = 40-token documents, like the kv documents."""
  return ml_collections.ConfigDict(dict(
      subtask="", weights=(), doc_len=34, id_len=4, key_len=4, value_len=2,
      num_id_symbols=128, num_key_symbols=128, num_value_symbols=64,
      num_distractor_needles=4, num_values=4, num_queries=4, uuid_groups=(4, 4),
      prefix_bos=True))


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""             # local Hugging Face Qwen3 dir (or MSA-4B / msa_jax checkpoint)
  c.requires_init_from = False
  c.num_steps = 20_000
  c.batch_size = 64
  # Gradient accumulation: each step's batch runs as this many slices (a lax.scan), their
  # gradients summed into the full batch's (msa_jax.microbatch); activation memory is a
  # slice's. E.g. 0.6b at batch 32 with model.remat_policy="dots" needs 4.
  c.microbatches = 1
  c.log_every_steps = 50
  c.mesh_shape = (-1, 1, 1)    # (data, fsdp, tensor); -1 takes the remaining devices
  c.logical_axis_rules = _tuple_field(None)  # None: msa_jax.sharding.DEFAULT_RULES
  c.tensorboard = True
  # A persistent XLA compilation cache ("" = off): a restart, or another run of the same
  # shapes, loads compiled steps instead of compiling them again.
  c.compilation_cache_dir = ""
  # Added to XLA_FLAGS before JAX starts (flags the environment sets win). cuBLAS for every
  # GPU matmul instead of Triton gemm fusions: XLA's autotuning of those fusions kept the
  # 0.6b step from compiling in 220-280 s on the H200; with this flag it compiled in 64 s
  # and ran at 453 TFLOP/s executed (BENCHMARKS.md). A known flag on CPU too (ignored there).
  c.xla_flags = "--xla_gpu_enable_triton_gemm=false"

  c.optim = ml_collections.ConfigDict()
  c.optim.warmup_phase_steps = 1_000   # router warm-up: L = 0.1·L_LM + L_aux
  c.optim.warmup_phase_lr = 1e-4
  c.optim.warmup_lm_weight = 0.1
  c.optim.warmup_aux_weight = 1.0
  c.optim.main_phase_lr = 1e-4         # main phase: L = L_LM + 0.1·L_aux, annealed to final_lr
  c.optim.final_lr = 6e-6
  c.optim.main_lm_weight = 1.0
  c.optim.main_aux_weight = 0.1
  c.optim.lr_ramp_steps = 100
  # > 0: hold main_phase_lr and anneal (cosine) only over the last this many steps
  # (warmup-stable-decay); 0: cosine over the whole main phase.
  c.optim.decay_steps = 0
  c.optim.grad_clip_norm = 1.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.mu_dtype = ""                # Adam's first moment: "" = parameter dtype, or "bfloat16"
  # A step whose update norm exceeds this multiple of the parameters' norm has exploded
  # (e.g. a huge lr): the run stops before saving it (README "When things go wrong").
  c.optim.max_update_ratio = 1.0

  c.loss = ml_collections.ConfigDict()
  c.loss.infonce_temperature = 0.1
  # > 0: also a next-token loss inside the memory documents at this weight (each document
  # alone through the causal LM, train_step.doc_lm_loss): a backbone trained from scratch
  # learns what its documents say; the paper's is pretrained. (On the reading task's random
  # facts it did not make the router learn: WORKSPACE, lead-cal1.)
  c.loss.doc_lm_weight = 0.0
  # > 0: the routing loss scores a document by the smooth maximum τ·log mean exp(s/τ) of
  # its (routing token, chunk) scores at this τ, so its gradient reaches every chunk;
  # 0: the hard max (one pair a document). Selection, metrics and inference keep the max.
  # The tiny recipe sets 0.1 (below).
  c.loss.aux_softmax = 0.0
  # > 0: also a chunk-level routing loss at this weight (same schedule as the document-level
  # one): InfoNCE whose positives are the chunks holding the routing query verbatim (the
  # key's chunk in the reading task), against every other chunk of the memory.
  c.loss.aux_chunk_weight = 0.0
  # True: the training forward selects each example's gold documents in every router layer
  # (the router's best others fill the rest of top-k); scores, recall and the routing loss
  # stay the router's. An ablation (does misrouting hold the reader back?); evaluation
  # always routes with the router.
  c.loss.oracle_routing = False
  # True: the routing loss scores each example's query against every document of the batch
  # (B·N candidates, not N; another example's copy of a gold document is left out), so
  # the router trains against far more distractors than one memory holds. Costs
  # [B, M, B·N, C] float32 scores per router layer (B times the usual routing FLOPs, which
  # msa_jax.flops does not count: the MFU line leaves them out). The tiny recipe sets it
  # (WORKSPACE.md: CPU session 13, H200 sessions 14-15).
  c.loss.aux_batch_negatives = False
  # Active positions per example in one chunk of the LM loss: the head's float32 logits
  # exist for one chunk at a time (local batch x this x vocab x 4 bytes), never [B, M, vocab].
  c.loss.lm_chunk_size = 64

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1_000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  c.data = ml_collections.ConfigDict()
  c.data.task = "kv"               # kv | multihop | niah | jsonl
  c.data.interleave = True         # Memory Interleave samples (SPEC §4)
  # False: the answer sample (question + injected documents -> answer) has no routing
  # positives, so only the retrieval rounds train the router (aux loss, router metrics).
  c.data.answer_positives = True
  c.data.num_docs = 0              # 0: derived from memory_tokens
  c.data.memory_tokens = 16_384
  # (step, memory tokens) pairs: the SFT curriculum 8k → 64k (paper §3.3.2); tokens None
  # means data.memory_tokens (e.g. '((0,320),(600,None))': small memories first).
  c.data.memory_curriculum = ((0, 8_192), (10_000, 65_536))
  # (step, facts per document) pairs, kv / multihop only: documents of fewer facts first,
  # as many documents a memory as data.kv's; the last entry is data.kv.facts_per_doc
  # (what evaluation uses). () trains on data.kv's documents throughout.
  c.data.facts_curriculum = ()
  # (step, global batch size) pairs: a batch size per stage, the last None or batch_size
  # (what the rest of the run uses; None means batch_size); e.g. small memories
  # (memory_curriculum) with a large batch first, so the reader sees many answers a step.
  # () trains at batch_size throughout.
  c.data.batch_curriculum = ()
  # > 0, global RoPE only (model.rope_mode="global"): a memory shorter than this many
  # tokens is numbered as if spread over this many (its documents in order, at random
  # gaps; the question after all of them), so a curriculum's short memories show the
  # position distances of the long one. Without it a global model trained on 320-token
  # memories lost its ids at the switch to 16K (WORKSPACE.md, session 16). 0: off.
  c.data.global_position_span = 0
  c.data.kv = ml_collections.ConfigDict(dict(
      facts_per_doc=16, id_len=2, key_len=2, value_len=2, num_id_symbols=128,
      num_key_symbols=256, num_value_symbols=256, hops=1, fact_words=True,
      question_words=True, bracket_ids=True, fact_slot_len=0, fact_gaps=0, restate_facts=0,
      positional_ids=False,
      answer_with_key=False))
  # data.task = "niah": the RULER-style suite (msa_jax.data.niah); subtask "" mixes all
  # 8 subtasks (weights () = uniform, else one weight per subtask in SUBTASKS order).
  # Memory size from data.num_docs / data.memory_tokens like the kv task.
  c.data.niah = ml_collections.ConfigDict(dict(
      subtask="", weights=(), doc_len=48, id_len=2, key_len=2, value_len=2,
      num_id_symbols=128, num_key_symbols=256, num_value_symbols=256,
      num_distractor_needles=4, num_values=4, num_queries=4, uuid_groups=(4, 4),
      prefix_bos=True))
  # data.task = "jsonl": per-example rows (jsonl_path), or query rows (jsonl_path) over a
  # shared corpus (corpus_path), tokenised with the local HF tokenizer tokenizer_dir.
  c.data.jsonl_path = ""
  c.data.eval_jsonl_path = ""      # held-out rows for eval ("": the training file, warned)
  c.data.corpus_path = ""
  c.data.tokenizer_dir = ""
  c.data.shuffle_buffer = 0
  # > 0: synthetic examples are made in this many worker processes (grain mp_prefetch; the
  # same batches as 0), at most half the CPU cores and none below 2 (a 2-core CPU runs
  # in-process). A small model's GPU step waits on the Python that makes its examples.
  c.data.worker_count = 0
  # Caps (0: none), checked before training starts: a JSONL document longer than
  # max_doc_len tokens is reported with file:line (documents are never truncated; a
  # batch's memory is padded to its longest document, so one very long document can
  # exhaust device memory); max_docs / max_active cap the documents of one memory and
  # the active tokens (question + injected documents + target) of one sample.
  c.data.max_doc_len = 4_096
  c.data.max_docs = 0
  c.data.max_active = 0
  # Bucket caps: at most memory_buckets memory shapes (a finite JSONL source; a synthetic
  # task has one per curriculum stage) x active_buckets active lengths per stage. Every
  # bucket is one compile of the step; fewer buckets mean more padding.
  c.data.memory_buckets = 3
  c.data.active_buckets = 4
  # Document slots a multiple of this many tokens (0: whole chunks of P). Pooling masks a
  # partial last chunk, so the slot only sets padding (tests/test_train_memory_config.py).
  c.data.doc_slot_multiple = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.at_end = True
  c.eval.num_examples = 64
  c.eval.batch_size = 8
  # Memory sizes as multiples of the training memory: 16K → 100M tokens for the recipe.
  c.eval.memory_multipliers = (1, 4, 16, 64, 256, 1024, 6104)
  c.eval.max_rounds = 3
  c.eval.max_new_tokens = 16
  # Also answer with one retrieval round, and with ids injected without the documents'
  # text (the paper's Table 4 ablations; msa_jax.evaluate.ABLATIONS): 3 more passes.
  c.eval.interleave_ablations = False
  return c


def get_config(arg: str = "4b") -> ml_collections.ConfigDict:
  """Returns the recipe for ``arg`` (one of VARIANTS)."""
  variant = (arg or "4b").strip()
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/16k_to_100m.py; "
                     f"choose one of {VARIANTS}")
  c = _base()
  c.variant = variant
  if variant == "4b":
    c.model = _model("qwen3-4b", router_layers=tuple(range(18, 36)), pooling_chunk_size=64,
                     top_k=16, dtype="bfloat16", remat_policy="full", scan_layers=True,
                     kernels="auto", attention_pad_free=True, attention_short_persistent=True)
    c.requires_init_from = True
    c.mesh_shape = (1, -1, 1)
    # Batch 8 at 16K memory tokens needed 135.1 GiB with a float32 first moment, over the
    # H200's 132.8 (benchmarks.train_step, 2026-12-01); a bf16 first moment saves 7.5 GiB.
    c.optim.mu_dtype = "bfloat16"
    # One active length per stage (the probe's longest): measured on the 0.6b kv data
    # (python -m benchmarks.train_step --buckets), padding 22.0-22.2% of all tokens with
    # one bucket against 21.8-21.9% with two (16 and 120 active slots): one compile less.
    c.data.active_buckets = 1
    # The kv documents are 100 tokens: slots of 104, not two whole chunks of 64 (128),
    # cut the document stream's executed work by 19% (its padding from 22% to 4%).
    c.data.doc_slot_multiple = 8
  elif variant == "0.6b":
    # attention_pad_free: the documents' q/k/v are not padded to the attention kernel's
    # 128-row tiles (4,543 -> 4,265 ms a step on the H200, 2026-12-05, BENCHMARKS.md);
    # attention_short_persistent: their forward as one persistent kernel (2.74 ms against
    # 3.68 for the tiled kernel at this step's document shape on an H100, 2026-12-05,
    # benchmarks/doc_attention.py); qk_norm_rope_vjp="fused_bf16": the q/k norms and RoPE in
    # one forward pass and one backward (the step 2,176 -> 2,142 ms at batch 16 on an H100,
    # 2026-12-05, same memory), RoPE's cotangent rounded to bf16 between them as JAX's
    # backward is written (2,131.5 -> 2,085.6 ms, 2026-12-06); qk_norm_rope_vjp="pallas":
    # the same math as Mosaic GPU kernels on a GPU (pallas_kernels/norm_rope.py; 2,103.5 ->
    # 2,030.7 ms, 2026-12-06; fused_bf16's XLA code elsewhere). rope_tables and
    # remat_policy="mlp_input" measured no gain and stay off (python -m
    # benchmarks.train_step --compare, BENCHMARKS.md)
    c.model = _model("qwen3-0.6b", pooling_chunk_size=64, top_k=16, dtype="bfloat16",
                     remat_policy="full", scan_layers=True, kernels="auto",
                     attention_pad_free=True, attention_short_persistent=True,
                     qk_norm_rope_vjp="pallas")
    c.requires_init_from = True
    c.mesh_shape = (1, -1, 1)
    # Batch 8 at 16K memory tokens needed 135.1 GiB with a float32 first moment, over the
    # H200's 132.8 (benchmarks.train_step, 2026-12-01); a bf16 first moment saves 7.5 GiB.
    c.optim.mu_dtype = "bfloat16"
    # One active length per stage (the probe's longest): measured on the 0.6b kv data
    # (python -m benchmarks.train_step --buckets), padding 22.0-22.2% of all tokens with
    # one bucket against 21.8-21.9% with two (16 and 120 active slots): one compile less.
    c.data.active_buckets = 1
    # The kv documents are 100 tokens: slots of 104, not two whole chunks of 64 (128),
    # cut the document stream's executed work by 19% (its padding from 22% to 4%).
    c.data.doc_slot_multiple = 8
  elif variant == "tiny":
    c.model = _model("tiny", vocab_size=1024, hidden_size=256, intermediate_size=1024,
                     num_layers=2, num_heads=8, num_kv_heads=8, head_dim=32,
                     pooling_chunk_size=8, top_k=1, dtype="bfloat16",
                     router_trunk_grad=0.1)
    # Two layers (the router at layer 1): from scratch the 6-fact router learnt with 2
    # layers and stayed at chance with 4 (CPU, depth-cal1-4), and on the H200 the recipe
    # routed at recall@1 0.75 with 2 layers against 0.40 with 4 (WORKSPACE.md).
    # Width 256 (8 heads): the reader left chance only from width 256 (H200, session 9).
    #
    # router_trunk_grad 0.1 and top_k 1 (WORKSPACE.md "What held the ids back", H200 and
    # CPU, session 10): with the routing loss's whole gradient in the shared layers the
    # model never learnt to name the gold document (ids at chance in every run, with the
    # gold document selected by an oracle too); with a tenth of it, recall@1 0.99 AND ids
    # at 0.03-0.1 nats (top_k 1). top_k 4 with these settings: not yet measured.
    #
    # Eight KV heads (no GQA) and answers that restate their key (data.kv.answer_with_key):
    # the answers' lookup, at chance in every earlier variant, was learnt only with both
    # (H200, session 12, WORKSPACE.md "The answers' lookup learnt"): answers 0.12 nats by step
    # 4,250 and exact match 0.78 at 9,700 at batch 128 (2 KV heads: 0.65 at 5,000, EM 0.04).
    #
    # Two stages. Reader stage, steps 0-5,799: memories of 8 documents (416 tokens) at
    # batch 128 (64 answers a step), ~20 steps/s alone on the H200; then the training
    # memory, 16K tokens (315 documents), at batch 16 for 200 steps: 5 min 38 s in all
    # (session 21). The lr is held at its peak until
    # step 5,000 and annealed over the last 1,000 (warmup-stable-decay, optim.decay_steps):
    # the ids are learnt one token at a time at steps ~1,200-4,500 and must be learnt at
    # the peak lr (H200, session 15: a 5,700-step cosine learnt them in 1 seed of 4). This
    # schedule, 3 seeds, and a 7,500-step one, 3 more (H200, session 16, WORKSPACE.md
    # "Warmup-stable-decay"): ids learnt in 6 of 6; the answers' lookup in 2 (best: EM 0.89,
    # oracle EM 1.00, recall@1 0.89 at 16K, this schedule); the others EM 0.13-0.61 with
    # the answers at 0.12-0.46 nats. The Done-when's EM >= 0.9 at 16K: not yet met.
    # Every run quoted here trained on a replay (each stage restarted the seed's examples;
    # fixed in session 17, from_config.stage_seed). With fresh stages (session 18, 4 seeds)
    # the ids came in 2, the lookup in 1, both in none.
    #
    # The drill (session 21, WORKSPACE.md "The drill"): each document states 2 of its 6
    # facts again at its end (data.kv.restate_facts) and a document LM loss at weight 0.1
    # (loss.doc_lm_weight) trains every restated value as a lookup inside the document:
    # thousands of lookups a step instead of 64 answers. Fresh stages, H200: the recipe
    # alone read at EM 0.99 (oracle 1.00), recall@1 0.99 at 16K after 5 min 38 s; three
    # seeds side by side: answers at 0.000 nats in 2 (EM 0.99 in the one evaluated), 0.2
    # in the third (EM 0.45). At weight 1.0 the first statements' random values hurt
    # (CPU, session 20); 0.1 is the weight measured. (Set below, with data.kv.)
    c.num_steps = 6_000
    c.optim.decay_steps = 1_000
    c.batch_size = 16
    c.log_every_steps = 10
    c.data.memory_curriculum = ((0, 416), (5_800, None))   # None: data.memory_tokens
    c.data.batch_curriculum = ((0, 128), (5_800, None))    # None: batch_size
    # Router warm-up (routing loss only) on 1-fact documents for 150 steps: from scratch
    # on 6-fact documents the router stayed at chance (cal24), on 1-fact documents it
    # learns in ~150 and carries over (cal26, cal27); then the LM from step 150, the
    # routing loss kept at weight 1 (without it the LM's updates took the router from
    # recall@1 0.97 to 0.12 in ~50 steps: k1noaux, CPU).
    c.optim.warmup_phase_steps = 150
    c.optim.warmup_lm_weight = 0.0   # as smoke: route first, then read (see there)
    c.optim.main_aux_weight = 1.0
    c.optim.warmup_phase_lr = c.optim.main_phase_lr = 2e-3
    c.optim.final_lr = 1e-5
    c.optim.lr_ramp_steps = 20
    c.optim.weight_decay = 0.0
    c.checkpoint.every_steps = 300
    c.checkpoint.max_to_keep = 1
    c.data.memory_tokens = 16_384    # 315 documents of 52 tokens
    # The reader stage's 128 examples a step take ~0.1-0.2 s of Python in one process (0.76
    # ms an 8-document example on a CPU core); on the H200 its steps took ~0.23 s whatever
    # the model's width (WORKSPACE.md, reader variants): data-bound. Eight workers.
    c.data.worker_count = 8
    c.data.kv = _reading_kv()
    c.data.kv.answer_with_key = True   # `<end-of-retrieval> k k k k v v <eos>`
    # One alphabet per id position: every run whose ids were learnt used it (H200, session 10).
    c.data.kv.positional_ids = True
    # The drill (above): 2 of each document's 6 facts again at its end, and the document
    # LM loss that makes each restated value a lookup.
    c.data.kv.restate_facts = 2
    c.loss.doc_lm_weight = 0.1
    # Graded facts: 1, 2, 4, then 6 facts a document from steps 0, 500, 1,500, 3,000. The
    # answers' lookup, learnt by 2 of 6 runs with the direct (0, 1), (150, 6) switch, is
    # learnt on 1 fact at once and kept through each stage (H200, sessions 13 and 15).
    c.data.facts_curriculum = ((0, 1), (500, 2), (1_500, 4), (3_000, 6))
    # The routing loss against every document of the batch (1,024 candidates at the reader
    # stage), not the example's 8: the 8-document router then finds the gold document among
    # 408 at recall@1 0.95-0.99 (0.04 without; H200, sessions 14 and 15).
    c.loss.aux_batch_negatives = True
    # Routing loss on the smooth max (c.loss.aux_softmax; WORKSPACE.md cal33-cal38, CPU,
    # 32 documents, one seed): from scratch on 6-fact documents it stays at chance like
    # the hard max (τ 0.03-0.3), but with the 1-fact stage first it learnt faster (1 fact:
    # recall@1 0.82 vs 0.58 over steps 61-120) and after 100 six-fact steps routed held-out
    # 6-fact questions at recall@1 0.27 / 0.23, recall@5 0.63 (hard max: 0.13 / 0.08, 0.40).
    c.loss.aux_softmax = 0.1
    c.data.niah = _reading_niah()
    c.data.max_doc_len = 512
    # The answer sample routes with the injected gold document inside its question, so
    # its routing is trivial (the document's own id tokens are in the query) and teaches
    # nothing about finding a key: on the CPU calibration, answer samples routed at
    # recall@1 0.50/0.28 by step 100 while retrieval samples (the key alone, what the
    # engine's first round does) were at chance. Only the retrieval rounds train the
    # router and show in its metrics; the answer is read from the injected text.
    c.data.answer_positives = False
    # One active length: both interleave samples share every batch (the active part
    # is < 0.5% of a 16K-token sample, so the padding costs nothing), so every
    # logged step has retrieval samples in its router metrics.
    c.data.active_buckets = 1
    c.eval.memory_multipliers = (1, 4, 16)
    c.eval.max_new_tokens = 10   # the answer round is 8: <end-of-retrieval>, key, value, <eos>
  elif variant == "smoke":
    c.model = _model("tiny", vocab_size=0, hidden_size=64, intermediate_size=128,
                     num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                     pooling_chunk_size=2, top_k=1, dtype="float32")
    c.num_steps = 1_500
    c.batch_size = 32
    c.log_every_steps = 50
    c.optim.warmup_phase_steps = 300
    # Router warm-up on L_aux alone: an LM loss taken while routing is still random
    # teaches the tiny reader to ignore its memory, and it never learns to generate
    # document ids afterwards (measured: id loss stays at chance with 0.1·L_LM).
    c.optim.warmup_lm_weight = 0.0
    c.optim.warmup_phase_lr = 3e-3
    c.optim.main_phase_lr = 3e-3
    c.optim.final_lr = 1e-4
    c.optim.lr_ramp_steps = 50
    c.optim.weight_decay = 0.0
    c.checkpoint.every_steps = 500
    c.checkpoint.max_to_keep = 2
    c.data.num_docs = 32
    c.data.memory_tokens = 0
    c.data.memory_curriculum = ()
    c.data.kv = _single_fact_kv(bracket_ids=False)
    c.data.max_doc_len = 512
    c.eval.num_examples = 64
    c.eval.batch_size = 16
    c.eval.memory_multipliers = (1, 4, 16, 64, 256)
    c.eval.max_new_tokens = 8
  return c
