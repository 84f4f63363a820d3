"""Images in and out: decoding files to uint8 RGB, writing PNGs, and the
model's pixel range.

* ``load_image``: any file Pillow reads -> uint8 [H, W, 3] (``ImageError``
  names the file and the problem); the pixel limit is checked from the
  header, before decoding.
* ``save_png``: a PNG through ``cdc_jax.files.write_atomic`` (re-exported
  here with ``WriteError``), the one way outputs are written.
* ``to_float`` / ``to_uint8``: uint8 <-> the model's [-1, 1] floats, the
  latter as the original saves images.
"""

from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from cdc_jax import files
from cdc_jax.errors import UserError
from cdc_jax.files import WriteError, write_atomic  # noqa: F401 (the API)

logger = logging.getLogger(__name__)

# Images of more pixels are refused from their header, before decoding,
# where the caller gives no limit of its own (the codec: --max-pixels).
# The codec's default limit; Pillow's own warns at 89 Mpx.
MAX_PIXELS = 40_000_000
# 16-bit PNG pixel layouts -> the unpacker that yields their low bytes.
_LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}


class ImageError(UserError, ValueError):
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


def load_image(
  path: str | os.PathLike, max_pixels: int | None = None, hint: str = ""
) -> np.ndarray:
  """Decodes an image file into uint8 RGB.

  The EXIF orientation tag is applied. Grayscale (1, L, I;16, I, F),
  palette, CMYK and other modes are converted to RGB; 16-bit data
  (grey, RGB, RGBA) is rescaled (65535 -> 255) and rounded, not clipped
  or truncated. Alpha channels are dropped, not composited: the colour
  values are kept as stored.

  Args:
    path: the image file (a regular file, or a link to one).
    max_pixels: images of more pixels are refused from the size in the
      file's header, before decoding (default ``MAX_PIXELS``).
    hint: appended to that refusal (how to raise the limit).

  Returns:
    A uint8 array of shape [H, W, 3].

  Raises:
    ImageError: the file is missing, not a regular file, empty, not an
      image, over ``max_pixels``, truncated or corrupt, or decodes to a
      zero-size image. The message names the file and the problem.
  """
  path = os.fspath(path)
  problem, size = files.input_problem(path)
  if problem:
    raise ImageError(path, problem)
  if size == 0:
    raise ImageError(path, "file is empty (0 bytes)")
  limit = MAX_PIXELS if max_pixels is None else max_pixels
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(path) as img:
        _check_pixels(path, img.size, limit, hint)
        rgb = _decode(path, img)
  except ImageError:
    raise
  except Image.UnidentifiedImageError as e:
    raise ImageError(path, "not a recognised image format") from e
  except Image.DecompressionBombError as e:
    raise ImageError(path, f"refused by Pillow ({e})") from None
  except Exception as e:
    # Corrupt data surfaces from Pillow's decoders as OSError,
    # SyntaxError, ValueError, struct.error, ... depending on the format.
    raise ImageError(path, f"cannot decode image ({e})") from e
  return rgb


def _check_pixels(path: str, size, limit: int, hint: str) -> None:
  w, h = size
  if w * h > limit:
    raise ImageError(
      path,
      f"image size {w}x{h} ({w * h:,} pixels) is over the limit of "
      f"{limit:,} pixels{f' ({hint})' if hint else ''}",
    )


def _decode(path: str, img: Image.Image) -> np.ndarray:
  """The opened image, decoded, oriented and converted to uint8 RGB."""
  tiles = list(img.tile)  # what the decoder will unpack; load() clears it
  img.load()
  img = _rounded_16bit(path, img, tiles)
  try:
    img = ImageOps.exif_transpose(img)
  except Exception as e:
    # A malformed EXIF block shouldn't cost the pixels.
    logger.debug("%s: ignoring EXIF orientation (%s)", path, e)
  if img.width == 0 or img.height == 0:
    raise ImageError(path, f"zero-size image ({img.width}x{img.height})")
  return _to_rgb(img)


def _rounded_16bit(path: str, img: Image.Image, tiles: list) -> Image.Image:
  """A decoded 16-bit RGB, RGBA or grey+alpha PNG as 8-bit RGB, rounded
  (Pillow keeps the high byte: 51528 -> 201, where 51528 / 257 = 200.498);
  other images as they are. The low bytes come from a second decode with
  another unpacker."""
  raw = tiles[0].args if len(tiles) == 1 else None
  if raw not in _LOW_BYTES or tiles[0].codec_name != "zip":
    return img
  with Image.open(path) as again:
    again.tile = [t._replace(args=_LOW_BYTES[raw]) for t in again.tile]
    again.load()
    low = np.asarray(again, np.uint16)
  if raw == "LA;16B":  # low holds (grey hi, grey lo, alpha hi, alpha lo)
    wide = np.repeat(low[..., :1] * 256 + low[..., 1:2], 3, axis=-1)
  else:
    wide = np.asarray(img, np.uint16)[..., :3] * 256 + low[..., :3]
  rgb = np.round(wide.astype(np.float64) / 257.0).astype(np.uint8)
  out = Image.fromarray(rgb, "RGB")
  out.info = dict(img.info)  # the EXIF orientation, if any
  return out


def encode_png(img: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def save_png(path: str | os.PathLike, img: np.ndarray, inputs=()) -> None:
  """Writes a uint8 [H, W, 3] image as PNG (``files.write_atomic``)."""
  write_atomic(path, encode_png(img), inputs)


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
