"""Host-side entropy coding and the file container of cdc_jax.

Numpy + constriction only (no jax): the model exports its probability
tables once, and this module turns integer symbols into range-coded words
and words into a ``.cdcj`` file.

* Integer probability tables (``quantize_pmf``, ``TableSet``,
  ``gaussian_tables``, ``factorized_tables``): the stored integers are the
  contract between encoder and decoder; the float pmf handed to constriction
  is ``counts / 2**precision_bits``, computed identically on both sides.
* Symbol coding (``Encoder``, ``Decoder``, ``encode_symbols``,
  ``decode_symbols``, ``encode_streams``, ``decode_streams``): symbols are
  grouped by table, each group coded with one categorical model; any int32
  value is codable through an escape bin followed by an Elias-gamma style
  code.
* File container (``Header``, ``pack``, ``unpack``).

See docs/bitstream.md for the byte layout and the coding order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
import zlib
from collections.abc import Mapping, Sequence

import constriction
import numpy as np
from scipy import special

__all__ = [
  "FAMILY_EPS",
  "FAMILY_X",
  "FORMAT_VERSION",
  "MAGIC",
  "SAMPLER_DDIM",
  "BitstreamError",
  "Decoder",
  "Encoder",
  "Header",
  "TableSet",
  "bytes_to_words",
  "channel_indexes",
  "decode_streams",
  "decode_symbols",
  "encode_streams",
  "encode_symbols",
  "estimate_bits",
  "factorized_tables",
  "gaussian_scale_table",
  "gaussian_tables",
  "pack",
  "quantize_pmf",
  "scale_indexes",
  "unpack",
  "words_to_bytes",
]

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
_MAX_PRECISION = 24  # constriction's range coder resolves 24-bit probs.

# Escape code: bit length of the zigzagged value (0..32) with a uniform
# 33-ary model, then the bits below the leading one: full bytes (MSB first)
# with a uniform 256-ary model, then the remaining 1..7 low bits with a
# uniform 2**r-ary model.
_ESC_MAX_BITS = 32


class BitstreamError(ValueError):
  """A file or a range-coded stream is malformed, truncated or corrupted."""


# --------------------------------------------------------------------------
# Probability tables
# --------------------------------------------------------------------------


def quantize_pmf(pmf, precision_bits: int = 16) -> np.ndarray:
  """Quantizes a pmf over L bins to L + 1 integer counts summing to 2**p.

  The last count is the escape (overflow) bin; it receives the tail mass
  ``1 - sum(pmf)``. Every bin gets at least one count. Counts are
  ``1 + floor(q * (2**p - (L + 1)))`` of the normalized masses ``q`` plus
  the leftover counts, one each, to the bins with the largest fractional
  parts (ties to the lower bin).
  """
  p = np.asarray(pmf, dtype=np.float64)
  if p.ndim != 1 or p.size < 1:
    raise ValueError(f"pmf must be a non-empty 1-D array, got {p.shape}")
  if not np.all(np.isfinite(p)) or np.any(p < 0):
    raise ValueError("pmf must be finite and non-negative")
  _check_precision(precision_bits)
  total = 1 << precision_bits
  n = p.size + 1
  if n > total:
    raise ValueError(
      f"{p.size} bins + escape do not fit {precision_bits}-bit precision"
    )
  inside = math.fsum(p.tolist())
  mass = np.append(p, max(1.0 - inside, 0.0))
  norm = math.fsum(mass.tolist())
  if not norm > 0:
    raise ValueError("pmf has zero total mass")
  free = total - n
  scaled = mass / norm * free
  base = np.floor(scaled)
  counts = base.astype(np.int64) + 1
  left = total - int(counts.sum())
  if left < 0:  # impossible for a normalized mass; kept as a guard
    raise ValueError("pmf quantization overflow")
  if left:
    frac = scaled - base
    # Largest fractional parts first, lower index on ties.
    order = np.lexsort((np.arange(n), -frac))
    counts[order[:left]] += 1
  assert int(counts.sum()) == total and counts.min() >= 1
  return counts.astype(np.int32)


def _check_precision(precision_bits: int) -> None:
  if not isinstance(precision_bits, int | np.integer) or not (
    1 <= precision_bits <= _MAX_PRECISION
  ):
    raise ValueError(
      f"precision_bits must be an int in [1, {_MAX_PRECISION}], "
      f"got {precision_bits!r}"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class TableSet:
  """A set of integer probability tables.

  Attributes:
    counts: int32 [n, max_len + 1]; row t holds ``lengths[t]`` in-range bins
      then the escape bin, zero-padded; each row's first ``lengths[t] + 1``
      entries are >= 1 and sum to ``2**precision_bits``.
    lengths: int32 [n], the number of in-range bins of each table.
    offsets: int32 [n], the symbol value of bin 0 of each table; table t
      covers values ``offsets[t] .. offsets[t] + lengths[t] - 1``.
    precision_bits: the fixed-point precision of the counts.
  """

  counts: np.ndarray
  lengths: np.ndarray
  offsets: np.ndarray
  precision_bits: int = 16
  _models: dict = dataclasses.field(
    init=False, repr=False, compare=False, default_factory=dict
  )

  def __post_init__(self):
    counts = np.array(self.counts, dtype=np.int64, copy=True)
    lengths = np.array(self.lengths, dtype=np.int64, copy=True)
    offsets = np.array(self.offsets, dtype=np.int64, copy=True)
    _check_precision(self.precision_bits)
    if counts.ndim != 2 or lengths.ndim != 1 or offsets.ndim != 1:
      raise ValueError("counts must be 2-D, lengths and offsets 1-D")
    n = counts.shape[0]
    if n < 1 or lengths.shape != (n,) or offsets.shape != (n,):
      raise ValueError(
        f"inconsistent table shapes: counts {counts.shape}, lengths "
        f"{lengths.shape}, offsets {offsets.shape}"
      )
    if lengths.min() < 1 or lengths.max() + 1 > counts.shape[1]:
      raise ValueError("lengths must be in [1, counts.shape[1] - 1]")
    if offsets.min() < _INT32_MIN or (offsets + lengths - 1).max() > _INT32_MAX:
      raise ValueError("table ranges must lie within int32")
    col = np.arange(counts.shape[1])
    used = col[None, :] <= lengths[:, None]
    if np.any(counts[used] < 1) or np.any(counts[~used] != 0):
      raise ValueError("used counts must be >= 1 and the padding 0")
    if np.any(counts.sum(axis=1) != (1 << int(self.precision_bits))):
      raise ValueError(f"each table must sum to 2**{self.precision_bits}")
    for name, value in (
      ("counts", counts),
      ("lengths", lengths),
      ("offsets", offsets),
    ):
      arr = value.astype(np.int32)
      arr.flags.writeable = False
      object.__setattr__(self, name, arr)
    object.__setattr__(self, "precision_bits", int(self.precision_bits))

  @property
  def num_tables(self) -> int:
    return int(self.counts.shape[0])

  def pmf(self, t: int) -> np.ndarray:
    """The float64 pmf (in-range bins + escape) handed to constriction."""
    n = int(self.lengths[t]) + 1
    return self.counts[t, :n].astype(np.float64) / float(
      1 << self.precision_bits
    )

  def model(self, t: int):
    """The (cached) constriction categorical model of table t."""
    m = self._models.get(t)
    if m is None:
      m = constriction.stream.model.Categorical(self.pmf(t), perfect=False)
      self._models[t] = m
    return m

  def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
    """Plain numpy arrays (for ``np.savez``, no pickle needed)."""
    return {
      prefix + "counts": np.array(self.counts),
      prefix + "lengths": np.array(self.lengths),
      prefix + "offsets": np.array(self.offsets),
      prefix + "precision_bits": np.array(self.precision_bits, np.int32),
    }

  @classmethod
  def from_arrays(
    cls, arrays: Mapping[str, np.ndarray], prefix: str = ""
  ) -> TableSet:
    """Inverse of ``to_arrays``; validates the tables."""
    return cls(
      counts=np.asarray(arrays[prefix + "counts"]),
      lengths=np.asarray(arrays[prefix + "lengths"]),
      offsets=np.asarray(arrays[prefix + "offsets"]),
      precision_bits=int(np.asarray(arrays[prefix + "precision_bits"])),
    )

  def digest(self) -> bytes:
    """16-byte BLAKE2b digest of the tables (for model fingerprints)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(struct.pack("<II", self.precision_bits, self.num_tables))
    for arr in (self.lengths, self.offsets, self.counts):
      h.update(np.ascontiguousarray(arr, dtype="<i4").tobytes())
    return h.digest()


