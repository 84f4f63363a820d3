"""Image metrics and conversions: bpp, PSNR, uint8 <-> [-1, 1]."""

from __future__ import annotations

import math

import numpy as np


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8, as the original saves images.

  clamp to [-1, 1], (x + 1) / 2, * 255 + 0.5, truncate
  (``torchvision.utils.save_image``).
  """
  x = np.clip(np.asarray(x, np.float32), -1.0, 1.0)
  return np.clip((x + 1.0) * 0.5 * 255.0 + 0.5, 0, 255).astype(np.uint8)


def to_float(img_u8) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (x / 255 * 2 - 1)."""
  return np.asarray(img_u8, np.float32) / 255.0 * 2.0 - 1.0


def psnr(a_u8, b_u8) -> float:
  """PSNR in dB between two uint8 images (peak 255); inf if identical."""
  a = np.asarray(a_u8, np.float64)
  b = np.asarray(b_u8, np.float64)
  mse = float(np.mean(np.square(a - b)))
  return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def bpp(num_bytes: int, height: int, width: int) -> float:
  """Bits per pixel of a file of ``num_bytes`` for an H x W image."""
  return num_bytes * 8.0 / (height * width)
