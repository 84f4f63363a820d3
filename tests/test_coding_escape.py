"""Tests of cdc_jax.coding.escape (codes for values outside a table)."""

import math

import constriction
import numpy as np
import pytest

from cdc_jax.coding import escape


def _every_bit_length():
  """Values whose zigzag codes have every bit length 0..32."""
  vals = [0, -1, 1]
  for b in range(1, 32):
    vals += [2**b - 1, 2**b, -(2**b), -(2**b) - 1, 2**b + 12345 % 2**b]
  vals += [2**31 - 1, -(2**31)]
  return np.array(vals, np.int64).clip(-(2**31), 2**31 - 1).astype(np.int32)


def _encode(values):
  enc = constriction.stream.queue.RangeEncoder()
  escape.encode_escapes(enc, values)
  return enc


def _decode(words, count):
  dec = constriction.stream.queue.RangeDecoder(words)
  return escape.decode_escapes(dec, count), dec


def test_roundtrip_every_bit_length():
  values = _every_bit_length()
  enc = _encode(values)
  out, dec = _decode(enc.get_compressed(), values.size)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, values)
  assert dec.maybe_exhausted()


def test_roundtrip_random_int32():
  rng = np.random.default_rng(0)
  values = rng.integers(-(2**31), 2**31, 5000).astype(np.int32)
  values[:200] = rng.integers(-300, 300, 200)  # short codes among long ones
  out, _ = _decode(_encode(values).get_compressed(), values.size)
  np.testing.assert_array_equal(out, values)


def test_empty():
  enc = _encode(np.zeros(0, np.int32))
  assert enc.num_bits() == 0
  out, _ = _decode(np.zeros(0, np.uint32), 0)
  assert out.dtype == np.int32 and out.shape == (0,)
  assert escape.escape_bits(np.zeros(0, np.int32)) == 0.0


def test_escape_bits_formula():
  """log2(33) for the bit length, then the bits below the leading one."""
  length = math.log2(escape.ESC_MAX_BITS + 1)
  cases = {
    0: 0,  # zigzag 0: no bits
    -1: 0,  # zigzag 1: the leading one only
    1: 1,  # zigzag 2 = 0b10
    -3: 2,  # zigzag 5 = 0b101
    2**31 - 1: 31,  # zigzag 2**32 - 2
    -(2**31): 31,  # zigzag 2**32 - 1
  }
  for v, mantissa in cases.items():
    bits = escape.escape_bits(np.array([v], np.int32))
    assert bits == pytest.approx(length + mantissa), v
  values = np.array(list(cases), np.int64).astype(np.int32)
  total = escape.escape_bits(values)
  assert total == pytest.approx(len(cases) * length + sum(cases.values()))


@pytest.mark.parametrize("n", [1, 10, 125, 2000])
def test_coded_size_matches_escape_bits(n):
  rng = np.random.default_rng(n)
  values = rng.integers(-(2**31), 2**31, n).astype(np.int32)
  values[: n // 2] >>= rng.integers(0, 32, n // 2)  # all lengths
  ideal = escape.escape_bits(values)
  coded = _encode(values).num_bits()
  # The uniform models are exact to ~1e-6; the coder ends on whole words.
  assert ideal - 1 <= coded <= ideal * 1.001 + 64, (coded, ideal)


class _CountingDecoder:
  """A constriction RangeDecoder that counts what it is asked to decode."""

  def __init__(self, words):
    self._dec = constriction.stream.queue.RangeDecoder(words)
    self.calls = 0
    self.symbols = 0

  def decode(self, model, count):
    self.calls += 1
    self.symbols += count
    return self._dec.decode(model, count)


def test_garbage_decoding_is_bounded():
  """Garbage words cost at most 5 symbols per escape, in at most 9 calls.

  Per escape: the bit length, at most 3 whole bytes (31 bits below the
  leading one) and one group of low bits; calls: the lengths, the bytes,
  one per low-bit width 1..7. Garbage either decodes to ``count`` int32
  values that re-encode to themselves, or constriction refuses it (an
  ordinary exception; ``range_coder`` turns it into BitstreamError).
  """
  rng = np.random.default_rng(1)
  outcomes = {"ok": 0, "refused": 0}
  for trial in range(200):
    words = rng.integers(0, 2**32, int(rng.integers(0, 12)), dtype=np.uint64)
    words = words.astype(np.uint32)
    if trial % 4 == 0:  # all ones: the longest codes
      words[:] = 0xFFFFFFFF
    count = int(rng.integers(1, 50))
    dec = _CountingDecoder(words)
    try:
      out = escape.decode_escapes(dec, count)
    except Exception as e:
      assert str(e)
      outcomes["refused"] += 1
    else:
      outcomes["ok"] += 1
      assert out.dtype == np.int32 and out.shape == (count,)
      back, _ = _decode(_encode(out).get_compressed(), count)
      np.testing.assert_array_equal(back, out)
    assert dec.symbols <= 5 * count and dec.calls <= 9, (trial, dec.symbols)
  # Both branches ran, so both were checked.
  assert outcomes["ok"] and outcomes["refused"], outcomes