def _table_set(pmfs, offsets, precision_bits) -> TableSet:
  counts = [quantize_pmf(p, precision_bits) for p in pmfs]
  width = max(c.size for c in counts)
  padded = np.zeros((len(counts), width), np.int32)
  for t, c in enumerate(counts):
    padded[t, : c.size] = c
  lengths = np.array([c.size - 1 for c in counts], np.int32)
  return TableSet(padded, lengths, np.asarray(offsets), precision_bits)


def gaussian_scale_table(
  min: float = 0.1, max: float = 256.0, n: int = 64
) -> np.ndarray:
  """n log-spaced scales from exactly ``min`` to exactly ``max``."""
  if not (0 < min < max) or n < 2:
    raise ValueError("need 0 < min < max and n >= 2")
  table = np.exp(np.linspace(math.log(min), math.log(max), n))
  table[0], table[-1] = min, max
  return table


def gaussian_tables(
  scale_table, tail_mass: float = 1e-9, precision_bits: int = 16
) -> TableSet:
  """Tables of the zero-mean Gaussian of each scale, on symmetric support.

  Table t covers [-K, K] with ``K = ceil(s * Phi^-1(1 - tail_mass / 2))``
  and ``pmf(k) = Phi((k + 0.5) / s) - Phi((k - 0.5) / s)``, the likelihood
  the model assigns to a rounded residual; the mass outside goes to the
  escape bin.
  """
  scales = np.asarray(scale_table, dtype=np.float64)
  if scales.ndim != 1 or scales.size < 1 or not np.all(scales > 0):
    raise ValueError("scale_table must be a 1-D array of positive scales")
  if not 0 < tail_mass < 1:
    raise ValueError("tail_mass must be in (0, 1)")
  z = float(special.ndtri(1.0 - tail_mass / 2.0))
  pmfs, offsets = [], []
  for s in scales:
    k = max(int(math.ceil(s * z)), 1)
    grid = np.arange(-k, k + 1, dtype=np.float64)
    # Upper minus lower tail probabilities; symmetric and accurate in tails.
    upper = special.ndtr((grid + 0.5) / s)
    lower = special.ndtr((grid - 0.5) / s)
    pmf = np.where(
      grid < 0,
      upper - lower,
      special.ndtr(-(grid - 0.5) / s) - special.ndtr(-(grid + 0.5) / s),
    )
    pmfs.append(pmf)
    offsets.append(-k)
  return _table_set(pmfs, offsets, precision_bits)


