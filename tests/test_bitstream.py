"""Tests of cdc_jax.bitstream (host-side entropy coding and file format)."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from scipy import special

from cdc_jax import bitstream as bs

INT32_EXTREMES = [-(2**31), -(2**31) + 1, 2**31 - 1, 10**6, -(10**6), 0]


@pytest.fixture(scope="module")
def scale_table():
  return bs.gaussian_scale_table()


@pytest.fixture(scope="module")
def gauss(scale_table):
  return bs.gaussian_tables(scale_table)


def _factorized(rng, channels=8, length=41):
  """Random per-channel pmfs on integer grids, some with lost tail mass."""
  pmfs = rng.dirichlet(np.full(length, 0.3), size=channels)
  pmfs *= rng.uniform(0.99, 1.0, size=(channels, 1))
  offsets = rng.integers(-30, 5, size=channels)
  return bs.factorized_tables(pmfs, offsets)


def _header(**kw):
  fields = dict(
    fingerprint=bytes(range(16)),
    height=512,
    width=768,
    family=bs.FAMILY_X,
    steps=17,
    gamma=0.8,
    seed=2**40 + 3,
    sampler=bs.SAMPLER_DDIM,
  )
  fields.update(kw)
  return bs.Header(**fields)


# --- probability tables ----------------------------------------------------


def test_quantize_pmf_invariants():
  rng = np.random.default_rng(0)
  cases = [
    np.array([1.0]),
    np.array([0.0, 1.0, 0.0]),
    np.array([1e-30, 0.5, 0.5]),
    np.array([0.2, 0.3]),  # half the mass is tail mass
    np.zeros(5),  # everything escapes
  ]
  cases += [rng.dirichlet(np.full(n, a)) for n, a in [(7, 1), (300, 0.05)]]
  cases += [rng.random(2000) / 1999.0]  # sums to slightly more than 1
  for pmf in cases:
    for bits in (8, 16, 20):
      if pmf.size + 1 > 2**bits:
        continue
      c = bs.quantize_pmf(pmf, bits)
      assert c.dtype == np.int32 and c.shape == (pmf.size + 1,)
      assert int(c.astype(np.int64).sum()) == 2**bits
      assert c.min() >= 1
  c = bs.quantize_pmf(np.array([0.25, 0.25]), 16)
  assert c[-1] == pytest.approx(2**15, abs=2)  # tail mass 0.5 escapes
  with pytest.raises(ValueError):
    bs.quantize_pmf(np.array([0.5, -0.1]))
  with pytest.raises(ValueError):
    bs.quantize_pmf(np.array([0.5, np.nan]))
  with pytest.raises(ValueError):
    bs.quantize_pmf(np.full(300, 1 / 300), precision_bits=8)


def test_gaussian_tables(scale_table, gauss):
  assert scale_table[0] == 0.1 and scale_table[-1] == 256.0
  assert np.all(np.diff(scale_table) > 0)
  assert gauss.num_tables == 64 and gauss.precision_bits == 16
  for t in range(gauss.num_tables):
    n = int(gauss.lengths[t])
    k = (n - 1) // 2
    assert n == 2 * k + 1 and gauss.offsets[t] == -k
    row = gauss.counts[t, :n]
    # Symmetric up to the tie-break of the leftover counts.
    assert np.abs(row - row[::-1]).max() <= 1
    assert gauss.counts[t, : n + 1].sum() == 2**16
    assert np.all(gauss.counts[t, n + 1 :] == 0)
  # K is the ceil of the (1 - tail/2) quantile.
  z = special.ndtri(1 - 0.5e-9)
  np.testing.assert_array_equal(
    -gauss.offsets, np.maximum(np.ceil(scale_table * z), 1)
  )


def test_scale_indexes(scale_table):
  sigma = np.array(
    [0.0, 0.05, 0.1, np.nextafter(0.1, 1), scale_table[5], 255.9, 256, 1e9]
  )
  idx = bs.scale_indexes(sigma, scale_table)
  assert idx.dtype == np.int32
  np.testing.assert_array_equal(idx, [0, 0, 0, 1, 5, 63, 63, 63])
  rng = np.random.default_rng(1)
  s = rng.uniform(0.1, 256, 1000)
  i = bs.scale_indexes(s, scale_table)
  assert np.all(scale_table[i] >= s)
  above = i > 0
  assert np.all(scale_table[i[above] - 1] < s[above])
  with pytest.raises(ValueError):
    bs.scale_indexes(np.array([np.nan]), scale_table)


def test_table_set_arrays_roundtrip(gauss, tmp_path):
  path = tmp_path / "tables.npz"
  np.savez(path, **gauss.to_arrays("y_"), **gauss.to_arrays("z_"))
  with np.load(path, allow_pickle=False) as f:
    back = bs.TableSet.from_arrays(f, "y_")
  for name in ("counts", "lengths", "offsets"):
    np.testing.assert_array_equal(getattr(back, name), getattr(gauss, name))
  assert back.precision_bits == gauss.precision_bits
  assert back.digest() == gauss.digest()
  bad = gauss.to_arrays()
  bad["counts"] = bad["counts"].copy()
  bad["counts"][0, 0] += 1
  with pytest.raises(ValueError):
    bs.TableSet.from_arrays(bad)


# --- symbol coding ---------------------------------------------------------


def test_gaussian_roundtrip_with_outliers(scale_table, gauss):
  rng = np.random.default_rng(2)
  n = 50_000
  sigma = np.exp(rng.uniform(np.log(0.05), np.log(300), n))
  sym = np.round(rng.normal(0, sigma)).astype(np.int64)
  pos = rng.choice(n, size=60, replace=False)
  sym[pos] = rng.choice(INT32_EXTREMES, size=60)
  sym[:6] = INT32_EXTREMES
  sym = sym.astype(np.int32).reshape(10, 50, 100)
  idx = bs.scale_indexes(sigma.reshape(sym.shape), scale_table)
  words = bs.encode_streams([(sym, idx, gauss)])
  assert words.dtype == np.uint32
  (out,) = bs.decode_streams(words, [(idx, gauss)])
  assert out.dtype == np.int32 and out.shape == sym.shape
  np.testing.assert_array_equal(out, sym)


def test_escape_every_bit_length():
  """Values of every zigzag bit length 0..32, all escaping a tiny table."""
  tables = bs.factorized_tables(np.array([[0.5]]), np.array([1000]))
  vals = [0, -1, 1]
  for b in range(1, 32):
    vals += [2**b - 1, 2**b, -(2**b), -(2**b) - 1, 2**b + 12345 % 2**b]
  vals += [2**31 - 1, -(2**31)]
  sym = np.array(vals, np.int64).clip(-(2**31), 2**31 - 1).astype(np.int32)
  idx = np.zeros_like(sym)
  words = bs.encode_streams([(sym, idx, tables)])
  (out,) = bs.decode_streams(bs.words_to_bytes(words), [(idx, tables)])
  np.testing.assert_array_equal(out, sym)


def test_factorized_roundtrip():
  rng = np.random.default_rng(3)
  tables = _factorized(rng, channels=8)
  shape = (1, 16, 12, 8)
  idx = bs.channel_indexes(shape)
  assert idx.dtype == np.int32 and np.all(idx[0, 3, 4] == np.arange(8))
  grid = np.arange(tables.counts.shape[1] - 1)
  sym = np.empty(shape, np.int64)
  for c in range(8):
    p = tables.pmf(c)[:-1]
    draw = rng.choice(grid[: p.size], size=shape[:-1], p=p / p.sum())
    sym[..., c] = draw + tables.offsets[c]
  sym[0, 0, 0, :3] = [-(2**31), 2**31 - 1, 77]
  sym = sym.astype(np.int32)
  words = bs.encode_streams([(sym, idx, tables)])
  (out,) = bs.decode_streams(words, [(idx, tables)])
  np.testing.assert_array_equal(out, sym)


def test_incremental_z_then_y(scale_table, gauss):
  """z and y in one stream; y's indexes are only known after z decodes."""
  rng = np.random.default_rng(4)
  ztab = _factorized(rng, channels=4)
  zidx = bs.channel_indexes((1, 3, 5, 4))
  zsym = rng.integers(-3, 4, size=zidx.shape).astype(np.int32)
  sigma_of = lambda z: 0.1 + np.abs(np.repeat(z, 4, axis=-1)).astype(float)
  ysig = sigma_of(zsym)
  ysym = np.round(rng.normal(0, ysig)).astype(np.int32)
  enc = bs.Encoder()
  bs.encode_symbols(enc, zsym, zidx, ztab)
  enc.encode(ysym, bs.scale_indexes(ysig, scale_table), gauss)
  data = enc.get_bytes()
  dec = bs.Decoder(data)
  zhat = dec.decode(zidx, ztab)
  np.testing.assert_array_equal(zhat, zsym)
  yidx = bs.scale_indexes(sigma_of(zhat), scale_table)
  yhat = bs.decode_symbols(dec, yidx, gauss)
  np.testing.assert_array_equal(yhat, ysym)
  assert dec.maybe_exhausted()


