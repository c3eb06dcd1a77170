r"""Stage 1 of inference: encode a corpus once into an on-disk memory bank.

  python -m msa_jax.encode --checkpoint=CKPT --corpus=CORPUS.jsonl --bank=BANK

CKPT: a training workdir or anything ``msa_jax.from_pretrained`` reads. Rerun the same
command to resume an interrupted encode. ``--kr_dtype=float8_e4m3fn --kv_dtype=int8``
quantises the bank (recorded in its manifest; the engine reads it as it is). See ``msa_jax.inference.encode``.
"""
from absl import app, flags

flags.DEFINE_string("checkpoint", None, "Training workdir, HF Qwen3, MSA-4B or msa_jax dir.",
                    required=True)
flags.DEFINE_string("corpus", None, 'JSONL rows {"id", "text"} or {"id", "tokens"}.',
                    required=True)
flags.DEFINE_string("bank", None, "Output bank directory (created, or resumed).", required=True)
flags.DEFINE_string("tokenizer_dir", "", "Local HF tokenizer (default: the checkpoint's).")
flags.DEFINE_integer("window_tokens", 1 << 20, "Tokens encoded and committed per window.")
flags.DEFINE_integer("batch_tokens", 16_384, "Padded tokens per encoder batch.")
flags.DEFINE_integer("width_multiple", 0,
                     "Pad each document to a multiple of this many tokens (one batch shape per "
                     "distinct padded length: for corpora of few lengths); 0: to chunk-size "
                     "levels P·{1, 2, 3, 4, 6, 8, ...} (at most 1/3 padding, few shapes).")
flags.DEFINE_enum("kr_dtype", "", ["", "float32", "bfloat16", "float16", "float8_e4m3fn", "int8"],
                  "Precision of the pooled router keys K̄R ('': the model dtype; float8_e4m3fn "
                  "and int8 store one float32 scale per chunk).")
flags.DEFINE_enum("kv_dtype", "", ["", "float32", "bfloat16", "float16", "int8"],
                  "Precision of the pooled K̄/V̄ ('': the model dtype; int8 stores one float32 "
                  "scale per chunk and kv head, dequantised on the device after the fetch).")


def _main(argv):
  from msa_jax.inference.encode import main
  main(argv)


if __name__ == "__main__":
  app.run(_main)
