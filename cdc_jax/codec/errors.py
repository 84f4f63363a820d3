"""The codec's user-facing error."""

from cdc_jax.errors import UserError


class CodecError(UserError, ValueError):
  """A user-facing codec error; the message names the file and problem."""