def test_rate_close_to_ideal(scale_table, gauss):
  rng = np.random.default_rng(5)
  n = 100_000
  sigma = rng.uniform(1, 5, n)
  sym = np.round(rng.normal(0, sigma)).astype(np.int32)
  idx = bs.scale_indexes(sigma, scale_table)
  coded = bs.encode_streams([(sym, idx, gauss)]).size * 32
  table_bits = bs.estimate_bits(sym, idx, gauss)
  model = special.ndtr((sym + 0.5) / sigma) - special.ndtr((sym - 0.5) / sigma)
  model_bits = -np.log2(model).sum()
  assert coded >= table_bits
  assert coded <= 1.01 * model_bits, (coded, model_bits)


def test_deterministic(scale_table):
  rng = np.random.default_rng(6)
  sigma = rng.uniform(0.1, 30, 20_000)
  sym = np.round(rng.normal(0, sigma)).astype(np.int32)
  sym[7] = 2**31 - 1
  idx = bs.scale_indexes(sigma, scale_table)
  t1 = bs.gaussian_tables(scale_table)
  t2 = bs.gaussian_tables(bs.gaussian_scale_table())
  np.testing.assert_array_equal(t1.counts, t2.counts)
  a = bs.encode_streams([(sym, idx, t1)])
  b = bs.encode_streams([(sym.astype(np.int64), idx.astype(np.int64), t2)])
  np.testing.assert_array_equal(a, b)


