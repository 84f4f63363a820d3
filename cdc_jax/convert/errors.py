"""The converter's error type and the key listings its messages show."""

from __future__ import annotations

from collections.abc import Iterable

from cdc_jax.errors import UserError

MAX_LISTED = 8


class ConversionError(UserError, ValueError):
  """The input is not a (consistent) CDC checkpoint; the message says why."""


def listing(keys: Iterable[str], limit: int = MAX_LISTED) -> str:
  """``[a, b, ... (n more)]``: at most ``limit`` keys of a long list."""
  keys = list(keys)
  shown = ", ".join(keys[:limit])
  if len(keys) > limit:
    shown += f", ... ({len(keys) - limit} more)"
  return f"[{shown}]"
