"""Runs codecs over images and measures them: one row per (image, codec,
setting) with the real file size, the model's estimate and the metrics.

CDC rows come from real ``.cdcj`` files (``cdc_jax.codec``), one per
(model, decode steps S, gamma); baseline rows from Pillow's JPEG, WebP
and AVIF (``cdc_jax.eval.baselines``) at a quality grid and at the
quality nearest each CDC file's bpp. LPIPS is added when a scorer is
given (``lpips_fn(a_u8, b_u8) -> float``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from cdc_jax import codec
from cdc_jax.eval import baselines, metrics
from cdc_jax.eval.ms_ssim import min_side
from cdc_jax.imageio import save_png

# Quality grids of the baselines' sweeps (low rates, where CDC plays).
QUALITIES = {
  "jpeg": (5, 10, 20, 30, 50, 70, 90),
  "webp": (0, 10, 25, 50, 75, 90),
  "avif": (0, 15, 30, 50, 70, 90),
}


def quality_metrics(img, rec, lpips_fn=None) -> dict:
  """PSNR, MS-SSIM (and dB), LPIPS of one uint8 pair; MS-SSIM is None
  for images under its minimum side."""
  out = {"psnr": float(metrics.psnr(img, rec))}
  if min(img.shape[:2]) >= min_side():
    ms = float(metrics.ms_ssim(img, rec))
    out.update(ms_ssim=ms, ms_ssim_db=float(metrics.to_db(ms)))
  if lpips_fn is not None:
    out["lpips"] = float(lpips_fn(img, rec))
  return out


def cdc_rows(
  cm,
  label: str,
  name: str,
  img: np.ndarray,
  settings: Sequence[tuple[int, float]],
  lpips_fn=None,
  recon_dir: str | None = None,
) -> tuple[list[dict], list[np.ndarray]]:
  """Compresses ``img`` to a real file per (steps, gamma) and decodes it;
  returns the rows and the decoded images."""
  rows, recs = [], []
  h, w, _ = img.shape
  for steps, gamma in settings:
    res = codec.compress_image(cm, img, steps=steps, gamma=gamma)
    rec = codec.decompress(cm, res.data)
    row = {
      "codec": f"cdc S={steps} gamma={gamma:g}",
      "setting": label,
      "image": name,
      "height": h,
      "width": w,
      "bytes": len(res.data),
      "bpp": res.bpp,
      "estimated_bpp": res.estimated_bpp,
      **quality_metrics(img, rec, lpips_fn),
    }
    if recon_dir is not None:
      stem = os.path.splitext(name.replace(os.sep, "_"))[0]
      path = os.path.join(recon_dir, f"{stem}.{label}.S{steps}.png")
      save_png(path, rec)
      row["reconstruction"] = path
    rows.append(row)
    recs.append(rec)
  return rows, recs


def baseline_rows(name, img, codecs: Iterable[str], lpips_fn=None):
  """Rows of each baseline codec's quality grid for one image."""
  rows = []
  for c in codecs:
    for r in baselines.sweep(img, c, QUALITIES[c]):
      rows.append(_baseline_row(name, img, r, f"q{r['quality']}", lpips_fn))
  return rows


def nearest_rows(name, img, codecs, target_bpp: float, lpips_fn=None):
  """Each baseline at the quality whose bpp is nearest ``target_bpp``."""
  rows = []
  for c in codecs:
    r = baselines.at_bpp(img, c, target_bpp)
    row = _baseline_row(name, img, r, "nearest_bpp", lpips_fn)
    row["codec"] = f"{c} at CDC bpp"
    row["target_bpp"] = float(target_bpp)
    rows.append(row)
  return rows


def _baseline_row(name, img, r: dict, setting: str, lpips_fn) -> dict:
  h, w, _ = img.shape
  row = {
    "codec": r["codec"],
    "setting": setting,
    "image": name,
    "height": h,
    "width": w,
    "quality": r["quality"],
    "bytes": r["bytes"],
    "bpp": r["bpp"],
    "psnr": r["psnr"],
  }
  if r.get("ms_ssim") is not None:
    row.update(ms_ssim=r["ms_ssim"], ms_ssim_db=metrics.to_db(r["ms_ssim"]))
  if lpips_fn is not None:
    rec = baselines.decode(baselines.encode(img, r["codec"], r["quality"]))
    row["lpips"] = float(lpips_fn(img, rec))
  return row


def progress(items, total: int | None, desc: str, enabled: bool = True):
  """``items`` with a tqdm bar (stderr) when enabled."""
  if not enabled:
    return items
  from tqdm import tqdm

  return tqdm(items, total=total, desc=desc, dynamic_ncols=True)
