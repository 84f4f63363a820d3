"""Tests of cdc_jax.coding.tables (integer probability tables)."""

import numpy as np
import pytest
from scipy import special

from cdc_jax.coding import tables
from cdc_jax.coding.tables import TableSet


@pytest.fixture(scope="module")
def scale_table():
  return tables.gaussian_scale_table()


@pytest.fixture(scope="module")
def gauss(scale_table):
  return tables.gaussian_tables(scale_table)


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
  checked = 0
  for pmf in cases:
    for bits in (8, 16, 20):
      if pmf.size + 1 > 2**bits:
        continue
      c = tables.quantize_pmf(pmf, bits)
      assert c.dtype == np.int32 and c.shape == (pmf.size + 1,)
      assert int(c.astype(np.int64).sum()) == 2**bits
      assert c.min() >= 1
      checked += 1
  assert checked == 3 * len(cases) - 2  # 300 and 2000 bins skip 8 bits


def test_quantize_pmf_escape_bin_and_rounding():
  c = tables.quantize_pmf(np.array([0.25, 0.25]), 16)
  assert c[-1] == pytest.approx(2**15, abs=2)  # tail mass 0.5 escapes
  # 3 equal bins + an empty escape over 16 - 4 free counts: 4 each, the
  # leftover goes to the largest fractional parts, lower bins on ties.
  c = tables.quantize_pmf(np.full(3, 1 / 3), 4)
  np.testing.assert_array_equal(c, [5, 5, 5, 1])
  assert tables.quantize_pmf(np.array([1.0]), 1).tolist() == [1, 1]


@pytest.mark.parametrize(
  "pmf, bits",
  [
    ([0.5, -0.1], 16),
    ([0.5, np.nan], 16),
    ([0.5, np.inf], 16),
    ([], 16),
    ([[0.5, 0.5]], 16),
    (np.full(300, 1 / 300), 8),  # 301 bins do not fit 256 counts
    ([1.0], 0),
    ([1.0], 25),
  ],
)
def test_quantize_pmf_rejects(pmf, bits):
  with pytest.raises(ValueError):
    tables.quantize_pmf(np.asarray(pmf, np.float64), bits)


def test_gaussian_scale_table(scale_table):
  assert scale_table.shape == (64,)
  assert scale_table[0] == 0.1 and scale_table[-1] == 256.0
  assert np.all(np.diff(scale_table) > 0)
  ratios = scale_table[1:] / scale_table[:-1]
  np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
  for bad in [dict(min=0.0), dict(min=2.0, max=1.0), dict(n=1)]:
    with pytest.raises(ValueError):
      tables.gaussian_scale_table(**bad)


def test_gaussian_tables(scale_table, gauss):
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
  with pytest.raises(ValueError):
    tables.gaussian_tables(np.array([1.0, 0.0]))
  with pytest.raises(ValueError):
    tables.gaussian_tables(scale_table, tail_mass=0.0)


def test_gaussian_pmf_matches_the_model(gauss, scale_table):
  """The quantized pmf is the rounded-Gaussian likelihood.

  Each count is 1 + floor(q * (2**16 - n)) (+ 1 leftover), so a bin's
  mass is off by at most (n * q + 2) / 2**16 for n bins incl. the escape.
  """
  for t in (0, 20, 40):
    s = scale_table[t]
    grid = np.arange(gauss.lengths[t]) + gauss.offsets[t]
    model = special.ndtr((grid + 0.5) / s) - special.ndtr((grid - 0.5) / s)
    pmf = gauss.pmf(t)
    assert pmf.shape == (gauss.lengths[t] + 1,)
    assert pmf.sum() == 1.0
    bound = (pmf.size * model + 2) * 2.0**-16
    assert np.all(np.abs(pmf[:-1] - model) <= bound)


def test_scale_indexes(scale_table):
  sigma = np.array(
    [0.0, 0.05, 0.1, np.nextafter(0.1, 1), scale_table[5], 255.9, 256, 1e9]
  )
  idx = tables.scale_indexes(sigma, scale_table)
  assert idx.dtype == np.int32
  np.testing.assert_array_equal(idx, [0, 0, 0, 1, 5, 63, 63, 63])
  rng = np.random.default_rng(1)
  s = rng.uniform(0.1, 256, 1000)
  i = tables.scale_indexes(s.reshape(10, 100), scale_table)
  assert i.shape == (10, 100)
  i = i.reshape(-1)
  assert np.all(scale_table[i] >= s)
  above = i > 0
  assert np.all(scale_table[i[above] - 1] < s[above])
  with pytest.raises(ValueError):
    tables.scale_indexes(np.array([np.nan]), scale_table)


