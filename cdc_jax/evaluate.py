"""Evaluate CDC models like the paper and its peers (real files, PSNR,
MS-SSIM, LPIPS when weights are given), beside JPEG, WebP and AVIF.

  python -m cdc_jax.evaluate --model models/eps_b0.1024 \\
      --dataset kodak --data /data/kodak --out eval/kodak
  python -m cdc_jax.evaluate --model M --dataset tfds:div2k/bicubic_x2 \\
      --split validation --image-key hr --preprocess div2k --out eval/d
  python -m cdc_jax.evaluate --model runs/x --dataset held_out --out /tmp/e \\
      --lpips-weights models/eps_b0.1024/lpips_vgg.npz
  python -m cdc_jax.evaluate --model M --dataset div2k --data /data/div2k \\
      --out eval/div2k --inception-weights pt_inception-2015-12-05.npz

``--model`` takes model directories or training workdirs (latest
checkpoint, EMA params), repeatable, optionally ``label=path``. LPIPS is
measured (column ``lpips``, ``rd_lpips.png``) when ``--lpips-weights``
names an LPIPS ``.npz``. FID and KID per setting (summary columns
``fid``, ``kid``, ``kid_std``, ``rd_fid.png``, ``fid_kid.json``; HiFiC /
MS-ILLM 256-px patches) when ``--inception-weights`` names the FID
InceptionV3 weights. The last line printed names the report folder (see
``cdc_jax.eval.pipeline``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

from cdc_jax import cli_errors, files
from cdc_jax.errors import SettingError

PROG = "python -m cdc_jax.evaluate"


def parser() -> argparse.ArgumentParser:
  first = __doc__.split("\n\n")[0]  # the first paragraph, whole
  p = argparse.ArgumentParser(prog=PROG, description=" ".join(first.split()))
  p.add_argument("--model", action="append", required=True, help="[label=]path")
  p.add_argument(
    "--dataset",
    default="folder",
    help="kodak, tecnick, div2k, coco, clic, folder, held_out (the "
    "embedded held-out photo; no --data), or tfds:<builder> (a TFDS "
    "dataset prepared as array_record; --data is its data_dir)",
  )
  p.add_argument("--data", default="", help="the dataset's folder")
  p.add_argument("--split", default="test", help="TFDS split (tfds: only)")
  p.add_argument(
    "--image-key", default="image", help="TFDS image feature (tfds: only)"
  )
  p.add_argument(
    "--preprocess",
    default="folder",
    help="tfds: only: a dataset's preprocessing (kodak, tecnick, div2k, "
    "coco, clic; folder = as they are)",
  )
  p.add_argument(
    "--out", required=True, help="report folder (created if missing)"
  )
  p.add_argument(
    "--limit",
    type=cli_errors.positive_int,
    default=None,
    help="first N images (N >= 1)",
  )
  _add_decode_flags(p)
  p.add_argument("--baselines", default="jpeg,webp,avif")
  p.add_argument("--anchor", default="jpeg", help="BD-rate anchor codec")
  p.add_argument(
    "--references",
    default="",
    help="CSV of published points: system, bpp and any of psnr, "
    "ms_ssim_db, lpips, fid",
  )
  p.add_argument(
    "--qualities",
    type=_qualities,
    default=(),
    help="the baselines' quality grid, e.g. 10,30,50 (default: per codec)",
  )
  p.add_argument(
    "--save-reconstructions",
    action="store_true",
    help="keep each CDC file (.cdcj) and its decoded PNG in "
    "OUT/reconstructions",
  )
  p.add_argument("--no-progress", action="store_true")
  _add_metric_flags(p)
  return p


def _add_decode_flags(p: argparse.ArgumentParser) -> None:
  """The CDC settings: every (sampler, S, gamma) is one row per image."""
  p.add_argument(
    "--steps", type=_ints, default=(), help="decode steps, e.g. 17,65"
  )
  p.add_argument(
    "--samplers",
    type=_names,
    default=("ddim",),
    help="decode samplers, e.g. ddim,dpmpp2m (each with every --steps)",
  )
  p.add_argument(
    "--gammas", type=_floats, default=(0.8,), help="x_T scales, e.g. 0.6,0.8"
  )


def _add_metric_flags(p: argparse.ArgumentParser) -> None:
  """The flags of the metrics that need weight files (LPIPS, FID/KID)."""
  p.add_argument(
    "--lpips-weights",
    default="",
    metavar="FILE",
    help="LPIPS weights .npz (lpips_vgg.npz of a converted rho>0 "
    "checkpoint, or python -m cdc_jax.convert lpips); adds LPIPS",
  )
  p.add_argument(
    "--lpips-net",
    choices=("vgg", "alex"),
    default=None,
    help="the LPIPS trunk; by default read from the weights file",
  )
  p.add_argument(
    "--inception-weights",
    default="",
    metavar="FILE",
    help="FID InceptionV3 weights (torch-fidelity's weights-inception-"
    "2015-12-05-6726825d.pth, pytorch-fid's pt_inception-2015-12-05-"
    "6726825d.pth, or its .npz from python -m cdc_jax.convert "
    "inception); adds FID and KID per setting",
  )
  p.add_argument(
    "--kid-subset-size",
    type=cli_errors.positive_int,
    default=1000,
    help="KID subset size (100 subsets; clipped to the patch count)",
  )
  p.add_argument(
    "--no-shifted-patches",
    action="store_true",
    help="FID/KID on the 256-px tiles only, without the 128-px-shifted pass",
  )
  p.add_argument(
    "--fid-batch",
    type=cli_errors.positive_int,
    default=32,
    help="patches per Inception call",
  )


def _ints(text: str) -> tuple[int, ...]:
  """'17,65' -> (17, 65): positive integers."""
  return tuple(cli_errors.positive_int(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
  """'ddim,dpmpp2m' -> ('ddim', 'dpmpp2m'); checked by pipeline.check."""
  return tuple(v.strip() for v in text.split(",") if v.strip())


def _qualities(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"not a list of integers: {text!r} (e.g. 10,30,50)"
    ) from None


def _floats(text: str) -> tuple[float, ...]:
  try:
    out = tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    out = ()
  if not out:
    raise argparse.ArgumentTypeError(
      f"not a list of numbers: {text!r} (e.g. 0.6,0.8)"
    )
  return out


def load_images(args):
  from cdc_jax.data import tfds_source
  from cdc_jax.eval import datasets

  if args.dataset == "held_out":
    return datasets.held_out()
  if not args.dataset.startswith(tfds_source.PREFIX):
    return list(datasets.images(args.dataset, args.data, args.limit))
  name = args.dataset.removeprefix(tfds_source.PREFIX)
  ds = datasets.get(args.preprocess)
  found = tfds_source.images(name, args.split, args.data, args.image_key)
  kept = ((n, ds.preprocess(img)) for n, img in found if ds.keep(img))
  out = list(itertools.islice(kept, args.limit))
  if not out:
    raise datasets.DatasetError(
      f"{args.dataset}: no image of split {args.split!r} qualifies for "
      f"--preprocess {args.preprocess} ({ds.description})"
    )
  return out


def model_specs(specs: list[str]) -> dict[str, str]:
  """``[label=]path`` flags -> {label: path}; a label given twice (or two
  paths with one folder name) is refused, not silently merged."""
  out: dict[str, str] = {}
  for spec in specs:
    label, _, path = spec.rpartition("=")
    label = label or os.path.basename(os.path.normpath(path))
    if label in out:
      raise SettingError(
        f"--model {spec}: the label {label!r} is already used by "
        f"--model {out[label]}; give each model its own, --model "
        "LABEL=PATH"
      )
    out[label] = path
  return out


def load_models(specs: list[str]) -> dict:
  from cdc_jax import codec

  return {label: codec.load(p) for label, p in model_specs(specs).items()}


def check_paths(args) -> None:
  """The --model labels, --out and a dataset's --data folder, before any
  model or image is read."""
  from cdc_jax.data import tfds_source
  from cdc_jax.eval import datasets

  model_specs(args.model)
  files.check_folder(args.out, "report folder (--out)")
  tfds = args.dataset.startswith(tfds_source.PREFIX)
  if args.dataset != "held_out" and not tfds:
    datasets.check_folder(args.dataset, args.data)


def run(args) -> dict:
  from cdc_jax.eval import pipeline

  opts = pipeline.Options(
    steps=args.steps,
    samplers=args.samplers,
    gammas=args.gammas,
    baselines=tuple(b for b in args.baselines.split(",") if b),
    anchor=args.anchor,
    references=args.references,
    save_reconstructions=args.save_reconstructions,
    progress=not args.no_progress,
    title=args.dataset,
    lpips_weights=args.lpips_weights,
    lpips_net=args.lpips_net or "",
    inception_weights=args.inception_weights,
    kid_subset_size=args.kid_subset_size,
    shifted_patches=not args.no_shifted_patches,
    fid_batch=args.fid_batch,
    qualities=args.qualities,
  )
  # Bad options, paths and weight files fail before any work.
  check_paths(args)
  pipeline.check(opts)
  lpips_fn = pipeline.lpips_of(opts)
  extractor = pipeline.inception_of(opts)
  models = load_models(args.model)
  pipeline.check_anchor(opts, models)
  images = load_images(args)
  result = pipeline.evaluate(
    models, images, args.out, opts, lpips_fn, extractor
  )
  print("\n".join(pipeline.summary_lines(result, table=True)))
  return result


@cli_errors.user_errors(PROG)
def main(argv=None) -> int:
  args = parser().parse_args(argv)
  from cdc_jax import compile_cache

  compile_cache.enable()  # CDC_COMPILE_CACHE=off turns it off
  run(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
