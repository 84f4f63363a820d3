"""The codec's user-facing error."""


class CodecError(ValueError):
  """A user-facing codec error; the message names the file and problem."""
