"""The error of the coding layer."""

from cdc_jax.errors import UserError


class BitstreamError(UserError, ValueError):
  """A file or a range-coded stream is malformed, truncated or corrupted."""
