"""Tests of cdc_jax.eval.metrics and cdc_jax.eval.ms_ssim: parity with
pytorch_msssim (when installed) and a float64 PSNR, and known properties.

Shapes are few on purpose (each [B, H, W] compiles once): 161x175 is the
smallest MS-SSIM accepts and odd at every scale, 176x192 even at every one.
"""

import io
import math

import jax
import numpy as np
import pytest
from PIL import Image

from cdc_jax.eval import metrics
from cdc_jax.eval.ms_ssim import batch_ms_ssim, min_side
from cdc_jax.testing import photo

ODD = (161, 175)
EVEN = (176, 192)


def _jpeg(img, quality):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=quality)
  return np.asarray(Image.open(buf).convert("RGB"))


def _noisy(img, sigma, seed=0):
  rng = np.random.default_rng(seed)
  return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def _pairs(name, size):
  """A batch of 4 (reference, distorted) pairs: a natural photo against
  JPEG q10, JPEG q75 and noise, and uniform noise against noise."""
  nat = photo(name, size=size)
  rnd = np.random.default_rng(1).integers(0, 256, nat.shape, dtype=np.uint8)
  a = np.stack([nat, nat, nat, rnd])
  b = np.stack(
    [_jpeg(nat, 10), _jpeg(nat, 75), _noisy(nat, 8), _noisy(rnd, 30)]
  )
  return a, b


@pytest.fixture(scope="module")
def odd_pairs():
  return _pairs("astronaut", ODD)


@pytest.fixture(scope="module")
def even_pairs():
  return _pairs("coffee", EVEN)


def _reference_ms_ssim(a, b):
  """pytorch_msssim in float64 (its float32 result is itself ~1e-6 off)."""
  torch = pytest.importorskip("torch")
  pytorch_msssim = pytest.importorskip("pytorch_msssim")

  def t(x):
    return torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)

  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # many threads on a busy machine: 10x slower
  try:
    out = pytorch_msssim.ms_ssim(t(a), t(b), data_range=255, size_average=False)
  finally:
    torch.set_num_threads(threads)
  return out.numpy()


@pytest.mark.parametrize("which", ["odd_pairs", "even_pairs"])
def test_ms_ssim_matches_pytorch_msssim(which, request):
  a, b = request.getfixturevalue(which)
  want = _reference_ms_ssim(a, b)
  got = metrics.ms_ssim(a, b)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
  np.testing.assert_allclose(
    metrics.ms_ssim_db(a, b), -10 * np.log10(1 - want), rtol=1e-4
  )


def test_psnr_matches_float64_formula(odd_pairs, even_pairs):
  for a, b in (odd_pairs, even_pairs):
    d = a.astype(np.float64) - b.astype(np.float64)
    want = 10 * np.log10(255.0**2 / np.mean(d * d, axis=(1, 2, 3)))
    np.testing.assert_allclose(metrics.psnr(a, b), want, rtol=0, atol=1e-5)


def test_identical_images(odd_pairs):
  a, _ = odd_pairs
  assert np.all(np.isinf(metrics.psnr(a, a)))
  np.testing.assert_array_equal(metrics.ms_ssim(a, a), 1.0)
  assert np.all(np.isinf(metrics.ms_ssim_db(a, a)))


def test_psnr_of_a_known_mse():
  rng = np.random.default_rng(0)
  a = rng.integers(20, 236, (48, 40, 3), dtype=np.uint8)
  sign = rng.choice([-3, 3], a.shape)
  b = (a.astype(int) + sign).astype(np.uint8)  # MSE exactly 9
  assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 9))
  # One value off by 255 among n: MSE 255^2 / n, PSNR 10 log10(n).
  z, zc = np.zeros_like(a), np.zeros_like(a)
  zc[3, 5, 1] = 255
  assert metrics.psnr(z, zc) == pytest.approx(10 * math.log10(a.size))


def test_ms_ssim_is_symmetric(odd_pairs):
  a, b = odd_pairs
  np.testing.assert_allclose(
    metrics.ms_ssim(a, b), metrics.ms_ssim(b, a), rtol=0, atol=1e-7
  )


def test_quality_falls_as_noise_grows():
  nat = photo("astronaut", size=ODD)
  noisy = np.stack([_noisy(nat, s, seed=s) for s in (2, 6, 15, 40)])
  ref = np.broadcast_to(nat, noisy.shape)
  ssim = metrics.ms_ssim(ref, noisy)
  psnr = metrics.psnr(ref, noisy)
  assert np.all(np.diff(ssim) < 0) and np.all(np.diff(psnr) < 0), (ssim, psnr)
  assert np.all((ssim > 0) & (ssim < 1))


def test_a_batch_is_its_images(odd_pairs):
  a, b = odd_pairs
  batch_ssim, batch_psnr = metrics.ms_ssim(a, b), metrics.psnr(a, b)
  assert batch_ssim.shape == batch_psnr.shape == (4,)
  for i in range(len(a)):
    one_ssim, one_psnr = metrics.ms_ssim(a[i], b[i]), metrics.psnr(a[i], b[i])
    assert isinstance(one_ssim, float) and isinstance(one_psnr, float)
    assert one_ssim == pytest.approx(batch_ssim[i], rel=1e-6)
    assert one_psnr == pytest.approx(batch_psnr[i], rel=1e-6)
  # The dataset PSNR convention: the mean of per-image values.
  assert np.mean(batch_psnr) == pytest.approx(
    np.mean([metrics.psnr(x, y) for x, y in zip(a, b, strict=True)])
  )


def test_too_small_for_ms_ssim_names_the_size():
  assert min_side() == 161
  img = photo("astronaut", size=(160, 200))
  with pytest.raises(ValueError, match=r"161 px, got 160x200"):
    metrics.ms_ssim(img, img)
  with pytest.raises(ValueError, match=r"got 160x200"):  # inside a jit too
    jax.jit(lambda x: batch_ms_ssim(x, x))(img[None])
  assert math.isinf(metrics.psnr(img, img))  # PSNR has no size limit


def test_input_errors():
  u8 = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="expected uint8"):
    metrics.psnr(u8, u8.astype(np.float32))
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.ms_ssim(u8, u8[:4])
  with pytest.raises(ValueError, match=r"\[H, W, C\]"):
    metrics.psnr(u8[..., 0], u8[..., 0])


def test_batch_psnr_inside_a_jit(even_pairs):
  a, b = even_pairs
  mean = jax.jit(lambda x, y: metrics.batch_psnr(x, y).mean())(a, b)
  assert float(mean) == pytest.approx(np.mean(metrics.psnr(a, b)), rel=1e-6)


def test_to_db():
  assert metrics.to_db(0.99) == pytest.approx(20.0)
  assert math.isinf(metrics.to_db(1.0))
  np.testing.assert_allclose(metrics.to_db(np.array([0.9, 0.999])), [10, 30])


def test_bpp_counts_every_byte_of_the_file(tmp_path):
  path = tmp_path / "x.bin"
  path.write_bytes(b"\0" * 1234)
  assert metrics.file_bpp(str(path), 16, 32) == 1234 * 8 / (16 * 32)
  assert metrics.bpp(1000, 100, 80) == 1.0
