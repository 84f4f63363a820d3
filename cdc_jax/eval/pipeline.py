"""One evaluation run: models x images x (sampler, S, gamma), the
baselines, and the report folder.

``OUT/`` receives ``per_image.{csv,json}``, ``summary.{csv,json}``,
``rd_<metric>.png`` for every metric measured, ``bd_rate.json`` (against
the anchor), ``grids/<image>.png`` (original | CDC | each baseline at the
nearest bpp; written as each image is done) and, with
``save_reconstructions``, each CDC file and its decoded PNG
(``reconstructions/``).

LPIPS (column ``lpips``, lower is better, and ``rd_lpips.png``) is
measured for every row when ``Options.lpips_weights`` names an LPIPS
``.npz`` (or a scorer is passed); without one there is no LPIPS column
and ``LPIPS_HINT`` says how to get it.

FID and KID are measured when ``Options.inception_weights`` names the FID
InceptionV3 weights (``.npz`` or ``.pth``; or an extractor is passed):
dataset-level numbers, one per CDC (model, S, gamma) and per baseline
quality-sweep point, between the patches (HiFiC / MS-ILLM protocol,
``cdc_jax.eval.fid``) of the originals and of the reconstructions. They
are summary columns (``fid``, ``kid``, ``kid_std``, ``fid_patches``), not
per-image ones, and feed ``rd_fid.png`` and the FID BD-rate;
``fid_kid.json`` has the protocol, the patch counts and a note on how far
the numbers can be trusted. The baselines' "at CDC bpp" rows get none:
their quality differs from image to image, so they are no one setting.
Features are accumulated as images are decoded; reconstructions are not
kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from cdc_jax import codec, files, samplers
from cdc_jax.errors import SettingError
from cdc_jax.eval import baselines, fid, measure, report
from cdc_jax.eval.ms_ssim import min_side
from cdc_jax.imageio import write_atomic
from cdc_jax.models import lpips


@dataclasses.dataclass
class Options:
  """What to run; the CLI's flags one to one."""

  steps: tuple[int, ...] = ()  # empty: each family's default
  samplers: tuple[str, ...] = ("ddim",)  # cdc_jax.samplers.SAMPLERS names
  gammas: tuple[float, ...] = (codec.DEFAULT_GAMMA,)
  baselines: tuple[str, ...] = ("jpeg", "webp", "avif")
  anchor: str = "jpeg"
  references: str = ""  # CSV of published points
  save_reconstructions: bool = False
  progress: bool = True
  title: str = ""
  lpips_weights: str = ""  # LPIPS .npz; empty: no LPIPS column
  lpips_net: str = ""  # "vgg" or "alex"; empty: read from the file
  inception_weights: str = ""  # FID Inception .npz/.pth; empty: no FID
  kid_subset_size: int = 1000  # clipped to the number of patches
  shifted_patches: bool = True  # the protocol's half-shifted second pass
  fid_batch: int = 32  # patches per Inception call
  fid_patch: int = fid.PATCH  # the protocol's 256 (smaller: tests only)
  qualities: tuple[int, ...] = ()  # baselines' grid; empty: per codec
  kid_subsets: int = 100


LPIPS_HINT = (
  "LPIPS: not measured; pass --lpips-weights FILE.npz "
  "(--config.diffusion.lpips_weights in the main job): the lpips_vgg.npz "
  "that python -m cdc_jax.convert checkpoint writes for a rho > 0 "
  "checkpoint, or one written by python -m cdc_jax.convert lpips"
)


def lpips_of(opts: Options):
  """The LPIPS scorer of ``opts.lpips_weights`` (None when unset)."""
  if not opts.lpips_weights:
    return None
  params = lpips.load(opts.lpips_weights, opts.lpips_net or None)
  return measure.lpips_scorer(params)


def fid_hint() -> str:
  """The line printed when FID/KID were not measured."""
  return (
    "FID/KID: not measured; pass --inception-weights FILE (.npz or .pth; "
    f"eval.inception_weights in the main job's config): {fid.fetch_hint()}"
  )


