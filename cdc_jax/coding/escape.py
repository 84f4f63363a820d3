"""Escape codes: any int32 value, for symbols outside a table's range.

The escape bin of a table is followed (after all in-range symbols of a
call) by: the bit length of the zigzagged value (0..32) with a uniform
33-ary model, then the bits below its leading one: whole bytes, MSB first,
with a uniform 256-ary model, then the remaining 1..7 low bits with a
uniform ``2**r``-ary model.
"""

from __future__ import annotations

import math

import constriction
import numpy as np

from cdc_jax.coding.errors import BitstreamError

ESC_MAX_BITS = 32


_UNIFORM_MODELS: dict[int, object] = {}


def _uniform(n: int):
  m = _UNIFORM_MODELS.get(n)
  if m is None:
    m = constriction.stream.model.Categorical(
      np.ones(n, dtype=np.float64), perfect=False
    )
    _UNIFORM_MODELS[n] = m
  return m


def _zigzag(v: np.ndarray) -> np.ndarray:
  v = v.astype(np.int64)
  return ((v << 1) ^ (v >> 63)).astype(np.uint64)


def _unzigzag(u: np.ndarray) -> np.ndarray:
  u = u.astype(np.int64)
  return ((u >> 1) ^ -(u & 1)).astype(np.int32)


def _bit_length(u: np.ndarray) -> np.ndarray:
  # frexp is exact for integers < 2**53; gives 0 for 0.
  return np.frexp(u.astype(np.float64))[1].astype(np.int64)


def _leading_one(nbits: np.ndarray) -> np.ndarray:
  """2**(nbits - 1) as uint64, 0 where nbits == 0."""
  shift = np.maximum(nbits - 1, 0).astype(np.uint64)
  return np.where(nbits > 0, np.uint64(1) << shift, np.uint64(0))


def _escape_layout(nbits: np.ndarray):
  """Per escape: full mantissa bytes and leftover low bits."""
  mant = np.maximum(nbits - 1, 0)
  return mant // 8, mant % 8


def _byte_positions(nfull: np.ndarray, rem: np.ndarray):
  """Owner escape and shift of every full byte, MSB first per escape."""
  owner = np.repeat(np.arange(nfull.size), nfull)
  starts = np.cumsum(nfull) - nfull
  j = np.arange(owner.size) - starts[owner]
  shift = rem[owner] + 8 * (nfull[owner] - 1 - j)
  return owner, shift.astype(np.uint64)


def encode_escapes(enc, values: np.ndarray) -> None:
  if values.size == 0:
    return
  u = _zigzag(values)
  nbits = _bit_length(u)
  enc.encode(nbits.astype(np.int32), _uniform(ESC_MAX_BITS + 1))
  mant = u - _leading_one(nbits)
  nfull, rem = _escape_layout(nbits)
  owner, shift = _byte_positions(nfull, rem)
  if owner.size:
    byte = (mant[owner] >> shift) & np.uint64(255)
    enc.encode(byte.astype(np.int32), _uniform(256))
  for r in range(1, 8):
    sel = rem == r
    if np.any(sel):
      low = mant[sel] & np.uint64((1 << r) - 1)
      enc.encode(low.astype(np.int32), _uniform(1 << r))


def decode_escapes(dec, count: int) -> np.ndarray:
  if count == 0:
    return np.zeros(0, np.int32)
  nbits = np.asarray(
    dec.decode(_uniform(ESC_MAX_BITS + 1), count), dtype=np.int64
  )
  if nbits.min() < 0 or nbits.max() > ESC_MAX_BITS:
    raise BitstreamError("corrupted escape code (bit length out of range)")
  nfull, rem = _escape_layout(nbits)
  mant = np.zeros(count, np.uint64)
  owner, shift = _byte_positions(nfull, rem)
  if owner.size:
    byte = np.asarray(dec.decode(_uniform(256), owner.size), np.uint64)
    np.bitwise_or.at(mant, owner, (byte & np.uint64(255)) << shift)
  for r in range(1, 8):
    sel = rem == r
    k = int(sel.sum())
    if k:
      low = np.asarray(dec.decode(_uniform(1 << r), k), np.uint64)
      mant[sel] |= low & np.uint64((1 << r) - 1)
  return _unzigzag(_leading_one(nbits) | mant)


def escape_bits(values: np.ndarray) -> float:
  """Exact code length in bits of the escape codes of ``values``."""
  if values.size == 0:
    return 0.0
  nbits = _bit_length(_zigzag(values))
  n = values.size * math.log2(ESC_MAX_BITS + 1)
  return n + float(np.maximum(nbits - 1, 0).sum())