def test_encode_input_validation(gauss):
  idx = np.zeros(3, np.int32)
  with pytest.raises(ValueError, match="int32"):
    bs.encode_streams([(np.array([0, 2**31, 0]), idx, gauss)])
  with pytest.raises(TypeError):
    bs.encode_streams([(np.zeros(3), idx, gauss)])
  with pytest.raises(ValueError, match="shape"):
    bs.encode_streams(
      [(np.zeros(4, np.int32), np.zeros((2, 2), np.int32), gauss)]
    )
  with pytest.raises(ValueError, match="indexes"):
    bs.encode_streams([(np.zeros(3, np.int32), idx + 64, gauss)])
  assert bs.encode_streams([]).dtype == np.uint32


def test_garbage_words_never_hang(scale_table, gauss):
  rng = np.random.default_rng(7)
  ztab = _factorized(rng, channels=16)
  zidx = bs.channel_indexes((2, 4, 16))
  yidx = rng.integers(0, 64, size=(4, 8, 8)).astype(np.int32)
  start = time.perf_counter()
  raised = 0
  for trial in range(200):
    n = int(rng.integers(0, 40))
    words = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    if trial % 4 == 0:  # mostly all-ones words: a worst case for escapes
      words[:] = 0xFFFFFFFF
    dec = bs.Decoder(words)
    try:
      z = dec.decode(zidx, ztab)
      y = dec.decode(yidx, gauss)
    except bs.BitstreamError:
      raised += 1
      continue
    assert z.dtype == np.int32 and z.shape == zidx.shape
    assert y.dtype == np.int32 and y.shape == yidx.shape
  assert time.perf_counter() - start < 5.0
  with pytest.raises(bs.BitstreamError, match="multiple of 4"):
    bs.Decoder(b"abc")


# --- file container --------------------------------------------------------


def _valid_file(rng=None):
  rng = rng or np.random.default_rng(8)
  streams = [
    rng.integers(0, 256, size=40, dtype=np.uint8).tobytes(),
    b"",
    bs.encode_streams(
      [(np.arange(-5, 5, dtype=np.int32), np.zeros(10, np.int32), _gauss1())]
    ),
  ]
  return bs.pack(_header(), streams), streams


def _gauss1():
  return bs.gaussian_tables(np.array([2.0]))


