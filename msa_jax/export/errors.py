"""The one exception type of checkpoint conversion."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or written; the message names the file or tensor."""
