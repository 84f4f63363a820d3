"""The converter's error type; its messages list keys with ``listing``
(shared with the weight loaders of ``cdc_jax.models``)."""

from __future__ import annotations

from cdc_jax.errors import UserError
from cdc_jax.models.weights import listing

__all__ = ["ConversionError", "listing"]


class ConversionError(UserError, ValueError):
  """The input is not a (consistent) CDC checkpoint; the message says why."""
