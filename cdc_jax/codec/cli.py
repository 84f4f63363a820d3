"""The codec's command line: ``python -m cdc_jax.codec {compress,decompress}``.

  python -m cdc_jax.codec compress --model M INPUT_IMAGE OUTPUT.cdcj \
      [--steps S] [--sampler {ddim,dpmpp2m}] [--gamma G] [--seed N] \
      [--max-steps N] [--max-pixels N] \
      [--tile {N,auto} [--tile-overlap N] [--max-memory SIZE]]
  python -m cdc_jax.codec decompress --model M INPUT.cdcj OUTPUT.png \
      [--max-steps N] [--max-pixels N] [--max-memory SIZE] [--progress]

M is a model directory (exported by training, or converted from the
released PyTorch weights) or a training workdir (its latest checkpoint,
EMA params where present). Every user error is one line on stderr and exit
status 2 (Ctrl-C: one line, 130). The input and output paths are checked
before the model loads, and outputs follow ``cdc_jax.files``' rules (never
over the input; a device, FIFO or ``-`` is written to, a link written
through, never replaced). A decode shows a progress bar
(steps, s/step, ETA) on a terminal; the limits a file's header must meet
are in ``cdc_jax.codec.limits``. ``--tile`` writes a file that decodes in
tiles of bounded memory (``cdc_jax.codec.tiling``); ``--tile auto`` does so
only when a whole-image decode would not fit the memory budget.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from tqdm import tqdm

from cdc_jax import cli_errors, codec, compile_cache, files, samplers
from cdc_jax.codec import memory
from cdc_jax.coding import container
from cdc_jax.imageio import ImageError, load_image, save_png, write_atomic

# A .cdcj file is refused unread when it is larger than this many bytes
# per pixel that --max-pixels allows (64 bits per pixel; real files take
# well under 2), and never above the format's u32 size field.
MAX_FILE_BYTES_PER_PIXEL = 8
MAX_FILE_BYTES = 2**32 - 1
PIXELS_HINT = "raise the limit with --max-pixels"


def max_file_bytes(max_pixels: int) -> int:
  """The largest .cdcj file read with ``max_pixels``."""
  return min(MAX_FILE_BYTES, 65536 + MAX_FILE_BYTES_PER_PIXEL * max_pixels)


def compress_file(cm, src: str, dst: str, **kw) -> codec.Compressed:
  """Image file -> .cdcj file; returns the Compressed result. The output
  is checked before the image is read (``files.check_output``)."""
  files.check_output(dst, inputs=[src])
  max_pixels = kw.get("max_pixels", codec.DEFAULT_MAX_PIXELS)
  try:
    img = load_image(src, max_pixels, PIXELS_HINT)
  except ImageError as e:
    raise codec.CodecError(str(e)) from None
  try:
    res = codec.compress_image(cm, img, **kw)
  except codec.CodecError as e:
    raise codec.CodecError(f"{src}: {e}") from None
  write_atomic(dst, res.data, inputs=[src])
  return res


def decompress_file(cm, src: str, dst: str, **kw) -> np.ndarray:
  """.cdcj file -> PNG file; returns the image (keywords: the limits and
  ``progress`` of ``codec.decompress``). The output is checked and the
  input's kind, size and magic bytes before the file is read whole."""
  files.check_output(dst, inputs=[src])
  limit = max_file_bytes(kw.get("max_pixels", codec.DEFAULT_MAX_PIXELS))
  try:
    blob = files.read_input(
      src, ".cdcj file", limit, container.MAGIC, hint=PIXELS_HINT
    )
  except files.ReadError as e:
    raise codec.CodecError(str(e)) from None
  try:
    img = codec.decompress(cm, blob, **kw)
  except codec.CodecError as e:
    raise codec.CodecError(f"{src}: {e}") from None
  save_png(dst, img, inputs=[src])
  return img