def scale_indexes(sigma, scale_table) -> np.ndarray:
  """Index of the smallest table scale >= sigma (clamped to the last).

  Sigma below ``scale_table[0]`` maps to 0. Coding with the next wider
  scale costs at most a few hundredths of a bit per symbol with the default
  64-entry table (a wider Gaussian is a cheap mismatch).
  """
  table = np.asarray(scale_table, dtype=np.float64)
  s = np.asarray(sigma, dtype=np.float64)
  if np.any(np.isnan(s)):
    raise ValueError("sigma contains NaN")
  idx = np.searchsorted(table, s, side="left")
  return np.minimum(idx, table.size - 1).astype(np.int32)


def factorized_tables(pmfs, offsets, precision_bits: int = 16) -> TableSet:
  """Tables of a factorized prior: one per row of ``pmfs`` [C, L].

  The caller evaluates each channel's likelihood on an integer grid of L
  values starting at ``offsets[c]`` (relative to the channel's median);
  mass outside the grid goes to the escape bin.
  """
  p = np.asarray(pmfs, dtype=np.float64)
  if p.ndim != 2:
    raise ValueError(f"pmfs must be [C, L], got {p.shape}")
  off = np.asarray(offsets)
  if off.shape != (p.shape[0],) or not np.issubdtype(off.dtype, np.integer):
    raise ValueError("offsets must be an integer array of shape [C]")
  return _table_set(list(p), off, precision_bits)


def channel_indexes(shape, channel_axis: int = -1) -> np.ndarray:
  """int32 array of ``shape`` holding each element's channel index."""
  shape = tuple(int(d) for d in shape)
  axis = channel_axis % len(shape)
  view = [1] * len(shape)
  view[axis] = shape[axis]
  ch = np.arange(shape[axis], dtype=np.int32).reshape(view)
  return np.ascontiguousarray(np.broadcast_to(ch, shape))


# --------------------------------------------------------------------------
# Symbol coding
# --------------------------------------------------------------------------

_UNIFORM_MODELS: dict[int, object] = {}


def _uniform(n: int):
  m = _UNIFORM_MODELS.get(n)
  if m is None:
    m = constriction.stream.model.Categorical(
      np.ones(n, dtype=np.float64), perfect=False
    )
    _UNIFORM_MODELS[n] = m
  return m


def _check_symbols(symbols) -> np.ndarray:
  s = np.asarray(symbols)
  if not np.issubdtype(s.dtype, np.integer):
    raise TypeError(f"symbols must be integers, got dtype {s.dtype}")
  if s.size and (s.min() < _INT32_MIN or s.max() > _INT32_MAX):
    raise ValueError("symbols must lie within the int32 range")
  return s.reshape(-1).astype(np.int64)


