"""The ``.cdcj`` file container: header, stream table, CRC32.

Numpy only; see docs/bitstream.md for the byte layout. ``unpack`` checks,
in order, the magic, the format version, the length, the CRC32, then the
stream table and the header fields, so a damaged file fails with a
specific ``BitstreamError`` before anything is decoded.

Three versions, one header layout: v1 (whole-image decoding), v2 (v1 plus
a tile layout: tile height, width and overlap in pixels after the v1
fields) and v3, the current one: v2's fields (the tile layout all 0 for a
whole-image decode), with the y tables chosen by the exact integer scale
path (``coding.scale_index``) and a fingerprint of the bitstream (what
entropy decoding depends on) instead of the whole model. v1 and v2 files
stay readable; ``Header.version`` says which rules the codec decodes a
file by, and ``pack`` writes the version the header names.
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
FORMAT_VERSION = 3  # the newest this module reads, and what it writes
LEGACY_VERSIONS = (1, 2)  # float scale indexes, whole-model fingerprint
FAMILY_EPS = 0
FAMILY_X = 1
SAMPLER_DDIM = 0  # DDIM, eta = 0

_PREFIX = struct.Struct("<4sB")  # magic, version
# total file size, fingerprint, height, width, family, steps, gamma, seed,
# sampler, flags, number of streams
_FIELDS = struct.Struct("<I16sIIBHfQBBB")
_FIXED = _PREFIX.size + _FIELDS.size
_TILE = struct.Struct("<HHH")  # v2: tile height, width, overlap (pixels)
_CRC = struct.Struct("<I")
_MAX_STREAMS = 255


@dataclasses.dataclass(frozen=True)
class Header:
  """Per-image metadata stored in front of the range-coded streams.

  gamma is stored as float32; ``flags`` is reserved (0, ignored). A tile
  layout (``tile_height`` x ``tile_width`` pixels, tiles overlapping by at
  least ``tile_overlap``; all 0 for a whole-image decode). Which layouts a
  model can decode is the codec's business
  (``cdc_jax.codec.limits.check_tile``); here they only have to fit u16.
  ``version``: the format version (a v1 file has no tile layout, a v2
  file has one, a v3 file either).
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
  tile_height: int = 0
  tile_width: int = 0
  tile_overlap: int = 0
  version: int = FORMAT_VERSION

  def __post_init__(self):
    if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != 16:
      raise ValueError("fingerprint must be 16 bytes")
    for name, lo, hi in (
      ("height", 1, 2**32 - 1),
      ("width", 1, 2**32 - 1),
      ("steps", 0, 2**16 - 1),
      ("seed", 0, 2**64 - 1),
      ("flags", 0, 255),
      ("tile_height", 0, 2**16 - 1),
      ("tile_width", 0, 2**16 - 1),
      ("tile_overlap", 0, 2**16 - 1),
    ):
      v = getattr(self, name)
      if not isinstance(v, int | np.integer) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
      object.__setattr__(self, name, int(v))
    if self.family not in (FAMILY_EPS, FAMILY_X):
      raise ValueError(f"unknown family id {self.family!r} (0 eps, 1 x)")
    if self.sampler != SAMPLER_DDIM:
      raise ValueError(f"unknown sampler id {self.sampler!r} (0 ddim)")
    if (self.tile_height == 0) != (self.tile_width == 0) or (
      self.tile_overlap and not self.tile_height
    ):
      raise ValueError(
        "a tile layout needs a tile height and width (or all three 0), got "
        f"{self.tile_height}x{self.tile_width}, overlap {self.tile_overlap}"
      )
    if self.version not in (*LEGACY_VERSIONS, FORMAT_VERSION):
      raise ValueError(f"unknown format version {self.version!r}")
    if self.version == 1 and self.tile_height:
      raise ValueError("a v1 file has no tile layout")
    if self.version == 2 and not self.tile_height:
      raise ValueError("a v2 file has a tile layout")
    object.__setattr__(self, "version", int(self.version))
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
  """Serializes the header and streams (bytes or np.uint32 words) in the
  format version ``header.version``."""
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
  version = header.version
  fixed = _fixed_size(version)
  total = fixed + 4 * len(blobs) + sum(map(len, blobs)) + _CRC.size
  if total > 2**32 - 1:
    raise ValueError("file would exceed 4 GiB")
  tile = (header.tile_height, header.tile_width, header.tile_overlap)
  body = b"".join(
    [
      _PREFIX.pack(MAGIC, version),
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
      _TILE.pack(*tile) if version >= 2 else b"",
      struct.pack(f"<{len(blobs)}I", *map(len, blobs)),
      *blobs,
    ]
  )
  return body + _CRC.pack(zlib.crc32(body))


def _fixed_size(version: int) -> int:
  """Bytes before the stream table in a file of ``version``."""
  return _FIXED + (_TILE.size if version >= 2 else 0)


def unpack(data) -> tuple[Header, list[bytes]]:
  """Parses a file made by ``pack``; raises BitstreamError if malformed.

  Checks, in order: magic, format version, file length, CRC32, then the
  stream table and the header fields.
  """
  try:
    data = memoryview(data).tobytes()  # bytes-like only (never bytes(int))
  except TypeError as e:
    raise BitstreamError(f"expected bytes, got {type(data).__name__}") from e
  version, fields = _check_envelope(data)
  fixed = _fixed_size(version)
  streams = _split_streams(data, fields[-1], fixed)
  tile = _TILE.unpack_from(data, _FIXED) if version >= 2 else (0, 0, 0)
  if version == 2 and tile[0] == 0:
    raise BitstreamError("invalid header: a v2 file without a tile layout")
  try:
    header = Header(*fields[1:-1], *tile, version=version)
  except ValueError as e:
    raise BitstreamError(f"invalid header: {e}") from e
  return header, streams


def _check_envelope(data: bytes) -> tuple[int, tuple]:
  """Magic, version, length and CRC; returns the version and the fields
  the versions share."""
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
      f"v1 to v{FORMAT_VERSION}"
    )
  if version < 1:
    raise BitstreamError(f"unknown format version {version}")
  least = _fixed_size(version) + _CRC.size
  if got < least:
    raise BitstreamError(
      f"file is truncated: expected at least {least} bytes, got {got}"
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
  return version, fields


def _split_streams(data: bytes, n_streams: int, fixed: int) -> list[bytes]:
  """The streams after the length table (lengths must add up)."""
  got = len(data)
  table_end = fixed + 4 * n_streams
  if table_end + _CRC.size > got:
    raise BitstreamError(
      f"stream lengths inconsistent: {n_streams} streams do not fit a "
      f"{got}-byte file"
    )
  lengths = struct.unpack_from(f"<{n_streams}I", data, fixed)
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