def test_factorized_tables():
  rng = np.random.default_rng(2)
  pmfs = rng.dirichlet(np.full(9, 0.5), size=3) * 0.999
  offsets = np.array([-4, 0, 7])
  t = tables.factorized_tables(pmfs, offsets)
  assert t.num_tables == 3
  np.testing.assert_array_equal(t.lengths, [9, 9, 9])
  np.testing.assert_array_equal(t.offsets, offsets)
  for c in range(3):
    np.testing.assert_array_equal(t.counts[c], tables.quantize_pmf(pmfs[c]))
  with pytest.raises(ValueError):
    tables.factorized_tables(pmfs[0], offsets)  # not [C, L]
  with pytest.raises(ValueError):
    tables.factorized_tables(pmfs, offsets[:2])
  with pytest.raises(ValueError):
    tables.factorized_tables(pmfs, offsets.astype(float))


def test_channel_indexes():
  idx = tables.channel_indexes((1, 4, 3, 5))
  assert idx.dtype == np.int32 and idx.shape == (1, 4, 3, 5)
  assert idx.flags.c_contiguous and idx.flags.writeable
  np.testing.assert_array_equal(idx[0, 2, 1], np.arange(5))
  first = tables.channel_indexes((2, 6, 4), channel_axis=1)
  np.testing.assert_array_equal(first[1, :, 3], np.arange(6))
  assert np.all(first[:, 4] == 4)


def test_table_set_arrays_roundtrip(gauss, tmp_path):
  path = tmp_path / "tables.npz"
  np.savez(path, **gauss.to_arrays("y_"), **gauss.to_arrays("z_"))
  with np.load(path, allow_pickle=False) as f:
    back = TableSet.from_arrays(f, "y_")
  for name in ("counts", "lengths", "offsets"):
    np.testing.assert_array_equal(getattr(back, name), getattr(gauss, name))
  assert back.precision_bits == gauss.precision_bits
  assert back.digest() == gauss.digest()
  assert len(gauss.digest()) == 16
  bad = gauss.to_arrays()
  bad["counts"] = bad["counts"].copy()
  bad["counts"][0, 0] += 1
  with pytest.raises(ValueError):
    TableSet.from_arrays(bad)


def test_table_set_digest_sees_every_field(gauss):
  arrays = gauss.to_arrays()
  moved = dict(arrays, offsets=arrays["offsets"] + 1)
  assert TableSet.from_arrays(moved).digest() != gauss.digest()
  counts = arrays["counts"].copy()
  counts[0, 0] += 1
  counts[0, 1] -= 1
  changed = dict(arrays, counts=counts)
  assert TableSet.from_arrays(changed).digest() != gauss.digest()


def test_table_set_is_read_only(gauss):
  with pytest.raises(ValueError):
    gauss.counts[0, 0] = 7
  source = np.array([[3, 1]], np.int32)
  t = TableSet(source, [1], [0], precision_bits=2)
  source[0, 0] = 0  # the set keeps its own copy
  assert t.counts[0, 0] == 3


@pytest.mark.parametrize(
  "counts, lengths, offsets, bits",
  [
    ([[3, 1]], [1], [0], 3),  # sums to 4, not 8
    ([[2, 1, 1]], [1], [0], 2),  # padding not 0
    ([[4, 0]], [1], [0], 2),  # a used count of 0
    ([[3, 1]], [2], [0], 2),  # length beyond the row
    ([[3, 1]], [0], [0], 2),  # no in-range bin
    ([[3, 1]], [1, 1], [0, 0], 2),  # inconsistent shapes
    ([3, 1], [1], [0], 2),  # counts not 2-D
    ([[3, 1]], [1], [2**31], 2),  # range outside int32
    ([[3, 1]], [1], [0], 0),  # precision out of range
  ],
)
def test_table_set_rejects(counts, lengths, offsets, bits):
  with pytest.raises(ValueError):
    TableSet(np.array(counts), np.array(lengths), np.array(offsets), bits)
