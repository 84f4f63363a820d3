"""Measures codecs on one image at a time: one row per (image, codec,
setting) with the real file size, the model's estimate and the metrics
(``cdc_jax.eval.pipeline`` runs them over a set and writes the report).

CDC rows come from real ``.cdcj`` files (``cdc_jax.codec``), one per
(model, decode steps S, gamma); baseline rows from Pillow's JPEG, WebP
and AVIF (``cdc_jax.eval.baselines``) at a quality grid and at the
quality nearest each CDC file's bpp. LPIPS is added when a scorer is
given (``lpips_fn(a_u8, b_u8) -> float``, e.g. ``lpips_scorer``).

FID and KID are dataset-level: ``PatchFeatures`` keeps the Inception
features of the patch protocol (``cdc_jax.eval.fid``) per (codec,
setting) as images are decoded, and ``fid_kid`` compares each set with
the originals' features once all images are done.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Iterable, Sequence

import jax
import numpy as np

from cdc_jax import codec
from cdc_jax.eval import baselines, fid, metrics
from cdc_jax.eval.ms_ssim import min_side
from cdc_jax.eval.report import cdc_name, file_stem
from cdc_jax.imageio import save_png, to_float, write_atomic
from cdc_jax.models import lpips as lp

# Quality grids of the baselines' sweeps (low rates, where CDC plays).
QUALITIES = {
  "jpeg": (5, 10, 20, 30, 50, 70, 90),
  "webp": (0, 10, 25, 50, 75, 90),
  "avif": (0, 15, 30, 50, 70, 90),
}
ORIGINALS = ("originals", "")  # the PatchFeatures key of the originals


def lpips_scorer(params):
  """``lpips_fn(a_u8, b_u8) -> float``: LPIPS v0.1 of one uint8 pair
  [H, W, 3] (both mapped to [-1, 1]) with the given LPIPS params; jitted,
  one compile per image shape."""
  net = lp.net_of(params)
  dist = jax.jit(lambda p, x, y: lp.lpips_distance(p, x, y, net=net))

  def lpips_fn(a_u8, b_u8) -> float:
    x, y = to_float(a_u8)[None], to_float(b_u8)[None]
    return float(dist(params, x, y)[0])

  return lpips_fn


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
  settings: Sequence[tuple[str, int, float]],
  lpips_fn=None,
  recon_dir: str | None = None,
) -> tuple[list[dict], list[np.ndarray]]:
  """Compresses ``img`` to a real file per (sampler, steps, gamma) and
  decodes it; returns the rows and the decoded images. With
  ``recon_dir``, each file and its decoded PNG are kept there (the row's
  ``file`` and ``reconstruction``)."""
  rows, recs = [], []
  h, w, _ = img.shape
  for sampler, steps, gamma in settings:
    res = codec.compress_image(
      cm, img, steps=steps, gamma=gamma, sampler=sampler
    )
    rec = codec.decompress(cm, res.data)
    # A distilled student decodes in its own S whatever the file says.
    student = cm.student
    shown = (student.steps, "student") if student else (steps, sampler)
    row = {
      "codec": cdc_name(shown[0], gamma, shown[1]),
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
      stem = file_stem(name)
      tag = "" if shown[1] == "ddim" else f".{shown[1]}"
      path = f"{stem}.{file_stem(label)}{tag}.S{shown[0]}"
      path = os.path.join(recon_dir, path)
      write_atomic(path + ".cdcj", res.data)
      save_png(path + ".png", rec)
      row["file"], row["reconstruction"] = path + ".cdcj", path + ".png"
    rows.append(row)
    recs.append(rec)
  return rows, recs


def baseline_rows(
  name, img, codecs: Iterable[str], lpips_fn=None, qualities=(), sink=None
):
  """Rows of each baseline codec's quality grid for one image
  (``qualities``, or ``QUALITIES[codec]`` when empty); ``sink(row, rec)``
  receives each decoded reconstruction (e.g. ``PatchFeatures.add_row``)."""
  rows = []
  for c in codecs:
    for r in baselines.sweep(img, c, qualities or QUALITIES[c]):
      row = _baseline_row(name, img, r, f"q{r['quality']}")
      if lpips_fn is not None or sink is not None:
        rec = baselines.decode(baselines.encode(img, c, r["quality"]))
        if lpips_fn is not None:
          row["lpips"] = float(lpips_fn(img, rec))
        if sink is not None:
          sink(row, rec)
      rows.append(row)
  return rows


def nearest_rows(name, img, codecs, target_bpp: float, lpips_fn=None):
  """Each baseline at the quality whose bpp is nearest ``target_bpp``."""
  rows = []
  for c in codecs:
    r = baselines.at_bpp(img, c, target_bpp)
    row = _baseline_row(name, img, r, "nearest_bpp")
    if lpips_fn is not None:
      rec = baselines.decode(baselines.encode(img, c, r["quality"]))
      row["lpips"] = float(lpips_fn(img, rec))
    row["codec"] = f"{c} at CDC bpp"
    row["target_bpp"] = float(target_bpp)
    rows.append(row)
  return rows


def _baseline_row(name, img, r: dict, setting: str) -> dict:
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
  return row


class PatchFeatures:
  """Inception features of the FID patch protocol, kept per key as the
  images come, so no reconstruction outlives its image.

  ``add(key, img)`` queues the patches of one uint8 image (``fid.patches``:
  ``size`` tiles, plus the half-shifted pass when ``shifted``); the
  extractor runs on full batches of ``batch`` patches, whatever their
  keys (one compile; the last batch zero-padded), and each result is
  fetched one batch late, so the host queues the next batch meanwhile.
  ``features()`` -> key -> [N, d] float32, patches in arrival order.

  ``extractor(patches_u8 [B, size, size, 3]) -> [B, d]``: a
  ``fid.Extractor`` or a stand-in.
  """

  def __init__(self, extractor, batch=32, size=fid.PATCH, shifted=True):
    if batch < 1:
      raise ValueError(f"FID feature batch must be >= 1, got {batch}")
    self.extractor, self.batch = extractor, batch
    self.size, self.shifted = size, shifted
    self._queue: list[tuple[Hashable, np.ndarray]] = []
    self._pending: list[tuple[object, list]] = []
    self._done: dict[Hashable, list[np.ndarray]] = {}

  def add(self, key: Hashable, img) -> int:
    """Queues the patches of ``img`` under ``key``; returns their count."""
    p = fid.patches(img, self.size, self.shifted)  # [N, size, size, 3]
    self._done.setdefault(key, [])
    for patch in p:
      self._queue.append((key, patch))
      if len(self._queue) == self.batch:
        self._run()
    return len(p)

  def add_row(self, row: dict, rec) -> int:
    """``add((row["codec"], row["setting"]), rec)``: the summary's key."""
    return self.add((row["codec"], str(row["setting"])), rec)

  def _run(self) -> None:
    b = np.zeros((self.batch, self.size, self.size, 3), np.uint8)
    for i, (_, patch) in enumerate(self._queue):
      b[i] = patch
    keys = [k for k, _ in self._queue]
    self._queue = []
    self._pending.append((self.extractor(b), keys))
    self._collect(keep=1)

  def _collect(self, keep: int) -> None:
    while len(self._pending) > keep:
      out, keys = self._pending.pop(0)
      out = np.asarray(out, np.float32)  # [batch, d]
      for i, key in enumerate(keys):
        self._done[key].append(out[i])

  def features(self) -> dict[Hashable, np.ndarray]:
    """Every key's features [N, d] (N = 0 for images under one patch)."""
    if self._queue:
      self._run()
    self._collect(keep=0)
    d = next((len(v[0]) for v in self._done.values() if v), 0)
    return {
      k: np.stack(v) if v else np.zeros((0, d), np.float32)
      for k, v in self._done.items()
    }


