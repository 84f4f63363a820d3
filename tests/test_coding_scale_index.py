"""Tests of cdc_jax.coding.scale_index: the exact integer scale path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import entropy_tables, testing
from cdc_jax.coding import scale_index
from cdc_jax.coding import tables as coding_tables
from cdc_jax.coding.scale_index import IntConv
from cdc_jax.imageio import to_float
from cdc_jax.models.cdc import CDC
from cdc_jax.models.context_model import SCALE_MIN, h_s_layers
from cdc_jax.models.entropy import quantize

# (kernel, dilation, padding): h_s's transposed convs and its last conv.
GEOMETRIES = [(5, 2, (2, 3)), (3, 1, (1, 1)), (4, 2, (2, 2)), (1, 1, (0, 0))]


def _reference_conv(a, kernel, bias, dilation, padding):
  """The definition, in int64 numpy without BLAS (exact, slow)."""
  b, h, w, _ = a.shape
  k = kernel.shape[0]
  hd, wd = dilation * (h - 1) + 1, dilation * (w - 1) + 1
  x = np.zeros((b, hd, wd, a.shape[-1]), np.int64)
  x[:, ::dilation, ::dilation] = a
  lo, hi = padding
  x = np.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
  oh, ow = x.shape[1] - k + 1, x.shape[2] - k + 1
  out = np.zeros((b, oh, ow, kernel.shape[-1]), np.int64) + bias
  for ky in range(k):
    for kx in range(k):
      patch = x[:, ky : ky + oh, kx : kx + ow]
      out += np.einsum("bhwi,io->bhwo", patch, kernel[ky, kx])
  return out


@pytest.mark.parametrize("k,dilation,padding", GEOMETRIES)
def test_integer_conv_is_exact_at_the_largest_magnitudes(k, dilation, padding):
  """Activations and weights at their bounds, 300 input channels (two
  float64 blocks): the BLAS path equals the int64 definition exactly."""
  rng = np.random.default_rng(k * 10 + dilation)
  cin, cout = 300, 5
  amax, wmax = scale_index.ACT_MAX, 2**scale_index.WEIGHT_BITS
  a = rng.choice([-amax, amax, amax - 1], size=(2, 4, 3, cin))
  a[0] = amax
  w = rng.choice([-wmax, wmax, wmax - 1], size=(k, k, cin, cout))
  w[..., 0] = wmax  # output channel 0 of image 0: the worst-case sum
  bias = rng.integers(-(2**40), 2**40, cout)
  conv = IntConv(
    w.astype(np.float64), bias, np.zeros(cout, np.int64), dilation, padding
  )
  out = conv(a)
  ref = _reference_conv(a, w, bias, dilation, padding)
  assert out.dtype == np.int64 and out.shape == ref.shape
  np.testing.assert_array_equal(out, ref)
  # Not vacuous: far beyond float32's exact integers (2**24); with k > 1
  # beyond float64's (2**53) too, without the per-tap, per-block split.
  assert np.abs(ref).max() > (2**53 if k > 1 else 2**50)


@pytest.mark.parametrize("k,dilation,padding", GEOMETRIES[:2])
def test_quantized_conv_approximates_the_float_conv(k, dilation, padding):
  rng = np.random.default_rng(3)
  kernel = rng.normal(0, 0.05, (k, k, 16, 8)).astype(np.float32)
  bias = rng.normal(0, 0.1, 8).astype(np.float32)
  x = rng.normal(0, 2, (1, 5, 6, 16))
  conv = IntConv.quantize(kernel, bias, dilation, padding)
  a = np.rint(np.ldexp(x, scale_index.ACT_FRAC)).astype(np.int64)
  out = np.ldexp(conv(a), -(scale_index.ACT_FRAC + conv.exponent))
  ref = jax.lax.conv_general_dilated(
    jnp.asarray(np.ldexp(a, -scale_index.ACT_FRAC), jnp.float32),
    jnp.asarray(kernel),
    (1, 1),
    (padding, padding),
    lhs_dilation=(dilation, dilation),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision="highest",
  )
  ref = np.asarray(ref + bias, np.float64)
  assert np.abs(out - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.fixture(scope="module")
def calibrated():
  model = testing.tiny_model("eps")
  params = testing.random_params(model)
  img = testing.photo("chelsea", (256, 384))
  params = testing.calibrate_entropy_model(model, params, img)

  def run(method, *args):
    fn = jax.jit(functools.partial(model.apply, method=method))
    return fn({"params": params}, *args)

  y = run(CDC.g_a, jnp.asarray(to_float(img))[None])
  med = np.asarray(params["context_fn"]["prior"]["medians"])
  z_sym = np.asarray(quantize(run(CDC.h_a, y), "symbols", med))
  _, sigma = run(CDC.h_s, jnp.asarray(z_sym + med))
  table = coding_tables.gaussian_scale_table()
  return params, z_sym, np.asarray(sigma), table


def test_indexes_agree_with_the_float_path(calibrated):
  params, z_sym, sigma, table = calibrated
  indexer = entropy_tables.scale_indexer(params, table)
  idx = indexer(z_sym)
  ref = coding_tables.scale_indexes(sigma, table)
  assert idx.dtype == np.int32 and idx.shape == ref.shape == sigma.shape
  # The integer path is a faithful version of h_s: the same table, or a
  # neighbour where sigma sits within ~1e-4 of a table boundary.
  assert np.abs(idx.astype(int) - ref).max() <= 1
  assert np.mean(idx != ref) < 1e-3
  assert len(np.unique(idx)) > 10  # a realistic spread of tables
  # Batch-invariant and deterministic.
  two = indexer(np.concatenate([z_sym, z_sym[:, ::-1]]))
  np.testing.assert_array_equal(two[:1], idx)
  np.testing.assert_array_equal(two[1:], indexer(z_sym[:, ::-1]))


def test_hostile_symbols_saturate_instead_of_overflowing(calibrated):
  params, z_sym, _, table = calibrated
  indexer = entropy_tables.scale_indexer(params, table)
  for v in (2**31 - 1, -(2**31), 2**20):
    idx = indexer(np.full_like(z_sym, v))
    assert idx.min() >= 0 and idx.max() < len(table)
    np.testing.assert_array_equal(idx, indexer(np.full_like(z_sym, v)))


def test_the_floor_maps_as_the_float_clamp_does(calibrated):
  """sigma at the float32 clamp (0.1f > 0.1) takes table 1, as
  searchsorted on the float path gives."""
  params, z_sym, _, table = calibrated
  indexer = entropy_tables.scale_indexer(params, table)
  assert indexer.floor_index == coding_tables.scale_indexes(
    np.float32(SCALE_MIN), table
  )
  assert indexer.floor_index == 1


def test_digest_names_the_integers(calibrated):
  params, _, _, table = calibrated
  base = entropy_tables.scale_indexer(params, table).digest()
  assert (
    len(base) == 16
    and entropy_tables.scale_indexer(params, table).digest() == base
  )
  other = jax.tree.map(np.array, params)
  other["context_fn"]["hyper_dec_2_0"]["kernel"][0, 0, 0, -1] *= 1.5
  assert entropy_tables.scale_indexer(other, table).digest() != base
  # mu's half of the last layer does not select tables.
  mu_only = jax.tree.map(np.array, params)
  mu_only["context_fn"]["hyper_dec_2_0"]["kernel"][0, 0, 0, 0] *= 1.5
  assert entropy_tables.scale_indexer(mu_only, table).digest() == base


def test_non_finite_weights_are_refused(calibrated):
  params, _, _, table = calibrated
  bad = jax.tree.map(np.array, params)
  bad["context_fn"]["hyper_dec_0_0"]["bias"][3] = np.nan
  with pytest.raises(ValueError, match="not all finite"):
    entropy_tables.scale_indexer(bad, table)
  with pytest.raises(ValueError, match="increase strictly"):
    entropy_tables.scale_indexer(params, table[::-1])


def test_h_s_layers_match_the_module(calibrated):
  """The geometry the integer path reads is the module's: the float
  convs it describes reproduce h_s."""
  params, z_sym, sigma, _ = calibrated
  med = np.asarray(params["context_fn"]["prior"]["medians"])
  h = jnp.asarray(z_sym + med, jnp.float32)
  layers = h_s_layers(params["context_fn"])
  for i, (kernel, bias, dilation, padding) in enumerate(layers):
    h = jax.lax.conv_general_dilated(
      h,
      jnp.asarray(kernel),
      (1, 1),
      (padding, padding),
      lhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ) + jnp.asarray(bias)
    if i < len(layers) - 1:
      h = jax.nn.leaky_relu(h, 0.2)
  c = h.shape[-1] // 2
  np.testing.assert_allclose(
    np.maximum(np.asarray(h[..., c:]), SCALE_MIN), sigma, rtol=1e-5, atol=1e-6
  )
