"""The embedded held-out photo: reconstructions logged during training and
the end-of-run report through the real file codec.

The photo (``data.sources.HELD_OUT``) is never in the training set of the
embedded source. During training it is center-cropped to a multiple of the
model's downsampling factor and reconstructed without entropy coding (the
estimated bpp); the final report compresses the whole photo to a real
``.cdcj`` file with the exported model and decodes it back.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from cdc_jax import codec
from cdc_jax.data.sources import HELD_OUT, embedded_images
from cdc_jax.eval import baselines, metrics
from cdc_jax.eval.metrics import psnr
from cdc_jax.imageio import save_png, to_float, to_uint8, write_atomic
from cdc_jax.sample import Sampler, initial_noise


def held_out_image() -> np.ndarray:
  """The whole held-out photo, uint8 [H, W, 3]."""
  return dict(embedded_images())[HELD_OUT]


def center_crop(img: np.ndarray, size: int, factor: int) -> np.ndarray:
  """The central square of side ``min(size, H, W)`` rounded down to a
  multiple of ``factor``."""
  h, w, _ = img.shape
  s = min(size, h // factor * factor, w // factor * factor)
  if s <= 0:
    raise ValueError(f"image {h}x{w} is smaller than the factor {factor}")
  top, left = (h - s) // 2, (w - s) // 2
  return img[top : top + s, left : left + s]


def reconstruct(sampler: Sampler, params, img_u8, steps, gamma, seed=0):
  """(reconstruction uint8, estimated bpp, PSNR) of one uint8 image whose
  sides are multiples of the model's downsampling factor."""
  x = jnp.asarray(to_float(img_u8))[None]
  x_init = initial_noise(seed, x.shape, gamma)
  rec, bpp = sampler.reconstruct(params, x, x_init, steps)
  rec_u8 = to_uint8(rec[0])
  return rec_u8, float(bpp[0]), psnr(img_u8, rec_u8)


def report(model_path: str, out_dir: str, steps: int, gamma: float) -> dict:
  """Compresses the held-out photo to ``out_dir/held_out.cdcj`` with the
  model at ``model_path``, decodes the file, measures it beside JPEG at
  the nearest bpp, and writes ``reconstruction.png`` (original | CDC |
  JPEG) and ``report.json``."""
  cm = codec.load(model_path)
  img = held_out_image()
  res = codec.compress_image(cm, img, steps=steps, gamma=gamma)
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
  return (
    f"held-out {rep['image']}: {rep['file_bytes']} bytes = "
    f"{rep['bpp']:.4f} bpp (estimate {rep['estimated_bpp']:.4f}), "
    f"PSNR {rep['psnr_db']:.2f} dB, MS-SSIM {rep['ms_ssim']:.4f}, "
    f"{rep['decode_steps']} DDIM steps\n"
    f"  JPEG at the nearest bpp (quality {j['quality']}): {j['bytes']} "
    f"bytes = {j['bpp']:.4f} bpp, PSNR {j['psnr']:.2f} dB, MS-SSIM "
    f"{j['ms_ssim']:.4f}\n"
    f"  file: {rep['file']}\n"
    f"  original | CDC | JPEG: {rep['side_by_side']}\n"
    "  This is a toy model (tiny widths, minutes of CPU training on a few "
    "photos); real quality needs the full configs trained on Vimeo-90k or "
    "the released weights (README, 'Released weights')."
  )