# Under the feature dimension the covariance is rank-deficient; the field
# reports FID on thousands of patches (CLIC2020, DIV2K, COCO).
FEW_PATCHES = 2048


def check(opts: Options) -> None:
  """Raises SettingError (one line naming the flag) for options that would
  fail only after decoding has begun; reads ``opts.references`` now."""
  if opts.kid_subset_size < 2:
    raise SettingError(
      f"--kid-subset-size must be >= 2, got {opts.kid_subset_size}"
    )
  for name in opts.samplers:
    if name not in samplers.SAMPLERS:
      raise SettingError(
        f"--samplers: unknown sampler {name!r}; use one or more of "
        f"{', '.join(samplers.SAMPLERS)}"
      )
  if not opts.samplers:
    raise SettingError("--samplers: name at least one sampler")
  if opts.fid_batch < 1:
    raise SettingError(f"--fid-batch must be >= 1, got {opts.fid_batch}")
  for c in opts.baselines:
    lo, hi = baselines.quality_range(c)  # also rejects unknown codecs
    bad = [q for q in opts.qualities if not lo <= q <= hi]
    if bad:
      raise SettingError(
        f"--qualities {bad}: outside {c}'s quality range [{lo}, {hi}]"
      )
  if opts.references:
    report.read_reference_points(opts.references)


def codec_names(opts: Options, models: dict) -> list[str]:
  """The codecs a run's rows will name (the BD-rate anchors there are)."""
  names = list(opts.baselines)
  for cm in models.values():
    names += [report.cdc_name(s, g, m) for m, s, g in _settings(cm, opts)]
  return list(dict.fromkeys(names))


def check_anchor(opts: Options, models: dict) -> None:
  """``opts.anchor`` must be a codec of the run, else every BD-rate
  would come out empty."""
  names = codec_names(opts, models)
  if opts.anchor not in names:
    raise SettingError(
      f"--anchor {opts.anchor!r} is not a codec of this run; one of: "
      f"{', '.join(names)}"
    )


def inception_of(opts: Options):
  """The FID extractor of ``opts.inception_weights`` (None when unset).
  Raises ``InceptionWeightsError`` (a ValueError, one line: the file and
  where to get it)."""
  if not opts.inception_weights:
    return None
  return fid.load_inception(opts.inception_weights)


def _settings(cm, opts: Options) -> list[tuple[str, int, float]]:
  """(sampler, S, gamma) of every CDC row of ``cm``."""
  steps = opts.steps or (codec.DEFAULT_STEPS[cm.family],)
  return [(m, s, g) for m in opts.samplers for s in steps for g in opts.gammas]


def measure_set(
  models: dict, images, opts: Options, out: str, lpips_fn=None, extractor=None
):
  """All rows, the grids written (first model and setting) and, with an
  extractor, the patch features: key -> [N, d] (``measure.ORIGINALS``
  and each (codec, setting) that gets FID); None without one."""
  usable = [
    c for c in opts.baselines if baselines.unavailable_reason(c) is None
  ]
  recon_dir = None
  if opts.save_reconstructions:
    recon_dir = os.path.join(out, "reconstructions")
    files.make_output_dir(recon_dir, "reconstructions folder")
  feats, sink = None, None
  if extractor is not None:
    feats = measure.PatchFeatures(
      extractor, opts.fid_batch, opts.fid_patch, opts.shifted_patches
    )
    sink = feats.add_row
  rows, grids = [], []
  for name, img in measure.progress(images, None, "images", opts.progress):
    if feats is not None:
      feats.add(measure.ORIGINALS, img)
    first = None
    for label, cm in models.items():
      r, recs = measure.cdc_rows(
        cm, label, name, img, _settings(cm, opts), lpips_fn, recon_dir
      )
      if sink is not None:
        for row, rec in zip(r, recs, strict=True):
          sink(row, rec)
      rows += r
      first = first or (r[0], recs[0])
    rows += measure.baseline_rows(
      name, img, usable, lpips_fn, opts.qualities, sink
    )
    near = measure.nearest_rows(name, img, usable, first[0]["bpp"], lpips_fn)
    rows += near
    grids.append(_grid(out, name, img, first[1], near))
  return rows, grids, None if feats is None else feats.features()


