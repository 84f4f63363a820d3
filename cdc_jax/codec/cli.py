"""The codec's command line: ``python -m cdc_jax.codec {compress,decompress}``.

  python -m cdc_jax.codec compress --model M INPUT_IMAGE OUTPUT.cdcj \
      [--steps S] [--gamma G] [--seed N]
  python -m cdc_jax.codec decompress --model M INPUT.cdcj OUTPUT.png

M is a model directory (exported by training, or converted from the
released PyTorch weights) or a training workdir (its latest checkpoint,
EMA params where present). Every user error is one line on stderr and exit
status 2; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from cdc_jax import codec
from cdc_jax.imageio import (
  ImageError,
  WriteError,
  load_image,
  save_png,
  write_atomic,
)


def compress_file(cm, src: str, dst: str, **kw) -> codec.Compressed:
  """Image file -> .cdcj file; returns the Compressed result."""
  try:
    img = load_image(src)
  except ImageError as e:
    raise codec.CodecError(str(e)) from None
  res = codec.compress_image(cm, img, **kw)
  write_atomic(dst, res.data)
  return res


def decompress_file(cm, src: str, dst: str) -> np.ndarray:
  """.cdcj file -> PNG file; returns the image."""
  try:
    with open(src, "rb") as f:
      blob = f.read()
  except OSError as e:
    raise codec.CodecError(f"{src}: cannot read ({e.strerror})") from None
  try:
    img = codec.decompress(cm, blob)
  except codec.CodecError as e:
    raise codec.CodecError(f"{src}: {e}") from None
  save_png(dst, img)
  return img


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m cdc_jax.codec",
    description="Compress images to .cdcj files with a CDC model, and back.",
  )
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser(
    "compress",
    help="image -> .cdcj file",
    description="Compress an image (any size; PNG/JPEG/...; grayscale, "
    "RGBA, palette and 16-bit inputs become 8-bit RGB) to a .cdcj file. "
    "Prints the real bpp (file bytes * 8 / pixels) and the model's estimate.",
  )
  c.add_argument(
    "--model", required=True, help="model directory or training workdir"
  )
  c.add_argument("input", help="input image")
  c.add_argument("output", help="output .cdcj file")
  c.add_argument(
    "--steps",
    type=int,
    default=None,
    help="DDIM decode steps stored in the file (default: 200 "
    "for eps models, 65 for x models)",
  )
  c.add_argument(
    "--gamma",
    type=float,
    default=codec.DEFAULT_GAMMA,
    help="scale of the initial decode noise x_T (default 0.8)",
  )
  c.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the initial decode noise (default 0)",
  )
  d = sub.add_parser(
    "decompress",
    help=".cdcj file -> PNG",
    description="Decompress a .cdcj file to a PNG, with the model that "
    "compressed it.",
  )
  d.add_argument(
    "--model", required=True, help="model directory or training workdir"
  )
  d.add_argument("input", help="input .cdcj file")
  d.add_argument("output", help="output PNG")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    cm = codec.load(args.model)
    if args.cmd == "compress":
      res = compress_file(
        cm,
        args.input,
        args.output,
        steps=args.steps,
        gamma=args.gamma,
        seed=args.seed,
      )
      print(
        f"{args.output}: {len(res.data)} bytes, {res.height}x{res.width}, "
        f"{res.bpp:.4f} bpp (model estimate {res.estimated_bpp:.4f} bpp)"
      )
    else:
      img = decompress_file(cm, args.input, args.output)
      print(f"{args.output}: {img.shape[0]}x{img.shape[1]}")
  except (codec.CodecError, WriteError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
