"""Image quality and rate metrics on uint8 images, as the field reports them.

- ``bpp``: bits per pixel of the real file bytes (header included).
- ``psnr``: RGB PSNR with peak 255 on uint8 images, one value per image; a
  data set's PSNR is the mean of the per-image values.
- ``ms_ssim``: MS-SSIM with the ``pytorch_msssim`` conventions (see
  ``cdc_jax.eval.ms_ssim``), one value per image; images need both sides
  >= 161 px.
- ``ms_ssim_db``/``to_db``: -10 log10(1 - MS-SSIM). For a data set, convert
  the mean MS-SSIM (``to_db(mean)``), as CompressAI's plots do, not the mean
  of per-image dB values.

``psnr``, ``ms_ssim`` and ``ms_ssim_db`` take a pair of uint8 images
[H, W, 3] (-> float) or batches [B, H, W, 3] (-> float64 numpy [B]); the
jitted ``batch_psnr``/``batch_ms_ssim`` take and return JAX arrays and can be
called inside a caller's jit (e.g. on ``to_uint8`` outputs during training).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax.eval.ms_ssim import batch_ms_ssim

PEAK = 255.0


@jax.jit
def batch_psnr(a, b):
  """PSNR in dB of each pair: ``a``, ``b`` [B, H, W, C] on the 0..255 scale
  -> float32 [B]; inf where a pair is identical."""
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"psnr: need equal [B, H, W, C], {a.shape} {b.shape}")
  d = a.astype(jnp.float32) - b.astype(jnp.float32)
  # Row sums first: each square of a uint8 difference is exact in float32
  # and short sums keep the rounding of the total small.
  rows = jnp.sum(d * d, axis=(2, 3))  # [B, H]
  mse = jnp.sum(rows, axis=1) / (a.shape[1] * a.shape[2] * a.shape[3])
  safe = jnp.where(mse > 0, mse, 1.0)
  return jnp.where(mse > 0, 10.0 * jnp.log10(PEAK**2 / safe), jnp.inf)


def _pair(a_u8, b_u8, name: str):
  """Validates a pair of uint8 images; returns them as [B, H, W, C] arrays
  and whether the caller passed single images."""
  a, b = np.asarray(a_u8), np.asarray(b_u8)
  for x in (a, b):
    if x.dtype != np.uint8:
      raise ValueError(
        f"{name}: expected uint8 images, got {x.dtype}; round the "
        "reconstruction to uint8 first (cdc_jax.imageio.to_uint8)"
      )
  if a.shape != b.shape:
    raise ValueError(f"{name}: shapes differ, {a.shape} vs {b.shape}")
  if a.ndim not in (3, 4):
    raise ValueError(f"{name}: need [H, W, C] or [B, H, W, C], got {a.shape}")
  single = a.ndim == 3
  if single:
    a, b = a[None], b[None]
  return a, b, single


def _out(values, single: bool):
  v = np.asarray(jax.device_get(values), np.float64)
  return float(v[0]) if single else v


def psnr(a_u8, b_u8):
  """PSNR in dB (peak 255) of uint8 images [H, W, C] -> float, or of
  batches [B, H, W, C] -> float64 [B]; inf where identical."""
  a, b, single = _pair(a_u8, b_u8, "psnr")
  return _out(batch_psnr(a, b), single)


def ms_ssim(a_u8, b_u8):
  """MS-SSIM (5 scales, data range 255) of uint8 images [H, W, C] -> float,
  or of batches [B, H, W, C] -> float64 [B]. Both sides must be >= 161 px
  (ValueError naming the size otherwise)."""
  a, b, single = _pair(a_u8, b_u8, "ms_ssim")
  return _out(batch_ms_ssim(a, b), single)


def to_db(ms_ssim_value):
  """-10 log10(1 - MS-SSIM) of a float or array (inf at MS-SSIM 1)."""
  v = np.asarray(ms_ssim_value, np.float64)
  with np.errstate(divide="ignore"):
    out = -10.0 * np.log10(np.maximum(1.0 - v, 0.0))
  return float(out) if out.ndim == 0 else out


def ms_ssim_db(a_u8, b_u8):
  """Per-image MS-SSIM in dB, -10 log10(1 - MS-SSIM); see ``to_db`` for
  data-set means."""
  return to_db(ms_ssim(a_u8, b_u8))


def bpp(num_bytes: int, height: int, width: int) -> float:
  """Bits per pixel of a file of ``num_bytes`` for an H x W image."""
  return num_bytes * 8.0 / (height * width)


def file_bpp(path: str, height: int, width: int) -> float:
  """Bits per pixel of the file at ``path`` (its whole size, header
  included) for an H x W image."""
  return bpp(os.path.getsize(path), height, width)
