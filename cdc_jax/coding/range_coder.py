"""Range coding of integer symbols with a ``TableSet`` (constriction).

Numpy + constriction only. Symbols are grouped by table, each group coded
with one categorical model (ascending table index, C order inside a group),
then the escape codes of all out-of-range symbols (``coding.escape``). All
streams of one image share one coder (``Encoder`` / ``Decoder``): z first,
then y with indexes computed from the decoded z. Corrupted data raises
``BitstreamError``, never hangs: every call decodes a fixed count.
"""

from __future__ import annotations

from collections.abc import Sequence

import constriction
import numpy as np

from cdc_jax.coding.errors import BitstreamError
from cdc_jax.coding.escape import decode_escapes, encode_escapes, escape_bits
from cdc_jax.coding.tables import INT32_MAX, INT32_MIN, TableSet


def _check_symbols(symbols) -> np.ndarray:
  s = np.asarray(symbols)
  if not np.issubdtype(s.dtype, np.integer):
    raise TypeError(f"symbols must be integers, got dtype {s.dtype}")
  if s.size and (s.min() < INT32_MIN or s.max() > INT32_MAX):
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
    encode_escapes(enc, ssym[esc])
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
    values[esc] = decode_escapes(dec, int(esc.sum()))
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
  return bits + escape_bits(sym[esc])
