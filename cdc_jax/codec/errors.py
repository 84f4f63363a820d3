"""The codec's user-facing error, and the message of a header that
names another model family."""

from cdc_jax.errors import UserError


class CodecError(UserError, ValueError):
  """A user-facing codec error; the message names the file and problem."""


def check_family(found: int, family: str, ids: dict, streams: int) -> None:
  """A file's header must name ``family`` (``ids``: name -> id) and hold
  one stream; the message names what it holds instead."""
  if found != ids[family]:
    raise CodecError(
      f"the file's header names model family id {found}, this model is "
      f"{family} ({ids[family]})"
    )
  if streams != 1:
    raise CodecError(f"the file holds {streams} streams, not 1")