def _check_indexes(indexes, tables: TableSet) -> np.ndarray:
  if not isinstance(tables, TableSet):
    raise TypeError("tables must be a TableSet")
  i = np.asarray(indexes)
  if not np.issubdtype(i.dtype, np.integer):
    raise TypeError(f"indexes must be integers, got dtype {i.dtype}")
  if i.size and (i.min() < 0 or i.max() >= tables.num_tables):
    raise ValueError(
      f"indexes must be in [0, {tables.num_tables}), got [{i.min()}, {i.max()}]"
    )
  return i


def _grouping(idx: np.ndarray, n_tables: int):
  """Stable order by table, and the [start, end) of each table's group."""
  flat = idx.reshape(-1)
  key = flat.astype(np.uint16) if n_tables <= 1 << 16 else flat
  order = np.argsort(key, kind="stable")
  counts = np.bincount(flat, minlength=n_tables)
  ends = np.cumsum(counts)
  return order, ends - counts, ends


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


def _encode_escapes(enc, values: np.ndarray) -> None:
  if values.size == 0:
    return
  u = _zigzag(values)
  nbits = _bit_length(u)
  enc.encode(nbits.astype(np.int32), _uniform(_ESC_MAX_BITS + 1))
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


def _decode_escapes(dec, count: int) -> np.ndarray:
  if count == 0:
    return np.zeros(0, np.int32)
  nbits = np.asarray(
    dec.decode(_uniform(_ESC_MAX_BITS + 1), count), dtype=np.int64
  )
  if nbits.min() < 0 or nbits.max() > _ESC_MAX_BITS:
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


class Encoder:
  """A range encoder collecting all streams of one image."""

  def __init__(self):
    self._enc = constriction.stream.queue.RangeEncoder()

  def encode(self, symbols, indexes, tables: TableSet) -> None:
    """Encodes int32 ``symbols`` with table ``indexes`` (same shape)."""
    encode_symbols(self._enc, symbols, indexes, tables)

  def get_words(self) -> np.ndarray:
    """The compressed data as np.uint32 words."""
    return np.asarray(self._enc.get_compressed(), dtype=np.uint32)

  def get_bytes(self) -> bytes:
    """The compressed data as little-endian bytes."""
    return words_to_bytes(self.get_words())

  def num_bits(self) -> int:
    return int(self._enc.num_bits())


def _is_panic(exc: BaseException) -> bool:
  return type(exc).__name__ == "PanicException"


def encode_symbols(encoder, symbols, indexes, tables: TableSet) -> None:
  """Appends ``symbols`` to ``encoder`` (Encoder or constriction
  RangeEncoder), each coded with table ``indexes[i]`` of ``tables``.

  Order: groups by ascending table index (positions in C order inside a
  group), then the escape codes of all out-of-range symbols.
  """
  enc = encoder._enc if isinstance(encoder, Encoder) else encoder
  idx = _check_indexes(indexes, tables)
  sym = _check_symbols(symbols)
  if sym.size != idx.size or np.shape(symbols) != idx.shape:
    raise ValueError(
      f"symbols {np.shape(symbols)} and indexes {idx.shape} differ in shape"
    )
  if sym.size == 0:
    return
  order, starts, ends = _grouping(idx, tables.num_tables)
  sidx = idx.reshape(-1)[order]
  ssym = sym[order]
  length = tables.lengths[sidx].astype(np.int64)
  bins = ssym - tables.offsets[sidx]
  esc = (bins < 0) | (bins >= length)
  bins = np.where(esc, length, bins).astype(np.int32)
  try:
    for t in np.flatnonzero(ends > starts):
      enc.encode(bins[starts[t] : ends[t]], tables.model(int(t)))
    _encode_escapes(enc, ssym[esc])
  except BaseException as e:
    if _is_panic(e):
      raise RuntimeError(f"constriction failed while encoding: {e}") from e
    raise


