r"""Stages 2-3 of inference: answer questions from an encoded memory bank.

  python -m msa_jax.generate --checkpoint=CKPT --bank=BANK --questions=QUESTIONS.jsonl \
      --out=ANSWERS.jsonl [--max_new_tokens=16 --temperature=0 --top_p=1 --seed=0]

Question rows: ``{"question": str}`` or ``{"question_tokens": [int]}``; other fields are
copied through. Answer rows add ``answer``, ``answer_tokens``, ``rounds`` (documents named
per Memory Interleave round), ``selected_doc_ids`` (per router layer, first round),
``timings_ms`` (prefill = routing + context assembly, decode, per question) and
``failure`` when there is no answer. See ``msa_jax.inference``.
"""
import json
import os
import time

from absl import app, flags


def _define_flags() -> None:
  # Defined when run as a script only: msa_jax.evaluate imports read_questions from here,
  # and absl refuses a flag defined twice ('bank', 'questions', ... are its flags too).
  flags.DEFINE_string("checkpoint", None, "Training workdir, HF Qwen3, MSA-4B or msa_jax dir.",
                      required=True)
  flags.DEFINE_string("bank", None, "A bank written by python -m msa_jax.encode.", required=True)
  flags.DEFINE_string("questions", None, "JSONL question rows.", required=True)
  flags.DEFINE_string("out", None, "Where to write the answer rows (JSONL).", required=True)
  flags.DEFINE_integer("max_new_tokens", 16, "Tokens generated per round.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("batch_size", 8, "Questions decoded together.")
  flags.DEFINE_integer("max_rounds", 3, "Memory Interleave retrieval rounds at most.")
  flags.DEFINE_enum("kv_placement", "device", ["device", "host"], "Where K̄/V̄ live.")
  flags.DEFINE_enum("routing", "auto", ["auto", "pallas", "xla"], "Routing implementation.")
  flags.DEFINE_string("tokenizer_dir", "", "Local HF tokenizer (default: the checkpoint's).")
  flags.DEFINE_bool("oracle", False, "Force the gold documents (rows' rounds / doc_id).")
  flags.DEFINE_integer("top_k", 0, "Documents each question routes to (0: the model's "
                       "trained top_k).")


def read_questions(path: str) -> list[dict]:
  """Question rows; a row that is not a JSON object is an error naming ``file:line``."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object")
      rows.append(row)
  if not rows:
    raise ValueError(f"{path} has no question rows")
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  from msa_jax.inference import MemoryEngine
  rows = read_questions(f.questions)
  from msa_jax.cli import check_writable
  check_writable(os.path.dirname(os.path.abspath(f.out)), os.path.basename(f.out))
  engine = MemoryEngine.load(f.checkpoint, f.bank, kv_placement=f.kv_placement,
                             routing=f.routing, tokenizer_dir=f.tokenizer_dir,
                             batch_size=f.batch_size, max_rounds=f.max_rounds, top_k=f.top_k)
  t0 = time.perf_counter()

  def progress(done, total):
    rate = done / max(time.perf_counter() - t0, 1e-9)
    print(f"generate: {done}/{total} questions | {rate:.1f} q/s | "
          f"ETA {(total - done) / max(rate, 1e-9):.0f}s", flush=True)

  answers = engine.generate(rows, max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                            top_p=f.top_p, seed=f.seed, oracle=f.oracle, progress=progress)
  with open(f.out, "w") as out:
    for row in answers:
      out.write(json.dumps(row) + "\n")
  print(f"wrote {len(answers)} answers to {f.out}", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