def _grid(out: str, name: str, img, rec, near: list[dict]) -> str:
  """original | CDC (first model and setting) | baselines at its bpp."""
  grid_dir = os.path.join(out, "grids")
  files.make_output_dir(grid_dir, "grids folder")
  parts = [img, rec]
  for r in near:
    c = r["codec"].split()[0]
    parts.append(baselines.decode(baselines.encode(img, c, r["quality"])))
  path = os.path.join(grid_dir, f"{report.file_stem(name)}.png")
  return report.grid(path, parts)


def write_report(
  out: str, rows: list[dict], opts: Options, dataset: dict | None = None
) -> dict:
  """Tables, plots and BD-rates of ``rows`` into ``out``; ``dataset``
  (``measure.fid_kid``) adds FID/KID to the summary rows of its keys."""
  report.write_rows(rows, os.path.join(out, "per_image"))
  summary = report.summarize(rows)
  report.add_dataset_metrics(summary, dataset or {})
  report.write_rows(summary, os.path.join(out, "summary"))
  refs = []
  if opts.references:
    refs = report.read_reference_points(opts.references)
  plots, bd = [], {}
  for metric in report.METRICS:
    if not any(metric in r for r in summary):
      continue
    path = os.path.join(out, f"rd_{metric}.png")
    if report.rd_plot(summary, metric, path, refs, opts.title):
      plots.append(path)
    rates = report.bd_rates(summary, metric, opts.anchor)
    # No overlap gives NaN: null in the JSON, as None does.
    bd[metric] = {
      c: v if v is not None and math.isfinite(v) else None
      for c, v in rates.items()
    }
  payload = json.dumps({"anchor": opts.anchor, "bd_rate_percent": bd}, indent=2)
  write_atomic(os.path.join(out, "bd_rate.json"), payload.encode())
  return {"summary": summary, "plots": plots, "bd_rate": bd}


def evaluate(
  models: dict, images, out: str, opts: Options, lpips_fn=None, extractor=None
):
  """Runs everything; returns the summary rows and the written paths.

  ``lpips_fn`` (``measure.lpips_scorer``) overrides ``opts.lpips_weights``
  and ``extractor`` (``fid.Extractor`` or a stand-in) overrides
  ``opts.inception_weights``; weights are loaded before any decoding, so
  a bad file fails at once (``LPIPSWeightsError``,
  ``InceptionWeightsError``: one line). With FID, ``result["fid"]`` is
  what ``fid_kid.json`` holds and ``result["fid_features"]`` the
  features (``measure.ORIGINALS`` and (codec, setting) -> [N, d]).
  """
  check(opts)
  check_anchor(opts, models)
  lpips_fn = lpips_fn or lpips_of(opts)
  extractor = extractor or inception_of(opts)
  files.make_output_dir(out, "report folder")
  rows, grids, feats = measure_set(
    models, images, opts, out, lpips_fn, extractor
  )
  if not rows:
    raise SettingError("no image was evaluated (the dataset is empty)")
  dataset = None
  if feats is not None:
    dataset = measure.fid_kid(
      feats,
      measure.ORIGINALS,
      opts.kid_subset_size,
      opts.kid_subsets,
      bar=opts.progress,
    )
  result = write_report(out, rows, opts, dataset)
  result["grids"] = grids
  result["rows"] = rows
  result["out"] = out
  result["notes"] = notes(rows)
  if feats is not None:
    result["fid"] = _fid_info(feats, dataset, opts)
    payload = json.dumps(result["fid"], indent=1).encode()
    write_atomic(os.path.join(out, "fid_kid.json"), payload)
    result["fid_features"] = feats
  return result


