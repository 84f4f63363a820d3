"""The error of the coding layer."""


class BitstreamError(ValueError):
  """A file or a range-coded stream is malformed, truncated or corrupted."""
