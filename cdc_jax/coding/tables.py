"""Integer probability tables: the contract between encoder and decoder.

Numpy only. A ``TableSet`` holds integer counts summing to ``2**precision``
per table plus an escape bin for values outside the table's range; the
float pmf handed to constriction is ``counts / 2**precision``, computed the
same way on both sides. Builders: ``gaussian_tables`` (the conditional
Gaussian of y at a ladder of scales, ``gaussian_scale_table``) and
``factorized_tables`` (the hyperprior of z, one table per channel).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Mapping

import constriction
import numpy as np
from scipy import special

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
_MAX_PRECISION = 24  # constriction's range coder resolves 24-bit probs.


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
    if offsets.min() < INT32_MIN or (offsets + lengths - 1).max() > INT32_MAX:
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
