"""Classical codecs through Pillow (JPEG, WebP, AVIF) as rate-distortion
baselines: real encoded files, their sizes as bpp, decoded back to uint8
and measured with ``cdc_jax.eval.metrics``.

Settings are Pillow's defaults apart from ``quality`` (as CompressAI's
Pillow codecs): JPEG baseline with 4:2:0 chroma and standard Huffman
tables, WebP lossy at method 4, AVIF with 4:2:0 and speed 6. Extra keyword
options go to ``PIL.Image.save`` unchanged (e.g. ``optimize=True`` for JPEG,
``speed=0`` for AVIF). A row reports the whole file (headers included):

  {"codec", "quality", "bytes", "bpp", "psnr", "ms_ssim"}

``ms_ssim`` is None for images with a side under 161 px (too small for 5
MS-SSIM scales, see ``cdc_jax.eval.ms_ssim``).
"""

from __future__ import annotations

import io

import numpy as np
import PIL
import PIL.features
from PIL import Image

from cdc_jax.errors import SettingError
from cdc_jax.eval import metrics
from cdc_jax.eval.ms_ssim import min_side

# codec -> (Pillow format, Pillow feature name, (lowest, highest) quality)
CODECS = {
  "jpeg": ("JPEG", "jpg", (1, 100)),
  "webp": ("WEBP", "webp", (0, 100)),
  "avif": ("AVIF", "avif", (0, 100)),
}


class CodecUnavailable(RuntimeError):
  """The installed Pillow cannot encode this codec."""


def unavailable_reason(codec: str) -> str | None:
  """None when Pillow can encode and decode ``codec``, else why not."""
  _known(codec)
  _, feature, _ = CODECS[codec]
  try:
    ok = PIL.features.check(feature)
  except ValueError:  # a Pillow too old to know the feature at all
    ok = False
  if ok:
    return None
  return (
    f"Pillow {PIL.__version__} was built without {codec.upper()} support "
    f"(PIL.features.check({feature!r}) is False); install a Pillow wheel "
    "with it (pip install -U 'pillow>=11.3') or leave this codec out"
  )


def available() -> list[str]:
  """The codecs the installed Pillow can encode."""
  return [c for c in CODECS if unavailable_reason(c) is None]


def _known(codec: str) -> None:
  if codec not in CODECS:
    raise SettingError(
      f"unknown codec {codec!r} (--baselines); known: {', '.join(CODECS)}"
    )


def quality_range(codec: str) -> tuple[int, int]:
  """The (lowest, highest) quality setting Pillow accepts for ``codec``."""
  _known(codec)
  return CODECS[codec][2]


def _check_image(img) -> np.ndarray:
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(
      f"need a uint8 RGB image [H, W, 3], got {img.dtype} {img.shape}"
    )
  return img


def encode(img, codec: str, quality: int, **options) -> bytes:
  """The bytes of ``img`` (uint8 [H, W, 3]) encoded as a complete
  ``codec`` file at integer ``quality``."""
  img = _check_image(img)
  reason = unavailable_reason(codec)
  if reason is not None:
    raise CodecUnavailable(reason)
  lo, hi = quality_range(codec)
  if not isinstance(quality, int | np.integer) or not lo <= quality <= hi:
    raise ValueError(
      f"{codec} quality must be an integer in [{lo}, {hi}], got {quality!r}"
    )
  buf = io.BytesIO()
  fmt = CODECS[codec][0]
  Image.fromarray(img).save(buf, format=fmt, quality=int(quality), **options)
  return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
  """A JPEG, WebP or AVIF file's bytes -> uint8 [H, W, 3]."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return np.asarray(im.convert("RGB"))
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"cannot decode {len(data)} bytes as an image: {e}") from e


def _rows(img, codec: str, qualities, files: list[bytes]) -> list[dict]:
  """Rows for the decoded ``files``, metrics computed as one batch."""
  h, w, _ = img.shape
  dec = np.stack([decode(f) for f in files])  # [Q, H, W, 3]
  if dec.shape[1:] != img.shape:
    raise ValueError(f"{codec} decoded to {dec.shape[1:]}, not {img.shape}")
  ref = np.broadcast_to(img, dec.shape)
  psnrs = metrics.psnr(ref, dec)
  ssims = [None] * len(files)
  if min(h, w) >= min_side():
    ssims = [float(s) for s in metrics.ms_ssim(ref, dec)]
  return [
    {
      "codec": codec,
      "quality": int(q),
      "bytes": len(f),
      "bpp": metrics.bpp(len(f), h, w),
      "psnr": float(p),
      "ms_ssim": s,
    }
    for q, f, p, s in zip(qualities, files, psnrs, ssims, strict=True)
  ]


def sweep(img, codec: str, qualities, **options) -> list[dict]:
  """One row per quality setting (in the order given) for ``img``."""
  img = _check_image(img)
  qualities = list(qualities)
  if not qualities:
    raise ValueError("sweep: no quality settings given")
  files = [encode(img, codec, q, **options) for q in qualities]
  return _rows(img, codec, qualities, files)


def _bisect(rate, lo: int, hi: int, target: float) -> int:
  """The quality in [lo, hi] whose rate is nearest ``target``, assuming
  the rate does not decrease with quality; ties go to the lower rate."""
  if rate(hi) <= target:
    return hi
  if rate(lo) >= target:
    return lo
  while hi - lo > 1:  # rate(lo) < target < rate(hi)
    mid = (lo + hi) // 2
    if rate(mid) < target:
      lo = mid
    elif rate(mid) > target:
      hi = mid
    else:
      return mid
  return lo if target - rate(lo) <= rate(hi) - target else hi


def at_bpp(img, codec: str, target_bpp: float, **options) -> dict:
  """The row of the quality setting whose real bpp is nearest
  ``target_bpp`` (e.g. "JPEG at the nearest bpp" beside a CDC file).

  Bisection over the integer quality range, about log2(101) + 2 = 9
  encodes. It assumes the file size does not decrease as quality rises;
  these encoders keep to that up to dips of a few bytes between some
  neighbouring settings (WebP most often). Where a dip breaks it, the
  answer is the nearer of the two settings that bracket the target, which
  can miss the nearest overall by those few bytes. A target outside the
  codec's reach returns the lowest or highest quality. The row adds
  ``target_bpp``.
  """
  img = _check_image(img)
  h, w, _ = img.shape
  files: dict[int, bytes] = {}

  def rate(q: int) -> float:
    if q not in files:
      files[q] = encode(img, codec, q, **options)
    return metrics.bpp(len(files[q]), h, w)

  q = _bisect(rate, *quality_range(codec), float(target_bpp))
  (row,) = _rows(img, codec, [q], [files[q]])
  row["target_bpp"] = float(target_bpp)
  return row
