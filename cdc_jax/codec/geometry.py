"""Image geometry of the codec: padding to the model's downsampling factor.

Images of any size are padded at the bottom and right (edge replicate) to
multiples of the model's factor (64 for the released models); the header
keeps the original size and the decoder crops back to it.
"""

from __future__ import annotations

import math

import numpy as np


def padded_size(h: int, w: int, factor: int) -> tuple[int, int]:
  """(height, width) rounded up to multiples of ``factor``."""
  return math.ceil(h / factor) * factor, math.ceil(w / factor) * factor


def pad_image(img: np.ndarray, factor: int) -> np.ndarray:
  """Edge-replicate padding (bottom/right) to multiples of ``factor``."""
  h, w, _ = img.shape
  hp, wp = padded_size(h, w, factor)
  return np.pad(img, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
