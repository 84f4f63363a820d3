"""Held-out evaluation: the small set measured during training and the
end-of-run report of the embedded held-out photo through the file codec.

The photo (``data.sources.HELD_OUT``) is never in the training set of the
embedded source. During training the evaluation set (that photo, or the
first few images of a folder, ``eval_images``) is center-cropped to one
square side, a multiple of the model's downsampling factor, and
reconstructed without entropy coding (``SetEvaluator``: the estimated
bpp, PSNR, MS-SSIM where the crops are large enough, LPIPS with weights);
the final report compresses the whole photo to a real ``.cdcj`` file
with the exported model and decodes it back.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import codec, samplers
from cdc_jax.data.sources import HELD_OUT, ImageFolderSource, embedded_images
from cdc_jax.errors import SettingError
from cdc_jax.eval import baselines, metrics
from cdc_jax.eval.metrics import psnr
from cdc_jax.eval.ms_ssim import batch_ms_ssim, min_side
from cdc_jax.imageio import load_image, save_png, write_atomic
from cdc_jax.models.lpips import lpips_distance
from cdc_jax.sample import initial_noise


def held_out_image() -> np.ndarray:
  """The whole held-out photo, uint8 [H, W, 3]."""
  return dict(embedded_images())[HELD_OUT]


def center_crop(img: np.ndarray, size: int, factor: int) -> np.ndarray:
  """The central square of side ``min(size, H, W)`` rounded down to a
  multiple of ``factor``."""
  h, w, _ = img.shape
  s = min(size, h // factor * factor, w // factor * factor)
  if s <= 0:
    raise ValueError(f"image {w}x{h} is smaller than the factor {factor}")
  top, left = (h - s) // 2, (w - s) // 2
  return img[top : top + s, left : left + s]


def eval_images(data: str = "", max_images: int = 4):
  """The evaluation set as (name, uint8 [H, W, 3]): ``data`` empty -> the
  held-out photo alone; else the first ``max_images`` images (sorted by
  path) of the folder ``data``.

  Raises:
    DataError: not a folder, or no images; SettingError:
      ``max_images`` < 1.
    cdc_jax.imageio.ImageError: an image cannot be read.
  """
  if not data:
    return [(HELD_OUT, held_out_image())]
  if max_images < 1:
    raise SettingError(f"eval.max_images={max_images} must be >= 1")
  files = ImageFolderSource(data).files[:max_images]
  return [(os.path.relpath(f, data), load_image(f)) for f in files]


def crop_set(images, size: int, factor: int) -> np.ndarray:
  """Central squares of one side for all ``images`` (one shape: one
  compile): ``min(size, every image's shorter side)`` rounded down to a
  multiple of ``factor``; uint8 [N, s, s, 3]."""
  side = min([size] + [min(img.shape[:2]) for img in images])
  side = side // factor * factor
  if side <= 0:
    raise SettingError(
      f"eval crops: the smallest image side or eval.size ({size}) is under "
      f"the model's downsampling factor {factor}"
    )
  return np.stack([center_crop(img, side, factor) for img in images])


def _to_uint8(x):
  """``imageio.to_uint8`` in jnp (traceable): clamp, scale, truncate."""
  x = jnp.clip(jnp.nan_to_num(x.astype(jnp.float32)), -1.0, 1.0)
  return jnp.clip((x + 1.0) * 0.5 * 255.0 + 0.5, 0, 255).astype(jnp.uint8)


class SetEvaluator:
  """Reconstructs a fixed set of crops (no entropy coding: the model's
  estimated bpp) and measures it, in one jitted call (one compile).

  ``__call__(params) -> (means, first)``: ``means`` holds the per-image
  averages of ``psnr`` (uint8, peak 255), ``bpp`` (estimated), ``ms_ssim``
  (only when the crops' side is >= ``ms_ssim.min_side()``, 161 px) and
  ``lpips`` (only with ``lpips_params``); ``first`` is the first crop's
  reconstruction, uint8 [s, s, 3]. The initial noise is drawn once from
  ``seed``, so successive evaluations differ only by the params.
  ``decoder`` is a ``cdc_jax.sample.Sampler``; ``sampler`` names the
  decode sampler (``cdc_jax.samplers.SAMPLERS``).
  """

  def __init__(
    self,
    decoder,
    crops,
    steps,
    gamma,
    lpips_params=None,
    seed=0,
    sampler="ddim",
  ):
    self.crops = np.asarray(crops, np.uint8)  # [N, s, s, 3]
    self.steps = int(steps)
    self.sampler = sampler
    self.lpips_params = lpips_params
    self.with_ms_ssim = self.crops.shape[1] >= min_side()
    self._x_init = initial_noise(seed, self.crops.shape, gamma)
    self._decoder = decoder
    self._fn = jax.jit(self._measure)

  def _measure(self, params, lpips_params, img_u8, x_init):
    x = img_u8.astype(jnp.float32) / 255.0 * 2.0 - 1.0
    rec, bpp = self._decoder.reconstruct(
      params, x, x_init, self.steps, sampler=self.sampler
    )
    rec_u8 = _to_uint8(rec)
    out = {"psnr": metrics.batch_psnr(img_u8, rec_u8), "bpp": bpp}
    if self.with_ms_ssim:
      out["ms_ssim"] = batch_ms_ssim(img_u8, rec_u8)
    if lpips_params is not None:
      y = rec_u8.astype(jnp.float32) / 255.0 * 2.0 - 1.0
      out["lpips"] = lpips_distance(lpips_params, x, y)
    return {k: jnp.mean(v) for k, v in out.items()}, rec_u8[0]

  def __call__(self, params) -> tuple[dict, np.ndarray]:
    means, first = jax.device_get(
      self._fn(params, self.lpips_params, self.crops, self._x_init)
    )
    return {k: float(v) for k, v in means.items()}, np.asarray(first)


def report(
  model_path: str,
  out_dir: str,
  steps: int,
  gamma: float,
  sampler: str = samplers.DEFAULT_SAMPLER,
) -> dict:
  """Compresses the held-out photo to ``out_dir/held_out.cdcj`` with the
  model at ``model_path`` (``steps`` of ``sampler``), decodes the file,
  measures it beside JPEG at the nearest bpp, and writes
  ``reconstruction.png`` (original | CDC | JPEG) and ``report.json``."""
  cm = codec.load(model_path)
  img = held_out_image()
  res = codec.compress_image(cm, img, steps=steps, gamma=gamma, sampler=sampler)
  path = os.path.join(out_dir, "held_out.cdcj")
  write_atomic(path, res.data)
  rec = codec.decompress(cm, res.data)
  jpeg = baselines.at_bpp(img, "jpeg", res.bpp)
  jpeg_rec = baselines.decode(baselines.encode(img, "jpeg", jpeg["quality"]))
  side = os.path.join(out_dir, "reconstruction.png")
  save_png(side, np.concatenate([img, rec, jpeg_rec], axis=1))
  h, w, _ = img.shape
  out = {
    "image": f"{HELD_OUT} {w}x{h} (held out)",
    "file": path,
    "side_by_side": side,
    "file_bytes": len(res.data),
    "bpp": res.bpp,
    "estimated_bpp": res.estimated_bpp,
    "psnr_db": float(psnr(img, rec)),
    "ms_ssim": float(metrics.ms_ssim(img, rec)),
    "decode_steps": steps,
    "sampler": sampler,
    "gamma": gamma,
    "jpeg": {k: jpeg[k] for k in ("quality", "bytes", "bpp", "psnr")},
  }
  out["jpeg"]["ms_ssim"] = jpeg["ms_ssim"]
  write_atomic(
    os.path.join(out_dir, "report.json"), json.dumps(out, indent=2).encode()
  )
  return out


def summary(rep: dict) -> str:
  """The report as the lines the main job prints."""
  j = rep["jpeg"]
  steps = rep["decode_steps"]
  title = samplers.TITLES[rep["sampler"]]
  return (
    f"held-out {rep['image']}: {rep['file_bytes']} bytes = "
    f"{rep['bpp']:.4f} bpp (estimate {rep['estimated_bpp']:.4f}), "
    f"PSNR {rep['psnr_db']:.2f} dB, MS-SSIM {rep['ms_ssim']:.4f}, "
    f"{steps} {title} step{'s' if steps != 1 else ''}\n"
    f"  JPEG at the nearest bpp (quality {j['quality']}): {j['bytes']} "
    f"bytes = {j['bpp']:.4f} bpp, PSNR {j['psnr']:.2f} dB, MS-SSIM "
    f"{j['ms_ssim']:.4f}\n"
    f"  file: {rep['file']}\n"
    f"  original | CDC | JPEG: {rep['side_by_side']}\n"
    "  This is a toy model (tiny widths, minutes of CPU training on a few "
    "photos); real quality needs the full configs trained on Vimeo-90k or "
    "the released weights (README, 'Released weights')."
  )
