"""Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) in JAX, batched.

The conventions are those of ``pytorch_msssim.ms_ssim(X, Y, data_range=255,
size_average=False)``, which CompressAI and the learned-compression papers
report:

- an 11-tap Gaussian window (sigma 1.5) applied separably with "valid"
  borders (no padding), K1 = 0.01, K2 = 0.03, data range 255;
- SSIM and contrast-structure (cs) maps averaged per image and channel;
- between scales a 2x2 average pool; a side of odd length is first padded
  with one zero on the top/left and the zero counts in the mean (as
  ``avg_pool2d(kernel_size=2, padding=side % 2)`` does);
- MS-SSIM = prod_s relu(cs_s)^w_s for the first scales times
  relu(ssim_last)^w_last, per channel, then the mean over channels, with
  the weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333).

Images smaller than the last scale's window are rejected: 5 scales with an
11-px window need both sides >= (11 - 1) * 2**4 + 1 = 161 px, the bound that
``pytorch_msssim`` asserts (side > 160). ``batch_ms_ssim`` raises a
ValueError naming the size (at trace time, so inside a caller's jit too).

Precision: float32 throughout. The window sums are written as shifted slices
(elementwise multiply-adds) rather than convolutions, so that no backend
silently lowers them to TF32/bfloat16 passes, and the variances are computed
on images shifted by -128, which quarters the cancellation in
E[x^2] - E[x]^2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WIN_SIZE = 11
WIN_SIGMA = 1.5
K1, K2 = 0.01, 0.03
DATA_RANGE = 255.0
_SHIFT = 128.0  # mid-range; variances do not depend on it, precision does


def min_side(levels: int = len(WEIGHTS), win_size: int = WIN_SIZE) -> int:
  """The smallest image side MS-SSIM accepts: the last of ``levels`` scales
  must still hold one ``win_size`` window (161 px for 5 scales, 11 px)."""
  return (win_size - 1) * 2 ** (levels - 1) + 1


def gaussian_window(size: int = WIN_SIZE, sigma: float = WIN_SIGMA):
  """The normalised 1-D Gaussian window, float32 [size], centred."""
  x = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-(x**2) / (2.0 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _filter(x, win):
  """Valid separable filtering of [N, H, W, C] along H then W."""
  k = win.shape[0]
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  x = sum(win[i] * x[:, i : i + h] for i in range(k))  # [N, h, W, C]
  return sum(win[i] * x[:, :, i : i + w] for i in range(k))  # [N, h, w, C]


def _pool(x):
  """2x2 average pool of [N, H, W, C]; an odd side gets one leading zero."""
  _, h, w, _ = x.shape
  x = jnp.pad(x, ((0, 0), (h % 2, 0), (w % 2, 0), (0, 0)))
  n, h, w, c = x.shape
  x = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return x.sum(axis=(2, 4)) * 0.25


def _ssim_cs(x, y, win):
  """Per image and channel means of the SSIM and cs maps, each [N, C]."""
  c1 = (K1 * DATA_RANGE) ** 2
  c2 = (K2 * DATA_RANGE) ** 2
  xc, yc = x - _SHIFT, y - _SHIFT
  stats = jnp.concatenate([xc, yc, xc * xc, yc * yc, xc * yc], axis=-1)
  mx, my, sxx, syy, sxy = jnp.split(_filter(stats, win), 5, axis=-1)
  var_x = sxx - mx * mx
  var_y = syy - my * my
  cov = sxy - mx * my
  cs_map = (2.0 * cov + c2) / (var_x + var_y + c2)
  # (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), written as 1 - d^2 / (...)
  # so that the difference of the means is taken before rounding.
  mu_x, mu_y = mx + _SHIFT, my + _SHIFT
  lum = 1.0 - (mx - my) ** 2 / (mu_x * mu_x + mu_y * mu_y + c1)
  return (lum * cs_map).mean(axis=(1, 2)), cs_map.mean(axis=(1, 2))


def check_size(height: int, width: int, levels: int = len(WEIGHTS)) -> None:
  """Raises ValueError when an H x W image is too small for MS-SSIM."""
  need = min_side(levels)
  if min(height, width) < need:
    raise ValueError(
      f"MS-SSIM with {levels} scales and an {WIN_SIZE}x{WIN_SIZE} window "
      f"needs both image sides >= {need} px, got {height}x{width}; "
      "evaluate on larger images (or report PSNR only)"
    )


@functools.partial(jax.jit, static_argnames=("weights",))
def batch_ms_ssim(a, b, weights=WEIGHTS):
  """MS-SSIM of each image pair: ``a``, ``b`` [B, H, W, C] on the 0..255
  scale (uint8, or float already rounded) -> float32 [B] in [0, 1].

  ``weights`` (a tuple, one per scale) defaults to the standard 5-scale
  weights; both sides must be >= ``min_side(len(weights))``.
  """
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"ms_ssim: need equal [B, H, W, C], {a.shape} {b.shape}")
  check_size(a.shape[1], a.shape[2], len(weights))
  win = jnp.asarray(gaussian_window())
  x, y = a.astype(jnp.float32), b.astype(jnp.float32)
  factors = []
  for level, w in enumerate(weights):
    ssim, cs = _ssim_cs(x, y, win)
    if level < len(weights) - 1:
      factors.append(jax.nn.relu(cs) ** w)
      x, y = _pool(x), _pool(y)
    else:
      factors.append(jax.nn.relu(ssim) ** w)
  return functools.reduce(jnp.multiply, factors).mean(axis=-1)
