"""One evaluation run: models x images x (S, gamma), the baselines, and
the report folder.

``OUT/`` receives ``per_image.{csv,json}``, ``summary.{csv,json}``,
``rd_<metric>.png`` for every metric measured, ``bd_rate.json`` (against
the anchor), ``grids/<image>.png`` (original | CDC | each baseline at the
nearest bpp) and, with ``save_reconstructions``, the decoded PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import os

from cdc_jax import codec
from cdc_jax.eval import baselines, report, runner
from cdc_jax.imageio import write_atomic


@dataclasses.dataclass
class Options:
  """What to run; the CLI's flags one to one."""

  steps: tuple[int, ...] = ()  # empty: each family's default
  gammas: tuple[float, ...] = (codec.DEFAULT_GAMMA,)
  baselines: tuple[str, ...] = ("jpeg", "webp", "avif")
  anchor: str = "jpeg"
  references: str = ""  # CSV of published points
  save_reconstructions: bool = False
  progress: bool = True
  title: str = ""


def _settings(cm, opts: Options) -> list[tuple[int, float]]:
  steps = opts.steps or (codec.DEFAULT_STEPS[cm.family],)
  return [(s, g) for s in steps for g in opts.gammas]


def measure(models: dict, images, opts: Options, out: str, lpips_fn=None):
  """All rows, and per image the grid's panels (first model, setting)."""
  usable = [
    c for c in opts.baselines if baselines.unavailable_reason(c) is None
  ]
  recon_dir = os.path.join(out, "reconstructions")
  if opts.save_reconstructions:
    os.makedirs(recon_dir, exist_ok=True)
  rows, panels = [], {}
  for name, img in runner.progress(images, None, "images", opts.progress):
    first = None
    for label, cm in models.items():
      r, recs = runner.cdc_rows(
        cm,
        label,
        name,
        img,
        _settings(cm, opts),
        lpips_fn,
        recon_dir if opts.save_reconstructions else None,
      )
      rows += r
      first = first or (r[0], recs[0])
    rows += runner.baseline_rows(name, img, usable, lpips_fn)
    near = runner.nearest_rows(name, img, usable, first[0]["bpp"], lpips_fn)
    rows += near
    panels[name] = (img, first[1], near)
  return rows, panels


def _grids(out: str, panels: dict) -> list[str]:
  """original | CDC (first model and setting) | baselines at its bpp."""
  grid_dir = os.path.join(out, "grids")
  os.makedirs(grid_dir, exist_ok=True)
  paths = []
  for name, (img, rec, near) in panels.items():
    parts = [img, rec]
    for r in near:
      c = r["codec"].split()[0]
      parts.append(baselines.decode(baselines.encode(img, c, r["quality"])))
    stem = os.path.splitext(name.replace(os.sep, "_"))[0]
    paths.append(report.grid(os.path.join(grid_dir, f"{stem}.png"), parts))
  return paths


def write_report(out: str, rows: list[dict], opts: Options) -> dict:
  """Tables, plots and BD-rates of ``rows`` into ``out``."""
  report.write_rows(rows, os.path.join(out, "per_image"))
  summary = report.summarize(rows)
  report.write_rows(summary, os.path.join(out, "summary"))
  refs = []
  if opts.references:
    refs = report.read_reference_points(opts.references)
  plots, bd = [], {}
  for metric in report.METRICS:
    path = os.path.join(out, f"rd_{metric}.png")
    if report.rd_plot(summary, metric, path, refs, opts.title):
      plots.append(path)
    if any(metric in r for r in summary):
      bd[metric] = report.bd_rates(summary, metric, opts.anchor)
  payload = json.dumps({"anchor": opts.anchor, "bd_rate_percent": bd}, indent=2)
  write_atomic(os.path.join(out, "bd_rate.json"), payload.encode())
  return {"summary": summary, "plots": plots, "bd_rate": bd}


def evaluate(models: dict, images, out: str, opts: Options, lpips_fn=None):
  """Runs everything; returns the summary rows and the written paths."""
  os.makedirs(out, exist_ok=True)
  rows, panels = measure(models, images, opts, out, lpips_fn)
  if not rows:
    raise ValueError("no image was evaluated")
  result = write_report(out, rows, opts)
  result["grids"] = _grids(out, panels)
  result["rows"] = rows
  return result


def cdc_vs_baseline(rows: list[dict]) -> list[str]:
  """One line per image: CDC's first setting vs each baseline at its bpp."""
  lines = []
  by_image: dict[str, list[dict]] = {}
  for r in rows:
    by_image.setdefault(r["image"], []).append(r)
  for name, rs in by_image.items():
    cdc = next(r for r in rs if r["codec"].startswith("cdc"))
    lines.append(f"{name}: {_describe(cdc)}")
    for r in rs:
      if r["codec"].endswith("at CDC bpp"):
        lines.append(
          f"  {r['codec'].split()[0]:>5} q{r['quality']}: {_describe(r)}"
        )
  return lines


def _describe(r: dict) -> str:
  parts = [f"{r['bpp']:.4f} bpp", f"PSNR {r['psnr']:.2f} dB"]
  if r.get("ms_ssim") is not None:
    parts.append(f"MS-SSIM {r['ms_ssim']:.4f}")
  if r.get("lpips") is not None:
    parts.append(f"LPIPS {r['lpips']:.4f}")
  return ", ".join(parts)
