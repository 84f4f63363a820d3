"""Tests of cdc_jax.coding.range_coder (symbols <-> range-coded words)."""

import constriction
import numpy as np
import pytest
from scipy import special

from cdc_jax.coding import container, tables
from cdc_jax.coding import range_coder as rc
from cdc_jax.coding.errors import BitstreamError
from cdc_jax.coding.escape import escape_bits

INT32_EXTREMES = [-(2**31), -(2**31) + 1, 2**31 - 1, 10**6, -(10**6), 0]


@pytest.fixture(scope="module")
def scale_table():
  return tables.gaussian_scale_table()


@pytest.fixture(scope="module")
def gauss(scale_table):
  return tables.gaussian_tables(scale_table)


def _factorized(rng, channels=8, length=41):
  """Random per-channel pmfs on integer grids, some with lost tail mass."""
  pmfs = rng.dirichlet(np.full(length, 0.3), size=channels)
  pmfs *= rng.uniform(0.99, 1.0, size=(channels, 1))
  offsets = rng.integers(-30, 5, size=channels)
  return tables.factorized_tables(pmfs, offsets)


class _CountingDecoder:
  """A constriction RangeDecoder that counts what it is asked to decode.

  ``decode_symbols`` takes a constriction decoder as well as a ``Decoder``,
  so this measures the work a decode does without touching its internals.
  """

  def __init__(self, words):
    self._dec = constriction.stream.queue.RangeDecoder(words)
    self.calls = 0
    self.symbols = 0

  def decode(self, model, count):
    self.calls += 1
    self.symbols += count
    return self._dec.decode(model, count)


def _work_bound(indexes):
  """Most (calls, symbols) decoding ``indexes`` may ask of the coder.

  One call per table present, then escapes: lengths, bytes and 7 widths of
  low bits (9 calls); each escape reads at most 5 symbols (length, 3 bytes,
  low bits) after its escape bin.
  """
  n = np.size(indexes)
  return len(np.unique(indexes)) + 9, n + 5 * n


# --- round trips -----------------------------------------------------------


def test_gaussian_roundtrip_with_outliers(scale_table, gauss):
  rng = np.random.default_rng(2)
  n = 50_000
  sigma = np.exp(rng.uniform(np.log(0.05), np.log(300), n))
  sym = np.round(rng.normal(0, sigma)).astype(np.int64)
  pos = rng.choice(n, size=60, replace=False)
  sym[pos] = rng.choice(INT32_EXTREMES, size=60)
  sym[:6] = INT32_EXTREMES
  sym = sym.astype(np.int32).reshape(10, 50, 100)
  idx = tables.scale_indexes(sigma.reshape(sym.shape), scale_table)
  words = rc.encode_streams([(sym, idx, gauss)])
  assert words.dtype == np.uint32
  (out,) = rc.decode_streams(words, [(idx, gauss)])
  assert out.dtype == np.int32 and out.shape == sym.shape
  np.testing.assert_array_equal(out, sym)


def test_factorized_roundtrip():
  rng = np.random.default_rng(3)
  ztab = _factorized(rng, channels=8)
  shape = (1, 16, 12, 8)
  idx = tables.channel_indexes(shape)
  grid = np.arange(ztab.counts.shape[1] - 1)
  sym = np.empty(shape, np.int64)
  for c in range(8):
    p = ztab.pmf(c)[:-1]
    draw = rng.choice(grid[: p.size], size=shape[:-1], p=p / p.sum())
    sym[..., c] = draw + ztab.offsets[c]
  sym[0, 0, 0, :3] = [-(2**31), 2**31 - 1, 77]
  sym = sym.astype(np.int32)
  words = rc.encode_streams([(sym, idx, ztab)])
  (out,) = rc.decode_streams(rc.words_to_bytes(words), [(idx, ztab)])
  np.testing.assert_array_equal(out, sym)


def test_only_escapes_roundtrip():
  """A table none of the values fall in: everything is an escape."""
  far = tables.factorized_tables(np.array([[0.5]]), np.array([1000]))
  rng = np.random.default_rng(11)
  sym = rng.integers(-(2**31), 2**31, 300).astype(np.int32)
  sym[:2] = [-(2**31), 2**31 - 1]
  idx = np.zeros_like(sym)
  (out,) = rc.decode_streams(rc.encode_streams([(sym, idx, far)]), [(idx, far)])
  np.testing.assert_array_equal(out, sym)


