"""FID/KID (cdc_jax.eval.fid): the patch protocol, known values, and
torch-fidelity's own functions where installed. No Inception here (see
test_inception.py): a stand-in extractor tests the batching."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from cdc_jax.eval import fid as F


def _coords_image(h, w):
  """uint8 [h, w, 3]: channel 0 = row // 2, 1 = col // 4, 2 = noise."""
  rng = np.random.default_rng(h * w)
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0] = (np.arange(h) // 2)[:, None] % 256
  img[..., 1] = (np.arange(w) // 4)[None, :] % 256
  img[..., 2] = rng.integers(0, 256, (h, w))
  return img


# --- the patch protocol ----------------------------------------------------


def test_patch_positions_kodak():
  # Landscape Kodak, H=512, W=768: 2x3 tiles, then the 128-px-shifted pass
  # on the 384x640 crop: 1x2 tiles. 8 patches, 24 images -> 192.
  pos = F.patch_positions(512, 768)
  assert pos == [
    (0, 0), (0, 256), (0, 512), (256, 0), (256, 256), (256, 512),
    (128, 128), (128, 384),
  ]  # fmt: skip
  assert len(F.patch_positions(768, 512)) == 8  # portrait
  assert len(F.patch_positions(512, 768, shifted=False)) == 6


@pytest.mark.parametrize(
  "hw, n",
  [
    ((255, 1000), 0),  # shorter than a patch
    ((256, 256), 1),  # too small for the shifted pass
    ((383, 1024), 4),  # 383 < 384: no shifted pass
    ((384, 384), 1 + 1),
    ((384, 768), 3 + 2),
    ((768, 768), 9 + 4),  # DIV2K crop
    ((1000, 1500), 15 + 15),
  ],
)
def test_patch_counts(hw, n):
  h, w = hw
  got = F.patch_positions(h, w)
  assert len(got) == n
  assert len(set(got)) == n
  assert all(t + 256 <= h and left + 256 <= w for t, left in got)


def test_patches_content_and_order():
  img = _coords_image(520, 700)
  p = F.patches(img)
  pos = F.patch_positions(520, 700)
  assert p.shape == (len(pos), 256, 256, 3) and p.dtype == np.uint8
  for patch, (t, left) in zip(p, pos, strict=True):
    np.testing.assert_array_equal(patch, img[t : t + 256, left : left + 256])
  assert F.patches(_coords_image(100, 300)).shape == (0, 256, 256, 3)
  with pytest.raises(ValueError, match="uint8 image"):
    F.patches(img.astype(np.float32))


def test_patches_match_neuralcompression_unfold():
  """Same patches, same order, as F.unfold on NCHW (update_patch_fid)."""
  torch = pytest.importorskip("torch")
  img = _coords_image(640, 900)
  x = torch.from_numpy(img).permute(2, 0, 1)[None].float()

  def tiles(t):
    u = torch.nn.functional.unfold(t, kernel_size=256, stride=256)
    return u.permute(0, 2, 1).reshape(-1, 3, 256, 256)

  want = torch.cat([tiles(x), tiles(x[:, :, 128:, 128:])])
  want = want.permute(0, 2, 3, 1).numpy().astype(np.uint8)
  np.testing.assert_array_equal(F.patches(img), want)


# --- batching (stand-in extractor) ----------------------------------------


class _MeanExtractor:
  """[B, H, W, 3] -> [B, 2048]: each image's mean and its size; records
  every batch shape it was called with."""

  def __init__(self):
    self.shapes = []

  def __call__(self, b):
    self.shapes.append(b.shape)
    m = b.reshape(len(b), -1).mean(axis=1, dtype=np.float64)
    out = np.zeros((len(b), 2048), np.float32)
    out[:, 0], out[:, 1] = m, b.shape[1] * b.shape[2]
    return out


def test_features_batches_in_order():
  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  big = rng.integers(0, 256, (3, 16, 12, 3), dtype=np.uint8)
  items = [small[:2], small[2], big, small[3:]]  # stacks and single images
  ex = _MeanExtractor()
  out = F.features(ex, items, batch=2, progress=False)
  order = [small[0], small[1], small[2], *big, small[3], small[4]]
  np.testing.assert_allclose(out[:, 0], [im.mean() for im in order], 1e-6)
  np.testing.assert_array_equal(out[:, 1], [im.shape[0] * im.shape[1]
                                            for im in order])  # fmt: skip
  # Every call is a full batch (short ones zero-padded): one compile each.
  assert {s[0] for s in ex.shapes} == {2}
  assert F.features(ex, [], progress=False).shape == (0, 2048)
  with pytest.raises(ValueError, match="batch"):
    F.features(ex, items, batch=0)


def test_patch_features_counts():
  imgs = [_coords_image(512, 768), _coords_image(300, 300)]
  ex = _MeanExtractor()
  out = F.patch_features(ex, imgs, batch=4, progress=False)
  assert out.shape == (8 + 1, 2048)
  want = [p.mean() for im in imgs for p in F.patches(im)]
  np.testing.assert_allclose(out[:, 0], want, 1e-6)
  with pytest.raises(TypeError, match="sequence"):
    F.patch_features(ex, iter(imgs))


# --- FID -------------------------------------------------------------------


def _with_moments(n, mean, cov, seed):
  """n samples whose *sample* mean and covariance (ddof 1) are exact."""
  d = len(mean)
  z = np.random.default_rng(seed).standard_normal((n, d))
  z -= z.mean(axis=0)
  z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
  return z @ np.linalg.cholesky(cov).T + mean


def _random_cov(d, seed):
  a = np.random.default_rng(seed).standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_identical_sets_is_zero():
  a = np.random.default_rng(0).standard_normal((200, 16)) * 5
  assert abs(F.fid(a, a)) < 1e-9
  assert F.fid(a, a + 0.5) == pytest.approx(16 * 0.25, rel=1e-9)


def test_fid_diagonal_gaussians_closed_form():
  d = 12
  m1, m2 = np.linspace(0, 1, d), np.linspace(1, -1, d)
  v1, v2 = np.linspace(0.5, 2, d), np.linspace(3, 0.2, d)
  a = _with_moments(400, m1, np.diag(v1), 1)
  b = _with_moments(300, m2, np.diag(v2), 2)
  want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  assert F.fid(a, b) == pytest.approx(want, rel=1e-9)


def test_fid_general_covariances_vs_sqrtm():
  """Non-commuting covariances: vs the sqrtm form (pytorch-fid/TTUR)."""
  d = 10
  s1, s2 = _random_cov(d, 3), _random_cov(d, 4)
  m1, m2 = np.zeros(d), np.full(d, 0.3)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  want = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
  assert F.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)
  # The reference root computed once and passed in: the same distance.
  root = F.psd_sqrt(s1)
  np.testing.assert_allclose(root @ root, s1, atol=1e-12)
  got = F.frechet_distance(m1, s1, m2, s2, sigma1_sqrt=root)
  assert got == pytest.approx(want, rel=1e-9)
  a, b = _with_moments(100, m1, s1, 5), _with_moments(80, m2, s2, 6)
  assert F.fid(a, b) == pytest.approx(want, rel=1e-9)
  # Rank-deficient covariances (fewer samples than dimensions) stay finite.
  r = np.random.default_rng(7)
  assert np.isfinite(F.fid(r.normal(size=(6, d)), r.normal(size=(5, d))))


def test_fid_matches_torch_fidelity():
  torch = pytest.importorskip("torch")
  mf = pytest.importorskip("torch_fidelity.metric_fid")
  rng = np.random.default_rng(8)
  a = rng.standard_normal((300, 32))
  b = rng.standard_normal((250, 32)) * 1.2 + 0.1
  st = [mf.fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
  want = mf.fid_statistics_to_metric(*st, verbose=False)
  assert F.fid(a, b) == pytest.approx(
    want["frechet_inception_distance"], rel=1e-10
  )


def test_fid_errors():
  with pytest.raises(ValueError, match="at least 2"):
    F.fid(np.zeros((1, 4)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match="statistics"):
    F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- KID -------------------------------------------------------------------


def _kid_direct(a, b, subsets, m, seed):
  """KID by the definition, element by element (small sizes only)."""
  d = a.shape[1]

  def k(x, y):
    return (float(np.dot(x, y)) / d + 1.0) ** 3

  rng = np.random.RandomState(seed)
  vals = []
  for _ in range(subsets):
    x = a[rng.choice(len(a), m, replace=False)]
    y = b[rng.choice(len(b), m, replace=False)]
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    vals.append((xx + yy) / (m * (m - 1)) - 2 * xy / (m * m))
  return np.mean(vals), np.std(vals)


@pytest.mark.parametrize("max_gram", [4096, 0])  # full kernels / per subset
def test_kid_matches_direct_computation(max_gram):
  rng = np.random.default_rng(9)
  a = rng.standard_normal((40, 6))
  b = rng.standard_normal((30, 6)) + 0.4
  got = F.kid(a, b, subsets=5, subset_size=12, seed=3, max_gram=max_gram)
  want = _kid_direct(a, b, 5, 12, 3)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert got[0] > 0 and got[1] > 0


def test_kid_same_distribution_near_zero_and_clipped():
  rng = np.random.default_rng(10)
  a, b = rng.standard_normal((2, 400, 8))
  same = F.kid(a, b, subsets=10, subset_size=200)
  shifted = F.kid(a, b + 0.5, subsets=10, subset_size=200)
  assert abs(same[0]) < 0.02 * shifted[0]
  # Identical sets, subset size clipped to all 60: every subset is the full
  # set (std 0), and the unbiased estimator's known value for X = Y is
  # -2 (mean diagonal - mean off-diagonal kernel) / m.
  x = a[:60]
  mean, std = F.kid(x, x, subsets=3, subset_size=1000)
  k = (x @ x.T / 8 + 1) ** 3
  off = (k.sum() - np.trace(k)) / (60 * 59)
  assert mean == pytest.approx(-2 * (np.trace(k) / 60 - off) / 60, rel=1e-9)
  assert std < 1e-12 * abs(mean)


def test_kid_matches_torch_fidelity():
  torch = pytest.importorskip("torch")
  mk = pytest.importorskip("torch_fidelity.metric_kid")
  rng = np.random.default_rng(11)
  a = rng.standard_normal((150, 16))
  b = rng.standard_normal((120, 16)) * 1.1 + 0.2
  want = mk.kid_features_to_metric(
    torch.from_numpy(a),
    torch.from_numpy(b),
    kid_subsets=7,
    kid_subset_size=50,
    rng_seed=2020,
    verbose=False,
  )
  got = F.kid(a, b, subsets=7, subset_size=50, seed=2020)
  assert got == pytest.approx(
    (
      want["kernel_inception_distance_mean"],
      want["kernel_inception_distance_std"],
    ),
    rel=1e-9,
  )


def test_kid_errors():
  with pytest.raises(ValueError, match="KID needs"):
    F.kid(np.zeros((5, 4)), np.zeros((5, 3)))
  with pytest.raises(ValueError, match=">= 2 features"):
    F.kid(np.zeros((1, 4)), np.zeros((5, 4)))
