"""What the command-line entry points (``msa_jax.train``, ``msa_jax.evaluate``) share: a
failure ends with its cause as the last lines, and outputs are checked writable first."""
from __future__ import annotations

import os
import sys
import tempfile
import traceback


def known_errors() -> tuple[type, ...]:
  """Errors whose message names the cause and the fix: printed without a traceback."""
  from msa_jax.checkpointing import CheckpointRestoreError
  from msa_jax.export.errors import CheckpointError
  from msa_jax.trainer import NonFiniteLossError
  return (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
          CheckpointRestoreError, CheckpointError, NonFiniteLossError)


def exit_with_error(e: BaseException, name: str, show_traceback: bool = False) -> None:
  """Prints ``e``'s message as the last lines and exits 1 at once.

  ``os._exit`` skips the interpreter teardown, where orbax's abandoned asynchronous
  reads print hundreds of unrelated 'Event loop is closed' / 'sys.meta_path is None'
  lines after the real error. Unknown errors keep their traceback (above the message).
  """
  if show_traceback or not isinstance(e, known_errors()):
    traceback.print_exception(e)
  sys.stdout.flush()
  print(f"\n{name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
  os._exit(1)


def check_writable(directory: str, outputs: str) -> None:
  """Raises ``PermissionError`` naming ``directory`` when a file cannot be created there
  (checked before hours of work, not after)."""
  try:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_check."):
      pass
  except OSError as e:
    raise PermissionError(f"cannot write {outputs} to {directory} ({e.strerror or e}); make it "
                          "writable or copy the run to a writable directory first") from None