def test_incremental_z_then_y(scale_table, gauss):
  """z and y in one stream; y's indexes are only known after z decodes."""
  rng = np.random.default_rng(4)
  ztab = _factorized(rng, channels=4)
  zidx = tables.channel_indexes((1, 3, 5, 4))
  zsym = rng.integers(-3, 4, size=zidx.shape).astype(np.int32)
  sigma_of = lambda z: 0.1 + np.abs(np.repeat(z, 4, axis=-1)).astype(float)
  ysig = sigma_of(zsym)
  ysym = np.round(rng.normal(0, ysig)).astype(np.int32)
  enc = rc.Encoder()
  rc.encode_symbols(enc, zsym, zidx, ztab)
  enc.encode(ysym, tables.scale_indexes(ysig, scale_table), gauss)
  assert enc.num_bits() == 32 * enc.get_words().size
  data = enc.get_bytes()
  dec = rc.Decoder(data)
  zhat = dec.decode(zidx, ztab)
  np.testing.assert_array_equal(zhat, zsym)
  yidx = tables.scale_indexes(sigma_of(zhat), scale_table)
  yhat = rc.decode_symbols(dec, yidx, gauss)
  np.testing.assert_array_equal(yhat, ysym)
  assert dec.maybe_exhausted()


def test_empty_parts(gauss):
  assert rc.encode_streams([]).dtype == np.uint32
  assert rc.encode_streams([]).size == 0
  empty = np.zeros((0, 3), np.int32)
  words = rc.encode_streams([(empty, empty, gauss)])
  (out,) = rc.decode_streams(words, [(empty, gauss)])
  assert out.shape == (0, 3) and out.dtype == np.int32


def test_words_and_bytes():
  words = np.array([0x04030201, 0xFFFFFFFF, 0], np.uint32)
  data = rc.words_to_bytes(words)
  assert data == bytes([1, 2, 3, 4]) + b"\xff" * 4 + b"\x00" * 4
  back = rc.bytes_to_words(bytearray(data))
  assert back.dtype == np.uint32
  np.testing.assert_array_equal(back, words)
  for n in (1, 3, 5):
    with pytest.raises(BitstreamError, match="multiple of 4"):
      rc.bytes_to_words(b"x" * n)
  with pytest.raises(BitstreamError, match="multiple of 4"):
    rc.Decoder(b"abc")
  with pytest.raises(TypeError):
    rc.Decoder(np.zeros(2, np.int64))
  with pytest.raises(TypeError):
    rc.Decoder(np.zeros((2, 2), np.uint32))


# --- rate ------------------------------------------------------------------


def test_rate_close_to_ideal(scale_table, gauss):
  rng = np.random.default_rng(5)
  n = 100_000
  sigma = rng.uniform(1, 5, n)
  sym = np.round(rng.normal(0, sigma)).astype(np.int32)
  idx = tables.scale_indexes(sigma, scale_table)
  coded = rc.encode_streams([(sym, idx, gauss)]).size * 32
  table_bits = rc.estimate_bits(sym, idx, gauss)
  model = special.ndtr((sym + 0.5) / sigma) - special.ndtr((sym - 0.5) / sigma)
  model_bits = -np.log2(model).sum()
  assert coded >= table_bits
  assert coded <= 1.01 * model_bits, (coded, model_bits)


def test_estimate_bits_counts_escapes(gauss):
  """In-range symbols cost their bin; escapes the escape bin + code."""
  assert gauss.offsets[0] == -1 and gauss.lengths[0] == 3  # [-1, 1]
  sym = np.array([0, 1, 5000, -(2**31)], np.int32)
  idx = np.zeros(4, np.int32)
  bits = 16 - np.log2(gauss.counts[0, :4].astype(np.float64))  # per bin
  expected = bits[1] + bits[2] + 2 * bits[3] + escape_bits(sym[2:])
  got = rc.estimate_bits(sym, idx, gauss)
  assert got == pytest.approx(expected)
  coded = rc.encode_streams([(sym, idx, gauss)]).size * 32
  assert coded >= got


def test_deterministic(scale_table):
  rng = np.random.default_rng(6)
  sigma = rng.uniform(0.1, 30, 20_000)
  sym = np.round(rng.normal(0, sigma)).astype(np.int32)
  sym[7] = 2**31 - 1
  idx = tables.scale_indexes(sigma, scale_table)
  t1 = tables.gaussian_tables(scale_table)
  t2 = tables.gaussian_tables(tables.gaussian_scale_table())
  np.testing.assert_array_equal(t1.counts, t2.counts)
  a = rc.encode_streams([(sym, idx, t1)])
  b = rc.encode_streams([(sym.astype(np.int64), idx.astype(np.int64), t2)])
  np.testing.assert_array_equal(a, b)


