"""FID and KID with the HiFiC / MS-ILLM patch protocol ("FID/256").

::

  image uint8 [H, W, 3]
    -> patches: 256x256 tiles at stride 256 from (0, 0), the remainder at
       the right and bottom dropped; then, when H >= 384 and W >= 384, the
       same tiling of the image cropped by 128 px at the top and left
       (tiles at (128 + 256 i, 128 + 256 j))       [N, 256, 256, 3] uint8
    -> features: InceptionV3 (FID variant, TF1 resize to 299), jitted, in
       batches                                        [N, 2048] float32
    -> fid(real, fake):  Frechet distance of the two Gaussians (float64)
       kid(real, fake):  unbiased MMD^2, cubic polynomial kernel, mean and
                         std over random subsets

As NeuralCompression's ``update_patch_fid`` (HiFiC, Mentzer et al. 2020;
MS-ILLM): both passes go into the same statistics, for the originals and
for the reconstructions alike. Kodak (768x512) gives 6 + 2 = 8 patches an
image, 192 in all: too few for a stable FID (HiFiC and MS-ILLM report FID
on CLIC2020, DIV2K and COCO).

FID as torch-fidelity 0.4.0 and pytorch-fid: ``||mu1 - mu2||^2 + tr S1 +
tr S2 - 2 tr sqrt(S1 S2)`` with mean and covariance (ddof 1) in float64;
``tr sqrt(S1 S2)`` from symmetric eigensolves (``trace_sqrt_product``),
equal to torch-fidelity's ``eigvals`` form and to ``scipy.linalg.sqrtm``
up to round-off. KID follows torch-fidelity's defaults: kernel
``(x.y / d + 1)^3``, 100 subsets of 1000 (clipped to the smaller feature
count), drawn with ``np.random.RandomState(seed)`` in torch-fidelity's
order, so ``kid(..., seed=2020)`` reproduces its numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from cdc_jax import model_dir
from cdc_jax.models import inception as inc
from cdc_jax.models.inception import InceptionWeightsError, fetch_hint

PATCH = 256
__all__ = [
  "Extractor",
  "InceptionWeightsError",
  "fetch_hint",
  "features",
  "fid",
  "frechet_distance",
  "kid",
  "load_inception",
  "patch_features",
  "patch_positions",
  "patches",
  "statistics",
  "trace_sqrt_product",
]


class Extractor:
  """InceptionV3 pool3 features: ``ex(images_u8 [B, H, W, 3]) -> [B, 2048]``.

  ``variables``: ``{"params", "batch_stats"}`` of ``models.inception``.
  One compile per input shape; runs on JAX's default device.
  """

  def __init__(self, variables, precision=inc.HIGHEST):
    self.variables = variables
    self.model = inc.InceptionV3(precision=precision)
    self._fn = jax.jit(self.model.apply)

  def __call__(self, images) -> jax.Array:
    """[B, 2048] float32, dispatched asynchronously (``np.asarray`` it)."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(
        f"Inception features need uint8 images [B, H, W, 3], got "
        f"{x.dtype} {x.shape}"
      )
    return self._fn(self.variables, x)


def load_inception(path: str, precision=inc.HIGHEST) -> Extractor:
  """The FID extractor from a weights file: the ``.npz`` of
  ``python -m cdc_jax.convert inception`` (``models.inception``
  reads it) or the torch-fidelity / pytorch-fid ``.pth`` itself
  (converted in memory by ``cdc_jax.convert.inception``; needs torch).
  Raises ``InceptionWeightsError`` (one line: the file, how to get it)."""
  from cdc_jax.convert import inception as convert_inception  # torch: lazy

  flat = convert_inception.load_variables(path)  # .npz or .pth, by content
  variables = jax.device_put(model_dir.unflatten(flat))
  return Extractor(variables, precision)