def decode_symbols(decoder, indexes, tables: TableSet) -> np.ndarray:
  """Decodes as many symbols as ``indexes`` holds; int32 of its shape.

  ``decoder`` is a Decoder or a constriction RangeDecoder. Raises
  BitstreamError if the data cannot be decoded (corrupted words).
  """
  dec = decoder._dec if isinstance(decoder, Decoder) else decoder
  idx = _check_indexes(indexes, tables)
  n = idx.size
  if n == 0:
    return np.zeros(idx.shape, np.int32)
  order, starts, ends = _grouping(idx, tables.num_tables)
  bins = np.empty(n, np.int64)
  try:
    for t in np.flatnonzero(ends > starts):
      got = dec.decode(tables.model(int(t)), int(ends[t] - starts[t]))
      bins[starts[t] : ends[t]] = got
    sidx = idx.reshape(-1)[order]
    length = tables.lengths[sidx].astype(np.int64)
    if bins.min() < 0 or np.any(bins > length):
      raise BitstreamError("decoded a symbol outside its table")
    esc = bins == length
    values = bins + tables.offsets[sidx]
    values[esc] = _decode_escapes(dec, int(esc.sum()))
  except BitstreamError:
    raise
  except BaseException as e:
    if isinstance(e, Exception) or _is_panic(e):
      raise BitstreamError(
        f"the range-coded data is corrupted or does not match the model "
        f"({type(e).__name__}: {e})"
      ) from e
    raise
  out = np.empty(n, np.int32)
  out[order] = values.astype(np.int32)
  return out.reshape(idx.shape)


class Decoder:
  """Incremental decoding of one range-coded stream.

  Call ``decode`` in the same sequence (same indexes and tables) as the
  encoder's ``encode`` calls, e.g. z first, then y with indexes computed
  from the decoded z.
  """

  def __init__(self, words):
    self._dec = constriction.stream.queue.RangeDecoder(_as_words(words))

  def decode(self, indexes, tables: TableSet) -> np.ndarray:
    """int32 symbols shaped like ``indexes``; raises BitstreamError."""
    return decode_symbols(self, indexes, tables)

  def maybe_exhausted(self) -> bool:
    """False if data is certainly left over (the stream is longer)."""
    return bool(self._dec.maybe_exhausted())


def _as_words(words) -> np.ndarray:
  if isinstance(words, bytes | bytearray | memoryview):
    return bytes_to_words(words)
  w = np.asarray(words)
  if w.ndim != 1 or w.dtype != np.uint32:
    raise TypeError("words must be bytes or a 1-D np.uint32 array")
  return np.ascontiguousarray(w)


def words_to_bytes(words) -> bytes:
  """np.uint32 words -> little-endian bytes."""
  return np.ascontiguousarray(words, dtype="<u4").tobytes()


def bytes_to_words(data) -> np.ndarray:
  """Little-endian bytes -> np.uint32 words."""
  data = bytes(data)
  if len(data) % 4:
    raise BitstreamError(
      f"a range-coded stream must be a multiple of 4 bytes, got {len(data)}"
    )
  return np.frombuffer(data, dtype="<u4").astype(np.uint32)


def encode_streams(parts: Sequence) -> np.ndarray:
  """Codes ``[(symbols, indexes, tables), ...]`` in order into one stream."""
  enc = Encoder()
  for symbols, indexes, tables in parts:
    enc.encode(symbols, indexes, tables)
  return enc.get_words()


def decode_streams(words, parts: Sequence) -> list[np.ndarray]:
  """Decodes ``[(indexes, tables), ...]`` in order from one stream."""
  dec = Decoder(words)
  return [dec.decode(indexes, tables) for indexes, tables in parts]


def estimate_bits(symbols, indexes, tables: TableSet) -> float:
  """Ideal code length in bits under the integer tables (with escapes)."""
  idx = _check_indexes(indexes, tables).reshape(-1)
  sym = _check_symbols(symbols)
  if sym.size != idx.size:
    raise ValueError("symbols and indexes differ in size")
  length = tables.lengths[idx].astype(np.int64)
  bins = sym - tables.offsets[idx]
  esc = (bins < 0) | (bins >= length)
  bins = np.where(esc, length, bins)
  counts = tables.counts[idx, bins].astype(np.float64)
  bits = float(np.sum(tables.precision_bits - np.log2(counts)))
  if np.any(esc):
    nbits = _bit_length(_zigzag(sym[esc]))
    bits += esc.sum() * math.log2(_ESC_MAX_BITS + 1)
    bits += float(np.maximum(nbits - 1, 0).sum())
  return bits


# --------------------------------------------------------------------------
# File container
# --------------------------------------------------------------------------

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
    g32 = float(np.float32(g))
    if not math.isfinite(g32):
      raise ValueError("gamma does not fit a float32")
    object.__setattr__(self, "gamma", g32)


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
    data = bytes(data)
  except TypeError as e:
    raise BitstreamError(f"expected bytes, got {type(data).__name__}") from e
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
  n_streams = fields[-1]
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
  try:
    header = Header(*fields[1:-1])
  except ValueError as e:
    raise BitstreamError(f"invalid header: {e}") from e
  streams, pos = [], table_end
  for n in lengths:
    streams.append(data[pos : pos + n])
    pos += n
  return header, streams
