"""The ``.cdcj`` file container: header, stream table, CRC32.

Numpy only; see docs/bitstream.md for the byte layout. ``unpack`` checks,
in order, the magic, the format version, the length, the CRC32, then the
stream table and the header fields, so a damaged file fails with a
specific ``BitstreamError`` before anything is decoded.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from cdc_jax.coding.errors import BitstreamError
from cdc_jax.coding.range_coder import words_to_bytes

MAGIC = b"CDCJ"
FORMAT_VERSION = 1
FAMILY_EPS = 0
FAMILY_X = 1
SAMPLER_DDIM = 0  # DDIM, eta = 0

_PREFIX = struct.Struct("<4sB")  # magic, version
# total file size, fingerprint, height, width, family, steps, gamma, seed,
# sampler, flags, number of streams
_FIELDS = struct.Struct("<I16sIIBHfQBBB")
_FIXED = _PREFIX.size + _FIELDS.size
_CRC = struct.Struct("<I")
_MAX_STREAMS = 255


@dataclasses.dataclass(frozen=True)
class Header:
  """Per-image metadata stored in front of the range-coded streams.

  gamma is stored as float32; ``flags`` is reserved (0 in format v1).
  """

  fingerprint: bytes
  height: int
  width: int
  family: int = FAMILY_EPS
  steps: int = 1
  gamma: float = 0.0
  seed: int = 0
  sampler: int = SAMPLER_DDIM
  flags: int = 0

  def __post_init__(self):
    if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != 16:
      raise ValueError("fingerprint must be 16 bytes")
    for name, lo, hi in (
      ("height", 1, 2**32 - 1),
      ("width", 1, 2**32 - 1),
      ("steps", 0, 2**16 - 1),
      ("seed", 0, 2**64 - 1),
      ("flags", 0, 255),
    ):
      v = getattr(self, name)
      if not isinstance(v, int | np.integer) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
      object.__setattr__(self, name, int(v))
    if self.family not in (FAMILY_EPS, FAMILY_X):
      raise ValueError(f"unknown family id {self.family!r} (0 eps, 1 x)")
    if self.sampler != SAMPLER_DDIM:
      raise ValueError(f"unknown sampler id {self.sampler!r} (0 ddim)")
    object.__setattr__(self, "family", int(self.family))
    object.__setattr__(self, "sampler", int(self.sampler))
    g = float(self.gamma)
    if not math.isfinite(g):
      raise ValueError("gamma must be finite")
    # Keep exactly what the file can hold.
    if abs(g) > float(np.finfo(np.float32).max):
      raise ValueError("gamma does not fit a float32")
    object.__setattr__(self, "gamma", float(np.float32(g)))


def pack(header: Header, streams: Sequence) -> bytes:
  """Serializes the header and streams (bytes or np.uint32 words)."""
  if not isinstance(header, Header):
    header = Header(**dict(header))
  blobs = [
    words_to_bytes(s) if isinstance(s, np.ndarray) else bytes(s)
    for s in streams
  ]
  if len(blobs) > _MAX_STREAMS:
    raise ValueError(f"at most {_MAX_STREAMS} streams per file")
  if any(len(b) > 2**32 - 1 for b in blobs):
    raise ValueError("a stream is longer than 4 GiB")
  total = _FIXED + 4 * len(blobs) + sum(map(len, blobs)) + _CRC.size
  if total > 2**32 - 1:
    raise ValueError("file would exceed 4 GiB")
  body = b"".join(
    [
      _PREFIX.pack(MAGIC, FORMAT_VERSION),
      _FIELDS.pack(
        total,
        header.fingerprint,
        header.height,
        header.width,
        header.family,
        header.steps,
        header.gamma,
        header.seed,
        header.sampler,
        header.flags,
        len(blobs),
      ),
      struct.pack(f"<{len(blobs)}I", *map(len, blobs)),
      *blobs,
    ]
  )
  return body + _CRC.pack(zlib.crc32(body))


def unpack(data) -> tuple[Header, list[bytes]]:
  """Parses a file made by ``pack``; raises BitstreamError if malformed.

  Checks, in order: magic, format version, file length, CRC32, then the
  stream table and the header fields.
  """
  try:
    data = memoryview(data).tobytes()  # bytes-like only (never bytes(int))
  except TypeError as e:
    raise BitstreamError(f"expected bytes, got {type(data).__name__}") from e
  fields = _check_envelope(data)
  streams = _split_streams(data, fields[-1])
  try:
    header = Header(*fields[1:-1])
  except ValueError as e:
    raise BitstreamError(f"invalid header: {e}") from e
  return header, streams


def _check_envelope(data: bytes) -> tuple:
  """Magic, version, length and CRC; returns the fixed fields."""
  got = len(data)
  if data[: len(MAGIC)] != MAGIC[:got]:
    raise BitstreamError("not a cdc_jax file (bad magic bytes)")
  if got < _PREFIX.size:
    raise BitstreamError(
      f"file is truncated: expected at least {_FIXED + _CRC.size} bytes, "
      f"got {got}"
    )
  _, version = _PREFIX.unpack_from(data)
  if version > FORMAT_VERSION:
    raise BitstreamError(
      f"made by a newer cdc_jax (format v{version}); this version reads "
      f"v{FORMAT_VERSION}"
    )
  if version < 1:
    raise BitstreamError(f"unknown format version {version}")
  if got < _FIXED + _CRC.size:
    raise BitstreamError(
      f"file is truncated: expected at least {_FIXED + _CRC.size} bytes, "
      f"got {got}"
    )
  fields = _FIELDS.unpack_from(data, _PREFIX.size)
  total = fields[0]
  if got < total:
    raise BitstreamError(
      f"file is truncated: expected {total} bytes, got {got}"
    )
  if got > total:
    raise BitstreamError(f"trailing garbage: expected {total} bytes, got {got}")
  (crc,) = _CRC.unpack_from(data, got - _CRC.size)
  if zlib.crc32(data[: got - _CRC.size]) != crc:
    raise BitstreamError("checksum mismatch: the file is corrupted")
  return fields


def _split_streams(data: bytes, n_streams: int) -> list[bytes]:
  """The streams after the length table (lengths must add up)."""
  got = len(data)
  table_end = _FIXED + 4 * n_streams
  if table_end + _CRC.size > got:
    raise BitstreamError(
      f"stream lengths inconsistent: {n_streams} streams do not fit a "
      f"{got}-byte file"
    )
  lengths = struct.unpack_from(f"<{n_streams}I", data, _FIXED)
  if table_end + sum(lengths) + _CRC.size != got:
    raise BitstreamError(
      f"stream lengths inconsistent: they sum to {sum(lengths)} bytes, "
      f"the file holds {got - table_end - _CRC.size}"
    )
  streams, pos = [], table_end
  for n in lengths:
    streams.append(data[pos : pos + n])
    pos += n
  return streams
