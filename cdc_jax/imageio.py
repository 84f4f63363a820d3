"""Images in and out: decoding files to uint8 RGB, writing files atomically,
and the model's pixel range.

* ``load_image``: any file Pillow reads -> uint8 [H, W, 3] (``ImageError``
  names the file and the problem).
* ``write_atomic`` / ``save_png``: a temporary file in the target folder,
  then a rename, so a failure never leaves a partial file.
* ``to_float`` / ``to_uint8``: uint8 <-> the model's [-1, 1] floats, the
  latter as the original saves images.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)


class ImageError(ValueError):
  """An image file is missing, unreadable or unusable.

  Attributes:
    path: the offending file (or source item name).
  """

  def __init__(self, path: str, problem: str):
    self.path = str(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}")


def _to_uint8_gray(a: np.ndarray, mode: str) -> np.ndarray:
  """Maps a single-channel array of a wide Pillow mode to uint8."""
  if mode.startswith("I;16"):
    # Full 16-bit range: 65535 -> 255. 257 = 65535 / 255; rounding
    # gives the nearest 8-bit level, where >> 8 would truncate.
    return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
  if mode == "I":
    # 32-bit integer images have no declared range. Values within
    # [0, 255] are taken as 8-bit; anything larger as 16-bit data (how
    # most such files arise), clipped to [0, 65535].
    a = a.astype(np.float64)
    if a.size and a.max() > 255:
      a = np.clip(a, 0, 65535) / 257.0
    return np.round(np.clip(a, 0, 255)).astype(np.uint8)
  if mode == "F":
    # Float images: [0, 1] data is scaled by 255, anything else is
    # taken to be on the [0, 255] scale already.
    a = np.nan_to_num(a.astype(np.float64))
    if a.size and a.min() >= 0.0 and a.max() <= 1.0:
      a = a * 255.0
    return np.round(np.clip(a, 0, 255)).astype(np.uint8)
  raise AssertionError(f"unexpected mode {mode}")


def _to_rgb(img: Image.Image) -> np.ndarray:
  """Converts a decoded Pillow image of any supported mode to uint8 RGB."""
  mode = img.mode
  if mode == "RGB":
    rgb = np.asarray(img, dtype=np.uint8)
  elif mode.startswith("I;16") or mode in ("I", "F"):
    gray = _to_uint8_gray(np.asarray(img), mode)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
  elif mode in ("L", "LA", "1"):
    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
  elif mode in ("P", "PA"):
    # Going through RGBA keeps Pillow quiet about palette transparency;
    # the alpha is dropped below like any other.
    rgb = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., :3]
  elif mode in ("RGBA", "RGBa", "RGBX"):
    rgb = np.asarray(img, dtype=np.uint8)[..., :3]
  else:
    # CMYK, YCbCr, LAB, HSV, ...
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
  return np.ascontiguousarray(rgb)


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file into uint8 RGB.

  The EXIF orientation tag is applied. Grayscale (1, L, I;16, I, F),
  palette, CMYK and other modes are converted to RGB; 16-bit data is
  rescaled (65535 -> 255), not clipped. Alpha channels are dropped, not
  composited: the colour values are kept as stored.

  Args:
    path: the image file.

  Returns:
    A uint8 array of shape [H, W, 3].

  Raises:
    ImageError: the file is missing, empty, not an image, truncated or
      corrupt, or decodes to a zero-size image. The message names the
      file and the problem.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ImageError(path, "file not found")
  if not os.path.isfile(path):
    raise ImageError(path, "not a regular file")
  if os.path.getsize(path) == 0:
    raise ImageError(path, "file is empty (0 bytes)")
  try:
    with Image.open(path) as img:
      img.load()
      try:
        img = ImageOps.exif_transpose(img)
      except Exception as e:
        # A malformed EXIF block shouldn't cost the pixels.
        logger.debug("%s: ignoring EXIF orientation (%s)", path, e)
      if img.width == 0 or img.height == 0:
        raise ImageError(path, f"zero-size image ({img.width}x{img.height})")
      rgb = _to_rgb(img)
  except ImageError:
    raise
  except Image.UnidentifiedImageError as e:
    raise ImageError(path, "not a recognised image format") from e
  except Exception as e:
    # Corrupt data surfaces from Pillow's decoders as OSError,
    # SyntaxError, ValueError, struct.error, ... depending on the format.
    raise ImageError(path, f"cannot decode image ({e})") from e
  return rgb


class WriteError(OSError):
  """An output file cannot be written; the message names it and why."""


def write_atomic(path: str | os.PathLike, payload: bytes) -> None:
  """Writes ``payload`` to a temp file in the target folder, then renames.

  Raises:
    WriteError: the folder does not exist or is not writable.
  """
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path)) or "."
  if not os.path.isdir(d):
    raise WriteError(f"{path}: output directory {d} does not exist")
  try:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=d)
  except OSError as e:
    raise WriteError(f"{path}: cannot write ({e.strerror})") from None
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None
    raise


def encode_png(img: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def save_png(path: str | os.PathLike, img: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] image as PNG, atomically."""
  write_atomic(path, encode_png(img))


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8, as the original saves images.

  clamp to [-1, 1], (x + 1) / 2, * 255 + 0.5, truncate
  (``torchvision.utils.save_image``); NaN counts as 0.0 (mid grey, 128)
  and +-inf as +-1.
  """
  x = np.clip(np.nan_to_num(np.asarray(x, np.float32)), -1.0, 1.0)
  return np.clip((x + 1.0) * 0.5 * 255.0 + 0.5, 0, 255).astype(np.uint8)


def to_float(img_u8) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (x / 255 * 2 - 1)."""
  return np.asarray(img_u8, np.float32) / 255.0 * 2.0 - 1.0
