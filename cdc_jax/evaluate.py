"""Evaluate CDC models like the paper and its peers (real files, PSNR,
MS-SSIM, LPIPS when weights are given), beside JPEG, WebP and AVIF.

  python -m cdc_jax.evaluate --model models/eps_b0.1024 \\
      --dataset kodak --data /data/kodak --out eval/kodak
  python -m cdc_jax.evaluate --model runs/x --dataset held_out --out /tmp/e

``--model`` takes model directories or training workdirs (latest
checkpoint, EMA params), repeatable, optionally ``label=path``. The last
line printed names the report folder (see ``cdc_jax.eval.pipeline``).
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "python -m cdc_jax.evaluate"


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  p.add_argument("--model", action="append", required=True, help="[label=]path")
  p.add_argument(
    "--dataset",
    default="folder",
    help="kodak, tecnick, div2k, coco, clic, folder, or held_out (the "
    "embedded held-out photo; no --data)",
  )
  p.add_argument("--data", default="", help="the dataset's folder")
  p.add_argument("--out", required=True, help="report folder")
  p.add_argument("--limit", type=int, default=None, help="first N images")
  p.add_argument("--steps", default="", help="decode steps, e.g. 17,65")
  p.add_argument("--gammas", default="0.8", help="x_T scales, e.g. 0.6,0.8")
  p.add_argument("--baselines", default="jpeg,webp,avif")
  p.add_argument("--anchor", default="jpeg", help="BD-rate anchor codec")
  p.add_argument("--references", default="", help="CSV of published points")
  p.add_argument("--save-reconstructions", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  return p


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v)


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(",") if v)


def load_images(dataset: str, data: str, limit: int | None):
  from cdc_jax.eval import datasets, held_out

  if dataset == "held_out":
    return [("chelsea (held out)", held_out.held_out_image())]
  return list(datasets.images(dataset, data, limit))


def load_models(specs: list[str]) -> dict:
  from cdc_jax import codec

  models = {}
  for spec in specs:
    label, _, path = spec.rpartition("=")
    label = label or os.path.basename(os.path.normpath(path))
    models[label] = codec.load(path)
  return models


def run(args) -> dict:
  from cdc_jax.eval import pipeline

  opts = pipeline.Options(
    steps=_ints(args.steps),
    gammas=_floats(args.gammas),
    baselines=tuple(b for b in args.baselines.split(",") if b),
    anchor=args.anchor,
    references=args.references,
    save_reconstructions=args.save_reconstructions,
    progress=not args.no_progress,
    title=args.dataset,
  )
  models = load_models(args.model)
  images = load_images(args.dataset, args.data, args.limit)
  result = pipeline.evaluate(models, images, args.out, opts)
  print("\n".join(pipeline.cdc_vs_baseline(result["rows"])))
  print(pipeline.report.summary_table(result["summary"]))
  print(f"report: {os.path.abspath(args.out)}")
  return result


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  from cdc_jax.jobs import USER_ERRORS

  try:
    run(args)
  except USER_ERRORS as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