# --- bad input -------------------------------------------------------------


def test_encode_input_validation(gauss):
  idx = np.zeros(3, np.int32)
  with pytest.raises(ValueError, match="int32"):
    rc.encode_streams([(np.array([0, 2**31, 0]), idx, gauss)])
  with pytest.raises(TypeError):
    rc.encode_streams([(np.zeros(3), idx, gauss)])
  with pytest.raises(TypeError):
    rc.encode_streams([(np.zeros(3, np.int32), idx.astype(float), gauss)])
  with pytest.raises(ValueError, match="shape"):
    rc.encode_streams(
      [(np.zeros(4, np.int32), np.zeros((2, 2), np.int32), gauss)]
    )
  with pytest.raises(ValueError, match="indexes"):
    rc.encode_streams([(np.zeros(3, np.int32), idx + 64, gauss)])
  with pytest.raises(ValueError, match="indexes"):
    rc.encode_streams([(np.zeros(3, np.int32), idx - 1, gauss)])
  with pytest.raises(TypeError, match="TableSet"):
    rc.encode_streams([(np.zeros(3, np.int32), idx, gauss.to_arrays())])


def test_decode_input_validation(gauss):
  zeros = np.zeros(3, np.int32)
  words = rc.encode_streams([(zeros, zeros, gauss)])
  with pytest.raises(ValueError, match="indexes"):
    rc.decode_streams(words, [(np.full(3, 64), gauss)])
  with pytest.raises(TypeError):
    rc.decode_streams(words, [(np.zeros(3), gauss)])


def test_garbage_words_raise_or_decode_with_bounded_work(scale_table, gauss):
  """Random words: a BitstreamError naming the problem, or symbols.

  Decoded symbols have the requested shape and re-encode to themselves;
  either way the decoder asks the coder for a bounded number of symbols.
  """
  rng = np.random.default_rng(7)
  ztab = _factorized(rng, channels=16)
  zidx = tables.channel_indexes((2, 4, 16))
  yidx = rng.integers(0, 64, size=(4, 8, 8)).astype(np.int32)
  z_calls, z_syms = _work_bound(zidx)
  y_calls, y_syms = _work_bound(yidx)
  outcomes = {"ok": 0, "error": 0}
  for trial in range(200):
    n = int(rng.integers(0, 40))
    words = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    if trial % 4 == 0:  # all-ones words: a worst case for escapes
      words[:] = 0xFFFFFFFF
    dec = _CountingDecoder(words)
    try:
      z = rc.decode_symbols(dec, zidx, ztab)
      y = rc.decode_symbols(dec, yidx, gauss)
    except BitstreamError as e:
      assert str(e), trial
      outcomes["error"] += 1
    else:
      outcomes["ok"] += 1
      assert z.dtype == np.int32 and z.shape == zidx.shape
      assert y.dtype == np.int32 and y.shape == yidx.shape
      again = rc.encode_streams([(z, zidx, ztab), (y, yidx, gauss)])
      z2, y2 = rc.decode_streams(again, [(zidx, ztab), (yidx, gauss)])
      np.testing.assert_array_equal(z2, z)
      np.testing.assert_array_equal(y2, y)
    assert dec.calls <= z_calls + y_calls, (trial, dec.calls)
    assert dec.symbols <= z_syms + y_syms, (trial, dec.symbols)
  # Both branches ran, so both were checked.
  assert outcomes["ok"] and outcomes["error"], outcomes


# --- long fuzz -------------------------------------------------------------


