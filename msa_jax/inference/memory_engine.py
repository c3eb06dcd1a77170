"""``MemoryEngine``: a checkpoint and an on-disk bank, ready to answer questions.

    from msa_jax.inference import MemoryEngine
    engine = MemoryEngine.load("runs/smoke", "banks/smoke_4m")          # mesh: all devices
    rows = engine.generate([{"question": "k12 k7 k99"}], max_new_tokens=8)

The bank must come from the same model (its fingerprint is checked); ``K̄R`` is sharded over
the mesh's ``memory`` axis; ``K̄``/``V̄`` sit on the devices or in host memory
(``kv_placement``). With ``routing="auto"`` K̄R of every precision (bf16, fp8, int8) is
routed through the Pallas block top-k kernel on a GPU, and through the tiled XLA scan
elsewhere (:func:`default_routing`).
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from msa_jax.data.tokenizer import SpecialTokens
from msa_jax.inference import interleave
from msa_jax.inference.bank import model_fingerprint, open_bank
from msa_jax.inference.checkpoint import load_model, load_tokenizer
from msa_jax.inference.engine import Engine
from msa_jax.inference.memory import DeviceBank


def default_routing(k: int, features: int, kr_dtype: str = "bfloat16") -> str:
  """``pallas`` on a GPU when the key width ``F = Hkv·D`` fits the kernels' tiles (a
  multiple of 64), else ``xla``; for every K̄R precision and any k (the engine's unfused
  route takes any k; the fused kernel, ``route_fused=True``, falls back to it past its
  ``LIST_SLOTS``).

  bf16, fp8 and int8 K̄R pass the kernels' compiled tests on the H200 and route a
  100M-token bank in 0.6-1.1 ms a layer there (BENCHMARKS.md), far below the XLA scan."""
  from pallas_kernels import _platform
  del k, kr_dtype   # every precision: the kernels read bf16 keys and fp8 / int8 codes
  fits = _platform.on_gpu() and features % 64 == 0
  return "pallas" if fits else "xla"


class MemoryEngine:
  """Answers question rows from one bank with Memory Interleave (see module doc)."""

  def __init__(self, model, params, device_bank: DeviceBank, tokenizer, specials: SpecialTokens,
               batch_size: int = 8, max_rounds: int = 3, position_config=None,
               question_at: int = 0):
    self.model, self.params, self.device_bank = model, params, device_bank
    self.question_at = question_at   # > 0: global RoPE numbers questions as if after so many
    # The config whose top_k fixes the question's first position T + k (SPEC §2): the
    # trained model's, also when top_k is changed at inference.
    self.position_config = position_config or model.config
    self.tokenizer, self.specials = tokenizer, specials
    self.batch_size, self.max_rounds = batch_size, max_rounds
    self.engine = Engine(model, params, "bank", device_bank.settings)

  @classmethod
  def load(cls, checkpoint: str, bank_path: str, *, mesh=None, kv_placement: str = "device",
           routing: str = "auto", tokenizer_dir: str = "", verify: bool = False,
           batch_size: int = 8, max_rounds: int = 3, allow_synthetic: bool = False,
           top_k: int = 0, question_at: int = 0, score_dtype: str = "float32",
           log=print) -> "MemoryEngine":
    """Loads the model, checks and places the bank (see module doc).

    ``allow_synthetic`` accepts a synthetic bank (``benchmarks.synth_bank``, random keys: for
    timing only) in place of one this model encoded. ``top_k`` > 0 routes each question to
    that many documents instead of the model's trained ``top_k`` (an inference-time
    setting: the bank, encoded by the trained model, is the same; the question's positions
    keep the trained offset ``T + k``, so its first round's routing, and hence the top
    documents it shares with the trained k, do not change). ``question_at`` > 0 (global RoPE
    only; a probe) numbers each question's first token ``prefix + question_at`` instead of
    ``prefix + bank tokens``. ``score_dtype``: the XLA route's score numerics
    (``DeviceBank.load``; ``kernel`` / ``kernel_fp8q1`` score as the GPU kernels do).
    """
    if question_at < 0:
      raise ValueError(f"question_at={question_at}: pass a token position >= 1, or 0 for "
                       "after the bank")
    if top_k < 0:
      raise ValueError(f"top_k={top_k}: pass a number of documents >= 1, or 0 for the "
                       "model's own top_k")
    model, params = load_model(checkpoint)
    bank = open_bank(bank_path, model_fingerprint(model.config, params), verify=verify,
                     allow_synthetic=allow_synthetic)
    trained = model.config
    if top_k and top_k != trained.top_k:
      log(f"routing to top_k={top_k} documents (the model was trained with {trained.top_k}; "
          f"the question's positions keep the trained offset)")
      model = type(model)(trained.replace(top_k=top_k))
    try:
      tokenizer = load_tokenizer(checkpoint, tokenizer_dir)
    except ValueError:
      tokenizer = None    # token rows still work; specials come from the bank
    if tokenizer is not None:
      specials = tokenizer.specials
    elif bank.manifest["tokenizer"].get("specials"):
      specials = SpecialTokens(**bank.manifest["tokenizer"]["specials"])
    else:
      raise ValueError(f"no tokenizer for {checkpoint} and none recorded in the bank; pass "
                       "tokenizer_dir")
    if routing == "auto":
      cfg = model.config
      routing = default_routing(cfg.top_k, cfg.num_kv_heads * cfg.head_dim, bank.kr_dtype)
    device_bank = DeviceBank.load(bank, mesh, kv_placement=kv_placement, routing_impl=routing,
                                  score_dtype=score_dtype, log=log)
    # The weights are replicated over the bank's mesh (the jitted steps take both).
    replicated = NamedSharding(device_bank.settings.mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    return cls(model, params, device_bank, tokenizer, specials, batch_size, max_rounds,
               position_config=trained, question_at=question_at)

  def _question_tokens(self, row: dict, n: int) -> list[int]:
    if "question_tokens" in row:
      tokens = row["question_tokens"]
      if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
        raise ValueError(f"question row {n}: 'question_tokens' must be a non-empty list of ints")
      return tokens
    if "question" in row:
      if self.tokenizer is None:
        raise ValueError(f"question row {n}: a text question needs a tokenizer "
                         "(pass tokenizer_dir) or give 'question_tokens'")
      tokens = self.tokenizer.encode(row["question"])
      if not tokens:
        raise ValueError(f"question row {n}: the question is empty")
      return tokens
    raise ValueError(f"question row {n}: needs 'question' (text) or 'question_tokens'")

  def generate(self, rows: Sequence[dict], *, max_new_tokens: int = 16, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, oracle: bool = False,
               progress=None) -> list[dict]:
    """Answers each row; returns the rows with ``answer``, ``answer_tokens``, ``rounds``,
    ``selected_doc_ids`` (per router layer, first round), ``timings_ms`` (and, for a
    question that failed, ``failure`` with the failed round's ``failed_tokens`` and their
    text ``failed_text``).

    ``oracle=True`` forces each round's gold documents (the row's ``rounds``, or its
    ``doc_id``) instead of the router's choice.
    """
    questions = [self._question_tokens(r, n) for n, r in enumerate(rows, start=1)]
    memory = interleave.BankBatch(self.device_bank, self.batch_size, self.position_config,
                                  self.question_at)
    out = []
    for s in range(0, len(rows), self.batch_size):
      chunk = list(rows[s:s + self.batch_size])
      gold = [_gold_rounds(r) for r in chunk] if oracle else None
      t0 = time.perf_counter()
      gens = interleave.generate(
          self.engine, memory, questions[s:s + self.batch_size], self.specials,
          max_rounds=self.max_rounds, max_new_tokens=max_new_tokens, temperature=temperature,
          top_p=top_p, seed=seed + s, oracle_rounds=gold)
      batch_ms = 1e3 * (time.perf_counter() - t0)
      for row, g in zip(chunk, gens):
        res = dict(row)
        res["answer_tokens"] = g.answer
        res["answer"] = (self.tokenizer.decode(g.answer) if g.answer is not None
                         and self.tokenizer is not None else None)
        res["rounds"] = g.rounds
        res["selected_doc_ids"] = g.first_selected
        res["ranked_doc_ids"] = g.first_ranked
        res["timings_ms"] = {**{k: round(v, 3) for k, v in g.timings_ms.items()},
                             "batch": round(batch_ms, 3)}
        if g.failure:
          res["failure"] = g.failure
          if g.failed_tokens is not None:
            res["failed_tokens"] = g.failed_tokens
            res["failed_text"] = (self.tokenizer.decode(g.failed_tokens)
                                  if self.tokenizer is not None else None)
        out.append(res)
      if progress is not None:
        progress(len(out), len(rows))
    return out


def _gold_rounds(row: dict) -> list[list[str]]:
  if row.get("rounds_gold"):
    return [list(r) for r in row["rounds_gold"]]
  if row.get("rounds"):
    return [list(r) for r in row["rounds"]]
  if "doc_id" in row:
    return [[str(row["doc_id"])]]
  raise ValueError("oracle routing needs 'rounds' or 'doc_id' in every question row")