def test_pack_unpack_roundtrip():
  data, streams = _valid_file()
  assert data[:4] == b"CDCJ" and data[4] == 1
  header, back = bs.unpack(data)
  assert header == _header()
  assert header.gamma == pytest.approx(0.8) and isinstance(header.gamma, float)
  assert back[:2] == streams[:2]
  np.testing.assert_array_equal(bs.bytes_to_words(back[2]), streams[2])
  assert bs.unpack(bytearray(data))[0] == header
  # dict-like header, no streams, boundary values
  h = dict(
    fingerprint=b"\xff" * 16,
    height=2**32 - 1,
    width=1,
    family=bs.FAMILY_EPS,
    steps=2**16 - 1,
    gamma=-1.5,
    seed=2**64 - 1,
  )
  header, back = bs.unpack(bs.pack(h, []))
  assert header == bs.Header(**h) and back == []


def test_header_validation():
  with pytest.raises(ValueError):
    _header(fingerprint=b"short")
  with pytest.raises(ValueError):
    _header(family=2)
  with pytest.raises(ValueError):
    _header(steps=2**16)
  with pytest.raises(ValueError):
    _header(gamma=float("nan"))
  with pytest.raises(ValueError):
    _header(height=0)


def _refresh_crc(body):
  return body + struct.pack("<I", zlib.crc32(body))


def test_unpack_errors():
  data, _ = _valid_file()
  cases = [
    (b"", "truncated"),
    (b"CD", "truncated"),
    (b"PNG\x89" + data[4:], "not a cdc_jax file"),
    (b"X", "not a cdc_jax file"),
    (data[:4] + b"\x02" + data[5:], r"newer cdc_jax \(format v2\); this ver"),
    (data[:4] + b"\x00" + data[5:], "unknown format version"),
    (data[:20], "file is truncated: expected at least"),
    (data[:-1], f"file is truncated: expected {len(data)} bytes, got"),
    (data + b"\x00", "trailing garbage"),
    (data[:30] + bytes([data[30] ^ 1]) + data[31:], "checksum mismatch"),
    (data[:-4] + b"\x00\x00\x00\x00", "checksum mismatch"),
  ]
  # A stream length that does not add up (CRC recomputed by a bad writer).
  n_streams_at = bs._FIXED - 1
  body = bytearray(data[:-4])
  body[bs._FIXED : bs._FIXED + 4] = struct.pack("<I", 41)
  cases.append((_refresh_crc(bytes(body)), "stream lengths inconsistent"))
  body = bytearray(data[:-4])
  body[n_streams_at] = 200
  cases.append((_refresh_crc(bytes(body)), "stream lengths inconsistent"))
  body = bytearray(data[:-4])
  body[bs._PREFIX.size + 4 + 16 + 8] = 9  # family id
  cases.append((_refresh_crc(bytes(body)), "invalid header"))
  for bad, message in cases:
    with pytest.raises(bs.BitstreamError, match=message):
      bs.unpack(bad)


def test_unpack_fuzz():
  rng = np.random.default_rng(9)
  data, _ = _valid_file()
  outcomes = {"ok": 0, "error": 0}
  for _ in range(300):
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
      kind = rng.integers(0, 4)
      pos = int(rng.integers(0, len(buf) + 1))
      if kind == 0 and buf:
        pos = min(pos, len(buf) - 1)
        buf[pos] ^= 1 << int(rng.integers(0, 8))
      elif kind == 1:
        del buf[pos:]
      elif kind == 2:
        ins = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8)
        buf[pos:pos] = ins.tobytes()
      else:
        del buf[pos : pos + int(rng.integers(1, 9))]
    try:
      bs.unpack(bytes(buf))
      outcomes["ok"] += 1
    except bs.BitstreamError:
      outcomes["error"] += 1
  assert outcomes["error"] > 250
  for n in range(0, 80):  # random byte strings, including short ones
    with pytest.raises(bs.BitstreamError):
      bs.unpack(rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def test_file_roundtrip_via_bytesio(scale_table, gauss):
  rng = np.random.default_rng(10)
  sigma = rng.uniform(0.1, 10, 500)
  sym = np.round(rng.normal(0, sigma)).astype(np.int32)
  idx = bs.scale_indexes(sigma, scale_table)
  f = io.BytesIO(bs.pack(_header(), [bs.encode_streams([(sym, idx, gauss)])]))
  header, (stream,) = bs.unpack(f.getvalue())
  (out,) = bs.decode_streams(stream, [(idx, gauss)])
  np.testing.assert_array_equal(out, sym)