def _mutate(rng, buf):
  """One random mutation of ``buf``; returns (new bytes, what was done)."""
  buf = bytearray(buf)
  kind = int(rng.integers(0, 7))
  if kind == 0 and buf:
    pos = int(rng.integers(0, len(buf)))
    buf[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf), f"flip byte {pos}"
  if kind == 1:
    cut = int(rng.integers(0, len(buf) + 1))
    return bytes(buf[:cut]), f"truncate to {cut}"
  if kind == 2:
    cut = 4 * int(rng.integers(0, len(buf) // 4 + 1))
    return bytes(buf[:cut]), f"truncate to word {cut // 4}"
  if kind == 3:
    n = 4 * int(rng.integers(0, len(buf) // 4 + 3))
    return rng.bytes(n), f"random payload of {n} bytes"
  if kind == 4:
    pos = int(rng.integers(0, len(buf) + 1))
    extra = rng.bytes(int(rng.integers(1, 9)))
    return bytes(buf[:pos] + extra + buf[pos:]), f"insert at {pos}"
  if kind == 5:
    fill = bytes([0xFF if rng.random() < 0.5 else 0x00])
    pos = int(rng.integers(0, len(buf) + 1))
    return bytes(buf[:pos]) + fill * (len(buf) - pos), f"fill from {pos}"
  for _ in range(int(rng.integers(2, 9))):  # several flips at once
    if buf:
      buf[int(rng.integers(0, len(buf)))] ^= int(rng.integers(1, 256))
  return bytes(buf), "scramble"


@pytest.mark.slow
def test_fuzz_container_and_decoder(scale_table, gauss):
  """4000 damaged files: BitstreamError with a message, or a good decode.

  Half damage the file bytes (mostly caught by the CRC), half damage the
  range-coded stream and re-pack it with a valid CRC, so the decoder sees
  the damage. A good decode means every symbol array has the requested
  shape and re-encodes to itself; no other exception is allowed.
  """
  rng = np.random.default_rng(12)
  ztab = _factorized(rng, channels=8)
  zidx = tables.channel_indexes((1, 4, 4, 8))
  zsym = rng.integers(-4, 5, zidx.shape).astype(np.int32)
  zsym[0, 0, 0, :2] = [-(2**31), 2**31 - 1]

  def y_indexes(z):
    sigma = 0.2 + np.abs(np.repeat(z.astype(np.float64), 4, axis=-1))
    return tables.scale_indexes(sigma, scale_table)

  yidx = y_indexes(zsym)
  ysym = np.round(rng.normal(0, scale_table[yidx])).astype(np.int32)
  ysym[0, 1, 1, :3] = [10**6, -(2**31), 2**31 - 1]
  stream = rc.encode_streams([(zsym, zidx, ztab), (ysym, yidx, gauss)])
  header = container.Header(
    fingerprint=bytes(16), height=64, width=64, steps=4, seed=5
  )
  file = container.pack(header, [stream, b"side"])
  z_calls, z_syms = _work_bound(zidx)
  y_calls, y_syms = _work_bound(np.zeros(yidx.size))
  y_calls += gauss.num_tables - 1  # y's indexes depend on the decoded z

  def decode(data):
    """unpack, then z, then y with indexes from the decoded z."""
    head, streams = container.unpack(data)
    assert container.pack(head, streams) == data  # well formed
    if len(streams) != 2:
      raise BitstreamError(f"expected 2 streams, got {len(streams)}")
    dec = _CountingDecoder(rc.bytes_to_words(streams[0]))
    try:
      z = rc.decode_symbols(dec, zidx, ztab)
      y_idx = y_indexes(z)
      y = rc.decode_symbols(dec, y_idx, gauss)
    finally:
      assert dec.calls <= z_calls + y_calls
      assert dec.symbols <= z_syms + y_syms
    assert z.dtype == y.dtype == np.int32
    assert z.shape == zidx.shape and y.shape == yidx.shape
    again = rc.encode_streams([(z, zidx, ztab), (y, y_idx, gauss)])
    z2, y2 = rc.decode_streams(again, [(zidx, ztab), (y_idx, gauss)])
    np.testing.assert_array_equal(z2, z)
    np.testing.assert_array_equal(y2, y)

  decode(file)  # the undamaged file decodes
  stream_bytes = rc.words_to_bytes(stream)
  outcomes = {"ok": 0, "error": 0}
  for trial in range(4000):
    if trial % 2:
      data, what = _mutate(rng, file)
    else:
      damaged, what = _mutate(rng, stream_bytes)
      data, what = container.pack(header, [damaged, b"side"]), f"stream {what}"
    try:
      decode(data)
    except BitstreamError as e:
      assert str(e), (trial, what)
      outcomes["error"] += 1
    except Exception as e:
      pytest.fail(f"trial {trial} ({what}): {type(e).__name__}: {e}")
    else:
      outcomes["ok"] += 1
  assert sum(outcomes.values()) == 4000
  assert outcomes["ok"] and outcomes["error"], outcomes
