"""Image quality and rate metrics on uint8 images."""

from __future__ import annotations

import math

import numpy as np


def psnr(a_u8, b_u8) -> float:
  """PSNR in dB between two uint8 images (peak 255); inf if identical."""
  a = np.asarray(a_u8, np.float64)
  b = np.asarray(b_u8, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
  mse = float(np.mean(np.square(a - b)))
  return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def bpp(num_bytes: int, height: int, width: int) -> float:
  """Bits per pixel of a file of ``num_bytes`` for an H x W image."""
  return num_bytes * 8.0 / (height * width)
