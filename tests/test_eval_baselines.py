"""Tests of cdc_jax.eval.baselines: Pillow JPEG/WebP/AVIF files, sweeps and
the quality at a target bpp, on small natural photos."""

import numpy as np
import PIL.features
import pytest

from cdc_jax.eval import baselines, metrics
from cdc_jax.testing import photo

SMALL = (64, 96)  # PSNR only: under MS-SSIM's 161 px
LARGE = (176, 192)  # shares its compile with tests/test_eval_metrics.py
MAGIC = {
  "jpeg": lambda d: d[:3] == b"\xff\xd8\xff",
  "webp": lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP",
  "avif": lambda d: d[4:8] == b"ftyp" and b"avif" in d[8:32],
}


@pytest.fixture(scope="module")
def small():
  return photo("astronaut", size=SMALL, top=40, left=180)


@pytest.fixture(params=sorted(baselines.CODECS))
def codec(request):
  reason = baselines.unavailable_reason(request.param)
  if reason is not None:
    pytest.skip(reason)
  return request.param


def test_encode_writes_a_real_file_that_decodes(codec, small):
  data = baselines.encode(small, codec, 80)
  assert MAGIC[codec](data)
  out = baselines.decode(data)
  assert out.dtype == np.uint8 and out.shape == small.shape
  assert metrics.psnr(small, out) > metrics.psnr(
    small, baselines.decode(baselines.encode(small, codec, 5))
  )


def test_sweep_rows_are_real_sizes_and_metrics(codec, small):
  qualities = [10, 50, 90]
  rows = baselines.sweep(small, codec, qualities)
  assert [r["quality"] for r in rows] == qualities
  h, w, _ = small.shape
  for r, q in zip(rows, qualities, strict=True):
    data = baselines.encode(small, codec, q)
    assert r["codec"] == codec and r["bytes"] == len(data)
    assert r["bpp"] == len(data) * 8 / (h * w)
    assert r["psnr"] == pytest.approx(
      metrics.psnr(small, baselines.decode(data)), rel=1e-6
    )
    assert r["ms_ssim"] is None  # 64 px is too small for 5 scales
  assert np.all(np.diff([r["bpp"] for r in rows]) > 0)
  assert np.all(np.diff([r["psnr"] for r in rows]) > 0)


def test_sweep_measures_ms_ssim_on_large_enough_images():
  img = photo("coffee", size=LARGE)
  rows = baselines.sweep(img, "jpeg", [20, 80])
  dec = np.stack(
    [baselines.decode(baselines.encode(img, "jpeg", q)) for q in (20, 80)]
  )
  want = metrics.ms_ssim(np.stack([img, img]), dec)
  np.testing.assert_allclose([r["ms_ssim"] for r in rows], want, rtol=1e-6)
  assert rows[0]["ms_ssim"] < rows[1]["ms_ssim"] < 1


def test_at_bpp_finds_the_nearest_quality(codec, small):
  lo, hi = baselines.quality_range(codec)
  reach = baselines.sweep(small, codec, [lo, hi])
  # A rate a sweep actually produced comes back exactly.
  exact = baselines.sweep(small, codec, [37])[0]
  assert baselines.at_bpp(small, codec, exact["bpp"])["bpp"] == exact["bpp"]
  # Between two rates: no setting next to the answer is nearer.
  target = 0.4 * reach[0]["bpp"] + 0.6 * reach[1]["bpp"]
  row = baselines.at_bpp(small, codec, target)
  assert row["target_bpp"] == target and lo <= row["quality"] <= hi
  near = [q for q in (row["quality"] - 1, row["quality"] + 1) if lo <= q <= hi]
  for other in baselines.sweep(small, codec, near):
    assert abs(row["bpp"] - target) <= abs(other["bpp"] - target)
  # Out of reach: the ends of the quality range.
  assert baselines.at_bpp(small, codec, 1e-3)["quality"] == lo
  assert baselines.at_bpp(small, codec, 1e3)["quality"] == hi


def test_at_bpp_matches_an_exhaustive_search_for_jpeg(small):
  lo, hi = baselines.quality_range("jpeg")
  sizes = np.array(
    [len(baselines.encode(small, "jpeg", q)) for q in range(lo, hi + 1)]
  )
  bpps = sizes * 8 / (small.shape[0] * small.shape[1])
  for target in np.linspace(bpps[0], bpps[-1], 7):
    row = baselines.at_bpp(small, "jpeg", float(target))
    assert abs(row["bpp"] - target) == pytest.approx(
      np.min(np.abs(bpps - target))
    )


def test_unavailable_codec_says_why(monkeypatch, small):
  monkeypatch.setattr(PIL.features, "check", lambda feature: False)
  reason = baselines.unavailable_reason("avif")
  assert "without AVIF support" in reason and "pillow" in reason
  with pytest.raises(baselines.CodecUnavailable, match="without AVIF"):
    baselines.encode(small, "avif", 50)
  assert baselines.available() == []


def test_user_errors(small):
  with pytest.raises(ValueError, match="unknown codec 'bpg'"):
    baselines.encode(small, "bpg", 50)
  with pytest.raises(
    ValueError, match=r"quality must be an integer in \[1, 100\]"
  ):
    baselines.encode(small, "jpeg", 0)
  with pytest.raises(ValueError, match="uint8 RGB"):
    baselines.encode(small.astype(np.float32), "jpeg", 50)
  with pytest.raises(ValueError, match="cannot decode 5 bytes"):
    baselines.decode(b"hello")
  with pytest.raises(ValueError, match="no quality settings"):
    baselines.sweep(small, "jpeg", [])