def fid_kid(
  feats: dict, reference=ORIGINALS, subset_size=1000, subsets=100, bar=False
) -> dict:
  """Per key of ``feats`` other than ``reference``: ``fid``, ``kid``,
  ``kid_std`` against the reference's features and ``fid_patches`` (the
  key's patch count). NaN where either side has under 2 patches (the
  covariance needs N > 1). ``bar``: a progress bar over the keys."""
  ref = feats[reference]
  stats = fid.statistics(ref) if len(ref) >= 2 else None
  # The reference side's S^1/2, once for every setting.
  ref_sqrt = fid.psd_sqrt(stats[1]) if stats is not None else None
  keys = [k for k in feats if k != reference]
  out = {}
  for key in progress(keys, len(keys), "FID/KID", bar):
    f = feats[key]
    row = {"fid_patches": len(f)}
    if stats is None or len(f) < 2:
      row.update(fid=math.nan, kid=math.nan, kid_std=math.nan)
    else:
      row["fid"] = fid.frechet_distance(
        *stats, *fid.statistics(f), sigma1_sqrt=ref_sqrt
      )
      row["kid"], row["kid_std"] = fid.kid(ref, f, subsets, subset_size)
    out[key] = row
  return out


def progress(items, total: int | None, desc: str, enabled: bool = True):
  """``items`` with a tqdm bar (stderr) when enabled."""
  if not enabled:
    return items
  from tqdm import tqdm

  return tqdm(items, total=total, desc=desc, dynamic_ncols=True)
