r"""Export a checkpoint for PyTorch or msa_jax.

  python -m msa_jax.export --checkpoint=CKPT --format=hf|msa|msa_jax --out=DIR \
      [--dtype=bfloat16|float32|float16] [--step=N] [--overwrite] [--verify]

CKPT: a training workdir (newest step, or --step), an msa_jax checkpoint, an HF
Qwen3 dir or an MSA-4B dir. ``hf`` loads in ``transformers.Qwen3ForCausalLM``
(no memory); ``msa`` is the MSA-4B layout the authors' engine serves; ``msa_jax``
is an orbax checkpoint. The tokenizer and ``generation_config.json`` come along
when CKPT has them (see ``msa_jax.export.tokenizer_files``).
"""
from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m msa_jax.export", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--checkpoint", required=True,
                      help="training workdir, msa_jax checkpoint, HF Qwen3 or MSA-4B dir")
  parser.add_argument("--format", required=True, help="hf | msa | msa_jax")
  parser.add_argument("--out", required=True, help="output dir (new or empty)")
  parser.add_argument("--dtype", default=None,
                      help="weights dtype: float32 | bfloat16 | float16 (default: the "
                           "checkpoint's own)")
  parser.add_argument("--step", type=int, default=None,
                      help="a training workdir's step (default: the newest)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the checkpoint/config/tokenizer files of a non-empty --out")
  parser.add_argument("--verify", action="store_true",
                      help="compare the written dir with the checkpoint: memory forward "
                           "(msa, msa_jax), transformers logits (hf), tokenizer round trip")
  parser.add_argument("--max_shard_size", default="5GB",
                      help="safetensors shard size for hf/msa (default 5GB)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from msa_jax.export.errors import CheckpointError
  from msa_jax.export.export_dir import check_format, export
  t0 = time.perf_counter()
  try:
    check_format(args.format)     # before the (slow) imports and the checkpoint read
    print(f"reading {args.checkpoint} ...", flush=True)
    result = export(args.checkpoint, args.format, args.out, dtype=args.dtype,
                    overwrite=args.overwrite, step=args.step,
                    max_shard_size=args.max_shard_size, verify=args.verify)
  except (CheckpointError, ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if result.removed:
    print(f"replaced {len(result.removed)} old export file(s): "
          + ", ".join(p.rsplit("/", 1)[-1] for p in result.removed))
  print(f"wrote {result.format} checkpoint to {result.out_dir} in "
        f"{time.perf_counter() - t0:.1f}s: {', '.join(result.files)}")
  print(f"tokenizer: {result.tokenizer}")
  for name, value in result.checks.items():
    print(f"verify: {name} = {value}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