def _fid_info(feats: dict, dataset: dict, opts: Options) -> dict:
  """The protocol, patch counts, note and per-setting FID/KID."""
  n = len(feats[measure.ORIGINALS])
  size = opts.fid_patch
  tiling = f"{size}x{size} tiles at stride {size}"
  if opts.shifted_patches:
    tiling += f", plus the same tiling shifted by {size // 2} px"
  return {
    "protocol": f"HiFiC / MS-ILLM patches: {tiling}; InceptionV3 pool3",
    "original_patches": n,
    "kid_subsets": opts.kid_subsets,
    "kid_subset_size": min(opts.kid_subset_size, n),
    "note": fid_note(n, size),
    "settings": [  # NaN (too few patches) as null
      {"codec": c, "setting": s}
      | {k: None if math.isnan(x) else x for k, x in v.items()}
      for (c, s), v in dataset.items()
    ],
  }


def notes(rows: list[dict]) -> list[str]:
  """What the summary leaves out and why: MS-SSIM when an image is under
  its minimum side (the summary averages a metric only where every image
  of the codec has it)."""
  small = sorted({r["image"] for r in rows if "ms_ssim" not in r})
  if not small:
    return []
  shown = ", ".join(small[:3]) + (", ..." if len(small) > 3 else "")
  return [
    f"MS-SSIM: not in the summary: {len(small)} image(s) under "
    f"{min_side()} px on a side ({shown}), too small for its 5 scales; "
    "the per-image rows of the other images have it"
  ]


def fid_note(patches: int, size: int = fid.PATCH) -> str:
  """How far FID/KID on ``patches`` patches per setting can be trusted."""
  if patches < 2:
    return (
      f"FID/KID: NaN, {patches} patch(es) per setting; the covariance "
      f"needs at least 2 (images of >= {size} px on both sides)"
    )
  if patches < FEW_PATCHES:
    return (
      f"FID/KID on {patches} patches per setting: not meaningful (fewer "
      f"than the {FEW_PATCHES} feature dimensions; the field uses "
      "thousands of patches: CLIC2020, DIV2K, COCO)"
    )
  return f"FID/KID on {patches} patches per setting"


def fid_lines(result: dict) -> list[str]:
  """What to print about FID/KID: the note, or how to get them."""
  if "fid" not in result:
    return [fid_hint()]
  return [result["fid"]["note"]]


def summary_lines(result: dict, table: bool = False) -> list[str]:
  """What a run prints: CDC vs the baselines per image (``table``: and
  the summary table), FID/KID, notes, where the files and report are."""
  lines = cdc_vs_baseline(result["rows"])
  if table:
    lines.append(report.summary_table(result["summary"]))
  lines += fid_lines(result) + result["notes"]
  kept = [r["file"] for r in result["rows"] if "file" in r]
  if kept:
    more = f" (and {len(kept) - 1} more)" if len(kept) > 1 else ""
    lines.append(f"file: {kept[0]}{more}")
  if result["grids"]:
    lines.append(f"original | CDC | baselines at its bpp: {result['grids'][0]}")
  lines.append(f"report: {os.path.abspath(result['out'])}")
  return lines


def cdc_vs_baseline(rows: list[dict]) -> list[str]:
  """One line per image: CDC's first setting vs each baseline at its bpp;
  ``LPIPS_HINT`` last when no row has LPIPS."""
  lines = []
  by_image: dict[str, list[dict]] = {}
  for r in rows:
    by_image.setdefault(r["image"], []).append(r)
  for name, rs in by_image.items():
    cdc = next(r for r in rs if r["codec"].startswith("cdc"))
    lines.append(f"{name}, {cdc['codec']}: {_describe(cdc)}")
    for r in rs:
      if r["codec"].endswith("at CDC bpp"):
        lines.append(
          f"  {r['codec'].split()[0]:>5} q{r['quality']}: {_describe(r)}"
        )
  if not any("lpips" in r for r in rows):
    lines.append(LPIPS_HINT)
  return lines


def _describe(r: dict) -> str:
  parts = [f"{r['bytes']} bytes = {r['bpp']:.4f} bpp"]
  if "estimated_bpp" in r:
    parts[0] += f" (estimate {r['estimated_bpp']:.4f})"
  parts.append(f"PSNR {r['psnr']:.2f} dB")
  if r.get("ms_ssim") is not None:
    parts.append(f"MS-SSIM {r['ms_ssim']:.4f}")
  if r.get("lpips") is not None:
    parts.append(f"LPIPS {r['lpips']:.4f}")
  return ", ".join(parts)
