"""Evaluation reports: per-image rows -> CSV/JSON, a summary table,
rate-distortion plots, BD-rates and side-by-side grids.

A row is a flat dict with at least ``codec``, ``setting``, ``image``,
``bpp`` and metric columns (``psnr``, ``ms_ssim_db``, ``lpips``, ...).
Every metric is averaged per image within one (codec, setting), as
CompressAI does; bpp is the real file size (header included). FID and
KID are dataset-level: ``add_dataset_metrics`` puts them on the summary
rows. JSON files write non-finite numbers (a NaN FID, an infinite PSNR)
as null.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from collections import defaultdict

import numpy as np

from cdc_jax import files
from cdc_jax.errors import SettingError
from cdc_jax.imageio import save_png, write_atomic

# Metric -> (axis label, higher is better).
METRICS = {
  "psnr": ("PSNR [dB]", True),
  "ms_ssim_db": ("MS-SSIM [dB]", True),
  "lpips": ("LPIPS", False),
  "fid": ("FID", False),
}


def file_stem(image: str) -> str:
  """A file name for what is written per image: ``sub/kodim01.png`` ->
  ``sub_kodim01``, ``chelsea (held out)`` -> ``chelsea_held_out``."""
  stem = os.path.splitext(image)[0]
  return re.sub(r"[^\w.-]+", "_", stem).strip("_") or "image"


def write_rows(rows: list[dict], path_stem: str) -> tuple[str, str]:
  """``path_stem.csv`` and ``path_stem.json`` (atomic writes)."""
  columns = sorted({k for r in rows for k in r}, key=_column_order)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  write_atomic(path_stem + ".csv", buf.getvalue().encode())
  clean = [{k: _finite_or_none(v) for k, v in r.items()} for r in rows]
  payload = json.dumps(clean, indent=1, default=_json_value).encode()
  write_atomic(path_stem + ".json", payload)
  return path_stem + ".csv", path_stem + ".json"


def _column_order(name: str):
  first = ["dataset", "codec", "setting", "image", "height", "width"]
  return (first.index(name), "") if name in first else (len(first), name)


def _finite_or_none(v):
  if _is_number(v) and not math.isfinite(v):
    return None
  return v


def _json_value(v):
  if isinstance(v, np.generic):
    return v.item()
  raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def summarize(rows: list[dict]) -> list[dict]:
  """Per (codec, setting): the number of images and the mean of every
  numeric column, sorted by codec then bpp."""
  groups: dict[tuple, list[dict]] = defaultdict(list)
  for r in rows:
    groups[(r["codec"], str(r["setting"]))].append(r)
  out = []
  for (codec, setting), members in groups.items():
    row = {"codec": codec, "setting": setting, "images": len(members)}
    for key in members[0]:
      values = [m.get(key) for m in members]
      if all(_is_number(v) for v in values):
        row[key] = float(np.mean(values))
    out.append(row)
  return sorted(out, key=lambda r: (r["codec"], r.get("bpp", 0.0)))


def add_dataset_metrics(summary: list[dict], dataset: dict) -> list[dict]:
  """Adds ``dataset[(codec, setting)]`` (e.g. ``{"fid": ..., "kid":
  ...}``) to the summary row of that codec and setting, in place."""
  for row in summary:
    row.update(dataset.get((row["codec"], str(row["setting"])), {}))
  return summary


def _is_number(v) -> bool:
  return isinstance(v, int | float | np.number) and not isinstance(v, bool)


def summary_table(
  summary: list[dict], metrics=("psnr", "ms_ssim_db", "lpips", "fid", "kid")
) -> str:
  """A fixed-width text table of the summary (what the CLI prints); a
  metric column appears when some row has it. Numbers under 0.01 (KID)
  are printed in exponent form."""
  cols = ["codec", "setting", "images", "bpp"] + [
    m for m in metrics if any(m in r for r in summary)
  ]
  lines = ["  ".join(f"{c:>12}" for c in cols)]
  for r in summary:
    cells = []
    for c in cols:
      v = r.get(c, "")
      cells.append(_cell(v))
    lines.append("  ".join(cells))
  return "\n".join(lines)


def _cell(v) -> str:
  if not isinstance(v, float):
    return f"{v!s:>12}"
  if v != 0 and abs(v) < 0.01:
    return f"{v:12.3e}"
  return f"{v:12.4f}"


def curves(summary: list[dict], metric: str) -> dict[str, tuple]:
  """codec -> (bpp array, metric array), sorted by bpp."""
  out = {}
  for codec in sorted({r["codec"] for r in summary}):
    pts = [
      (r["bpp"], r[metric])
      for r in summary
      if r["codec"] == codec and metric in r and math.isfinite(r[metric])
    ]
    if pts:
      pts.sort()
      out[codec] = (
        np.array([p[0] for p in pts]),
        np.array([p[1] for p in pts]),
      )
  return out


def bd_rates(summary: list[dict], metric: str, anchor: str) -> dict:
  """BD-rate (%) of every codec against ``anchor`` on ``metric`` (the
  ``bjontegaard`` package, pchip; lower is better). A codec with fewer
  than 4 points or without enough overlap gets None."""
  import bjontegaard

  cs = curves(summary, metric)
  if anchor not in cs:
    return {}
  sign = 1.0 if METRICS.get(metric, ("", True))[1] else -1.0
  ra, da = cs[anchor]
  out = {}
  for codec, (r, d) in cs.items():
    if codec == anchor:
      continue
    try:
      # Its "insufficient overlap" warnings are the None below.
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bd = bjontegaard.bd_rate(
          ra,
          sign * da,
          r,
          sign * d,
          method="pchip",
          require_matching_points=False,
        )
      out[codec] = float(bd)
    except (ValueError, AssertionError, ZeroDivisionError):
      out[codec] = None
  return out


def read_reference_points(path: str) -> list[dict]:
  """A CSV of published points: columns ``system``, ``bpp`` and any of
  the metric names; one row per point, every value a number.

  Raises:
    SettingError: the file is missing or malformed (the line named).
  """
  try:
    text = files.read_input(path, "--references CSV", 1 << 24).decode()
  except UnicodeDecodeError:
    raise SettingError(f"{path}: the --references CSV is not text") from None
  rows = list(csv.reader(io.StringIO(text)))
  head = [c.strip() for c in rows[0]] if rows else []
  if "system" not in head or "bpp" not in head or len(rows) < 2:
    raise SettingError(
      f"{path}: expected a CSV with columns system, bpp and metrics "
      f"({', '.join(METRICS)}) and at least one row"
    )
  out = []
  for n, r in enumerate(rows[1:], start=2):
    if not any(c.strip() for c in r):
      continue
    if len(r) != len(head):
      raise SettingError(
        f"{path}, line {n}: {len(r)} fields where the header has {len(head)}"
      )
    point = {"codec": r[head.index("system")], "setting": "published"}
    for k, v in zip(head, r, strict=True):
      if k != "system" and v.strip():
        point[k] = _number(path, n, k, v)
    out.append(point)
  return out


def _number(path: str, line: int, column: str, text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise SettingError(
      f"{path}, line {line}: {column} = {text!r} is not a number"
    ) from None


def cdc_name(steps: int, gamma: float, sampler: str = "ddim") -> str:
  """The codec column of CDC rows ("cdc S=65 gamma=0.8"; a sampler other
  than DDIM is named: "cdc dpmpp2m S=16 gamma=0.8")."""
  name = "cdc" if sampler == "ddim" else f"cdc {sampler}"
  return f"{name} S={steps} gamma={gamma:g}"


def rd_plot(summary, metric, path, references=(), title="") -> str | None:
  """bpp vs ``metric`` for every codec (ours solid, Pillow's dashed,
  published points as markers); None when no codec has the metric."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cs = curves(summary, metric)
  refs = curves(list(references), metric)
  if not cs and not refs:
    return None
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
  for codec, (r, d) in cs.items():
    style = "-o" if codec.startswith("cdc") else "--s"
    ax.plot(r, d, style, label=codec, markersize=4)
  for codec, (r, d) in refs.items():
    ax.plot(r, d, ":^", label=f"{codec} (published)", markersize=4)
  ax.set_xlabel("Bit-rate [bpp]")
  ax.set_ylabel(METRICS.get(metric, (metric,))[0])
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", bbox_inches="tight")
  plt.close(fig)
  write_atomic(path, buf.getvalue())
  return path


def grid(path: str, images: list[np.ndarray], gap: int = 4) -> str:
  """Images of one height side by side, white gaps between them."""
  h = max(i.shape[0] for i in images)
  parts = []
  for i, img in enumerate(images):
    if i:
      parts.append(np.full((h, gap, 3), 255, np.uint8))
    pad = np.full((h - img.shape[0], img.shape[1], 3), 255, np.uint8)
    parts.append(np.concatenate([img, pad], axis=0))
  save_png(path, np.concatenate(parts, axis=1))
  return path