class ProgressBar:
  """``progress(done, total)`` for a decode: a tqdm bar of steps on stderr
  (s/step, ETA), opened at the first report so that its rate leaves out
  the compile. ``enabled=None``: only on a terminal."""

  def __init__(self, enabled: bool | None = None):
    self.disable = None if enabled is None else not enabled
    self.bar = None

  def __call__(self, done: int, total: int):
    if self.bar is None:
      self.bar = tqdm(
        total=total,
        initial=done,
        unit="step",
        desc="decoding",
        disable=self.disable,
        file=sys.stderr,
      )
    else:
      self.bar.update(done - self.bar.n)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _size(text: str) -> float:
  try:
    return memory.parse_size(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _tile(text: str):
  if text == "auto":
    return text
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(
      f"not a tile size: {text!r} (pixels, a positive multiple of the "
      "model's downsampling factor, e.g. 512, or 'auto')"
    )
  return value


def _overlap(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = -1
  if value < 0:
    raise argparse.ArgumentTypeError(
      f"not a tile overlap: {text!r} (pixels, 0 or more, e.g. 64)"
    )
  return value


def _add_tiling(p: argparse.ArgumentParser):
  p.add_argument(
    "--tile",
    type=_tile,
    default=None,
    help="decode in N x N pixel tiles (a multiple of the model's 64) of "
    "bounded memory, or 'auto': tiles only if a whole-image decode would "
    "not fit --max-memory (default: decode whole)",
  )
  p.add_argument(
    "--tile-overlap",
    type=_overlap,
    default=None,
    help="pixels neighbouring tiles share at least (a multiple of 16, at "
    "most half a tile; default min(128, N/2))",
  )
  p.add_argument(
    "--max-memory",
    type=_size,
    default=None,
    help="the decoder's memory budget --tile auto plans for, e.g. 16G "
    "(default: the machine's memory or its cgroup limit)",
  )


def _add_limits(p: argparse.ArgumentParser, decoding: bool):
  what = "a file may ask for" if decoding else "to allow (decoding needs it)"
  p.add_argument(
    "--max-steps",
    type=cli_errors.positive_int,
    default=codec.DEFAULT_MAX_STEPS,
    help=f"most decode steps {what} (default {codec.DEFAULT_MAX_STEPS}; "
    "never more than the model's T)",
  )
  p.add_argument(
    "--max-pixels",
    type=cli_errors.positive_int,
    default=codec.DEFAULT_MAX_PIXELS,
    help=f"most pixels {what} (default {codec.DEFAULT_MAX_PIXELS:,})",
  )
  if not decoding:
    return
  p.add_argument(
    "--max-memory",
    type=_size,
    default=None,
    help="memory budget of the decode, e.g. 16G or 800M (decimal units; "
    "GiB, MiB binary), 'inf' for no check (default: the machine's memory "
    "or its cgroup limit); a decode whose estimate exceeds it is refused",
  )
  p.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="show a progress bar of the decode steps (default: on a terminal)",
  )


def _add_paths(p: argparse.ArgumentParser, source: str, target: str) -> None:
  """--model, then the input and output paths."""
  p.add_argument(
    "--model", required=True, help="model directory or training workdir"
  )
  p.add_argument("input", help=source)
  p.add_argument("output", help=target)


def _add_decompress(sub) -> None:
  d = sub.add_parser(
    "decompress",
    help=".cdcj file -> PNG",
    description="Decompress a .cdcj file to a PNG, with the model that "
    "compressed it.",
  )
  _add_paths(d, "input .cdcj file", "output PNG")
  d.add_argument(
    "--precision",
    choices=codec.PRECISIONS,
    default="float32",
    help="compute precision of g_s and the U-Net (default float32, the "
    "reference; bfloat16 is faster on accelerators and NOT bit-identical "
    "to a float32 decode of the same file)",
  )
  _add_limits(d, decoding=True)
  compile_cache.add_flag(d)


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
  _add_paths(c, "input image", "output .cdcj file")
  c.add_argument(
    "--steps",
    type=int,
    default=None,
    help="decode steps stored in the file (default: 200 "
    "for eps models, 65 for x models)",
  )
  c.add_argument(
    "--sampler",
    choices=tuple(samplers.SAMPLERS),
    default=samplers.DEFAULT_SAMPLER,
    help="decode sampler stored in the file: ddim (the original's, "
    "default) or dpmpp2m (DPM-Solver++(2M): as close to the converged "
    "decode in far fewer steps, see README's Samplers)",
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
  _add_limits(c, decoding=False)
  _add_tiling(c)
  compile_cache.add_flag(c)
  _add_decompress(sub)
  return p


def _default_steps(cm, steps: int | None) -> int:
  """``--steps``, or the family's default where it fits the model."""
  if steps is not None:
    return steps
  steps, t = codec.DEFAULT_STEPS[cm.family], cm.schedule.timesteps
  if steps > t:
    raise codec.CodecError(
      f"{cm.path}: the {cm.family} family's default of {steps} decode "
      f"steps is more than this model's {t} diffusion steps; pass --steps "
      f"N with N <= {t}"
    )
  return steps


def _compress(cm, args) -> str:
  res = compress_file(
    cm,
    args.input,
    args.output,
    steps=_default_steps(cm, args.steps),
    sampler=args.sampler,
    gamma=args.gamma,
    seed=args.seed,
    max_steps=args.max_steps,
    max_pixels=args.max_pixels,
    tile=args.tile,
    tile_overlap=args.tile_overlap,
    max_memory=args.max_memory,
  )
  lay = res.layout
  tiles = lay and f", {lay.tile_width}x{lay.tile_height} tiles"
  return (
    f"{args.output}: {len(res.data)} bytes, {res.width}x{res.height}, "
    f"{res.bpp:.4f} bpp (model estimate {res.estimated_bpp:.4f} bpp)"
    f"{tiles or ''}"
  )


def _decompress(cm, args) -> str:
  cm = codec.with_precision(cm, args.precision)
  bar = ProgressBar(args.progress)
  try:
    img = decompress_file(
      cm,
      args.input,
      args.output,
      max_steps=args.max_steps,
      max_pixels=args.max_pixels,
      max_memory=args.max_memory,
      progress=bar,
    )
  finally:
    bar.close()
  return f"{args.output}: {img.shape[1]}x{img.shape[0]}"


@cli_errors.user_errors(None)
def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  # Paths first: a wrong name fails before the model loads.
  what = "image" if args.cmd == "compress" else ".cdcj file"
  files.check_input(args.input, what)
  files.check_output(args.output, inputs=[args.input])
  compile_cache.enable(disabled=args.no_compile_cache)
  cm = codec.load(args.model)
  run = _compress if args.cmd == "compress" else _decompress
  line = run(cm, args)
  # A summary on stdout would corrupt a file written there.
  print(line, file=sys.stderr if files.writes_stdout(args.output) else None)
  return 0