def patch_positions(
  height: int, width: int, size: int = PATCH, shifted: bool = True
) -> list[tuple[int, int]]:
  """(top, left) of every patch, row-major, the unshifted pass first.

  Pass 1: ``(size * i, size * j)`` for ``i < H // size``, ``j < W //
  size``. Pass 2 (``shifted`` and ``H, W >= 1.5 size``): ``(size // 2 +
  size * i, size // 2 + size * j)`` for ``i < (H - size // 2) // size``,
  ``j < (W - size // 2) // size``.
  """
  out = [
    (size * i, size * j)
    for i in range(height // size)
    for j in range(width // size)
  ]
  if shifted and 2 * height >= 3 * size and 2 * width >= 3 * size:
    o = size // 2
    out += [
      (o + size * i, o + size * j)
      for i in range((height - o) // size)
      for j in range((width - o) // size)
    ]
  return out


def patches(img_u8, size: int = PATCH, shifted: bool = True) -> np.ndarray:
  """The protocol's patches of one image: [N, size, size, 3] uint8.

  Order as ``patch_positions``; N = 0 for an image smaller than ``size``.
  """
  img = np.asarray(img_u8)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(
      f"patches need a uint8 image [H, W, 3], got {img.dtype} {img.shape}"
    )
  pos = patch_positions(img.shape[0], img.shape[1], size, shifted)
  out = np.empty((len(pos), size, size, 3), np.uint8)
  for n, (t, left) in enumerate(pos):
    out[n] = img[t : t + size, left : left + size]
  return out


def _as_batches(items: Iterable, batch: int) -> Iterator[np.ndarray]:
  """Items ([H, W, 3] or [N, H, W, 3]) -> batches of <= ``batch`` images
  of one shape (a shape change flushes the batch)."""
  buf: list[np.ndarray] = []
  for item in items:
    a = np.asarray(item)
    a = a[None] if a.ndim == 3 else a
    for img in a:
      if buf and (len(buf) == batch or img.shape != buf[0].shape):
        yield np.stack(buf)
        buf = []
      buf.append(img)
  if buf:
    yield np.stack(buf)


def features(
  extractor: Extractor,
  images: Iterable,
  batch: int = 32,
  total: int | None = None,
  progress: bool = True,
  desc: str = "Inception features",
) -> np.ndarray:
  """Pool3 features of every image: [N, 2048] float32, in input order.

  ``images`` yields uint8 ``[H, W, 3]`` images or ``[n, H, W, 3]`` stacks
  (e.g. ``patches(img)`` per image). Short batches are zero-padded to
  ``batch`` so a shape compiles once. ``total`` (images) sizes the tqdm
  bar on stderr.
  """
  if batch < 1:
    raise ValueError(f"feature batch must be >= 1, got {batch}")
  bar = tqdm(
    total=total, desc=desc, unit="img", disable=not progress, leave=False
  )
  out = []
  with bar:
    for b in _as_batches(images, batch):
      n = len(b)
      if n < batch:
        b = np.concatenate([b, np.zeros((batch - n,) + b.shape[1:], b.dtype)])
      out.append(extractor(b)[:n])  # device arrays: the host runs ahead
      bar.update(n)
  if not out:
    return np.zeros((0, inc.FEATURES), np.float32)
  return np.concatenate([np.asarray(o, np.float32) for o in out])


def patch_features(
  extractor, images, size: int = PATCH, shifted: bool = True, **kw
) -> np.ndarray:
  """Features of the protocol's patches of a sequence of uint8 images:
  ``features(extractor, (patches(im) for im in images), total=..., **kw)``.
  ``images`` is read twice (patch count, then pixels): a sequence.
  """
  if iter(images) is images:
    raise TypeError(
      "patch_features needs a sequence of images, not an iterator"
    )
  total = sum(
    len(patch_positions(im.shape[0], im.shape[1], size, shifted))
    for im in images
  )
  stream = (patches(im, size, shifted) for im in images)
  return features(extractor, stream, total=total, **kw)


def statistics(feats) -> tuple[np.ndarray, np.ndarray]:
  """Mean [d] and covariance [d, d] (ddof 1) of features, float64."""
  f = np.asarray(feats, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(
      f"FID needs at least 2 feature vectors [N, d], got shape {f.shape}"
    )
  return f.mean(axis=0), np.cov(f, rowvar=False)


def psd_sqrt(sigma) -> np.ndarray:
  """``S^1/2`` of a covariance matrix (symmetric PSD), float64; negative
  round-off eigenvalues clipped to 0."""
  w, u = np.linalg.eigh(np.asarray(sigma, np.float64))
  return (u * np.sqrt(np.clip(w, 0, None))) @ u.T


def trace_sqrt_product(sigma1, sigma2, sigma1_sqrt=None) -> float:
  """``tr sqrt(S1 S2)`` for covariance matrices (PSD), float64.

  S1 S2 is similar to the symmetric PSD ``R S2 R`` with ``R = S1^1/2``, so
  the trace is the sum of the square roots of that matrix's eigenvalues
  (negative round-off clipped to 0): two symmetric eigensolves, faster and
  steadier than ``eigvals(S1 S2)`` (torch-fidelity) or ``sqrtm(S1 S2)``
  (pytorch-fid), equal to them up to round-off. ``sigma1_sqrt``:
  ``psd_sqrt(sigma1)`` when the caller has it (one reference set against
  many), saving one of the eigensolves.
  """
  r = psd_sqrt(sigma1) if sigma1_sqrt is None else sigma1_sqrt
  m = r @ np.asarray(sigma2, np.float64) @ r
  e = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(e, 0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, sigma1_sqrt=None) -> float:
  """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), float64:
  ``||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)``
  (``sigma1_sqrt``: see ``trace_sqrt_product``)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0] if mu1.ndim == 1 else -1
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (d, d):
    raise ValueError(
      f"FID statistics must be mu [d], sigma [d, d] alike, got "
      f"{mu1.shape} {s1.shape} and {mu2.shape} {s2.shape}"
    )
  diff = mu1 - mu2
  root = trace_sqrt_product(s1, s2, sigma1_sqrt)
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * root)


def fid(feat_a, feat_b) -> float:
  """FID between two feature sets [N, d] and [M, d]."""
  return frechet_distance(*statistics(feat_a), *statistics(feat_b))


def _poly(x, y, gamma: float, coef0: float, degree: int) -> np.ndarray:
  return (x @ y.T * gamma + coef0) ** degree


def _mmd2(kxx, kxy, kyy) -> float:
  """Unbiased MMD^2 from kernel matrices of two samples of size m."""
  m = len(kxx)
  off = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
  return float(off / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kid(
  feat_a,
  feat_b,
  subsets: int = 100,
  subset_size: int = 1000,
  seed: int = 0,
  degree: int = 3,
  coef0: float = 1.0,
  max_gram: int = 4096,
) -> tuple[float, float]:
  """KID: (mean, std) of the unbiased MMD^2 over ``subsets`` random pairs
  of subsets (each drawn without replacement), kernel ``(x.y / d +
  coef0)^degree``, float64.

  ``subset_size`` is clipped to the smaller feature count. Up to
  ``max_gram`` features a side the kernel matrices are computed once and
  indexed; beyond, per subset (same numbers, less memory).
  """
  a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"KID needs features [N, d], [M, d]: {a.shape} {b.shape}")
  m = min(subset_size, len(a), len(b))
  if m < 2 or subsets < 1:
    raise ValueError(
      f"KID needs >= 2 features a side and >= 1 subset, got {len(a)}, "
      f"{len(b)} features and {subsets} subsets"
    )
  k = dict(gamma=1.0 / a.shape[1], coef0=coef0, degree=degree)
  rng = np.random.RandomState(seed)
  full = max(len(a), len(b)) <= max_gram
  if full:
    kaa, kab, kbb = _poly(a, a, **k), _poly(a, b, **k), _poly(b, b, **k)
  mmds = np.empty(subsets)
  for s in range(subsets):
    i = rng.choice(len(a), m, replace=False)
    j = rng.choice(len(b), m, replace=False)
    if full:
      kxx, kxy, kyy = kaa[np.ix_(i, i)], kab[np.ix_(i, j)], kbb[np.ix_(j, j)]
    else:
      x, y = a[i], b[j]
      kxx, kxy, kyy = _poly(x, x, **k), _poly(x, y, **k), _poly(y, y, **k)
    mmds[s] = _mmd2(kxx, kxy, kyy)
  return float(mmds.mean()), float(mmds.std())
