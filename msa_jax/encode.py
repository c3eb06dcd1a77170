r"""Stage 1 of inference: encode a corpus once into an on-disk memory bank.

  python -m msa_jax.encode --checkpoint=CKPT --corpus=CORPUS.jsonl --bank=BANK

CKPT: a training workdir or anything ``msa_jax.from_pretrained`` reads. Rerun the same
command to resume an interrupted encode. See ``msa_jax.inference.encode``.
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


def _main(argv):
  from msa_jax.inference.encode import main
  main(argv)


if __name__ == "__main__":
  app.run(_main)
