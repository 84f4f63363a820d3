"""Decode samplers against the converged decode: dB and time per S.

  python benchmarks/samplers.py /tmp/cdc_tiny/model        # or a workdir
  python benchmarks/samplers.py MODEL --photos chelsea,rocket,camera \
      --size 256x256 --steps 2,4,8,16,32,65 --ref-steps 1000 \
      --samplers ddim,dpmpp2m --out /tmp/samplers
  # the solver's grid, measured: one line per grid
  python benchmarks/samplers.py MODEL --solver-grids logsnr,quadratic,time

For a model directory (or training workdir), each photo (a centre crop of
``--size`` of an ``skimage.data`` photo; the defaults are not among the
quick start's training photos) is encoded once (``codec.compress``: one
file, one seed). Its latents are decoded with DDIM at S = ``--ref-steps``,
the reference end point of the probability-flow ODE, then with each
sampler at each S (default 2, 4, 8, 16, 32, 65, and 200 for an eps
model), all from the same x_T, whole-image, through ``codec.tiling.run``.
Per decode: PSNR against the reference decode (float decodes clipped to
[-1, 1], peak-to-peak 2: how well the ODE is solved), PSNR and MS-SSIM
of the uint8 image against the photo, and the decode time (g_s and the
loop; the first photo's decodes include the compile, so the time is the
median over the other photos when there are any). Prints a table and
writes ``samplers.json`` and ``samplers.png`` (dB against the reference
vs S, one line per sampler) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cdc_jax import codec, samplers, testing  # noqa: E402
from cdc_jax.codec import tiling  # noqa: E402
from cdc_jax.eval import metrics  # noqa: E402
from cdc_jax.eval.ms_ssim import min_side as ms_ssim_min_side  # noqa: E402
from cdc_jax.sample import initial_noise  # noqa: E402

PHOTOS = "chelsea,rocket,camera"
STEPS = "2,4,8,16,32,65"
EPS_EXTRA_STEPS = (200,)  # the eps family's default S


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("model", help="model directory or training workdir")
  p.add_argument("--photos", default=PHOTOS, help="skimage.data names")
  p.add_argument("--size", default="256x256", help="crop H x W")
  p.add_argument("--steps", help=f"S list (default {STEPS}, +200 for eps)")
  p.add_argument("--ref-steps", type=int, default=1000, help="reference S")
  p.add_argument("--samplers", default=",".join(samplers.SAMPLERS))
  p.add_argument(
    "--solver-grids",
    default="",
    help=f"also the solver on these grids ({', '.join(samplers.GRIDS)})",
  )
  p.add_argument("--seed", type=int, default=0, help="the files' seed")
  p.add_argument("--out", default="/tmp/cdc_samplers", help="output folder")
  return p.parse_args(argv)


def load_photos(names: str, size: tuple[int, int]) -> list:
  """[(name, uint8 [H, W, 3] centre crop)]."""
  out = []
  for name in names.split(","):
    full = testing.photo(name)
    top = (full.shape[0] - size[0]) // 2
    left = (full.shape[1] - size[1]) // 2
    out.append((name, testing.photo(name, size, top, left)))
  return out


def encode(cm, img: np.ndarray, seed: int) -> dict:
  """One file per photo: its header, decoded latents and x_T."""
  blob = codec.compress(cm, img, seed=seed)
  header, stream = codec.parse(cm, blob)
  return {
    "img": img,
    "bytes": len(blob),
    "header": header,
    "y_hat": codec.decode_latents(cm, header, stream),
    "x_init": initial_noise(
      header.seed, codec.noise_shape(cm, header), header.gamma
    ),
  }


@contextlib.contextmanager
def solver_grid(grid: str | None):
  """The solver on ``grid`` inside the block (None: as shipped)."""
  saved = samplers.SOLVER_GRID
  samplers.SOLVER_GRID = grid or saved
  try:
    yield
  finally:
    samplers.SOLVER_GRID = saved


def decode(cm, case: dict, steps: int, sampler: str, grid=None):
  """(float x_0 cropped, clipped to [-1, 1]; uint8 image; seconds)."""
  h, w = case["img"].shape[:2]
  t = time.perf_counter()
  with solver_grid(grid):
    x = tiling.run(
      cm, case["y_hat"], case["x_init"], steps, None, sampler=sampler
    )
    x = np.asarray(jax.block_until_ready(x))[0]
  seconds = time.perf_counter() - t
  image = codec.to_image(x, case["header"])
  return np.clip(x[:h, :w], -1.0, 1.0), image, seconds


def psnr_float(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB of floats in [-1, 1] (peak-to-peak 2)."""
  mse = float(np.mean((a.astype(np.float64) - b) ** 2))
  return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
  """MS-SSIM, NaN for crops too small for its 5 scales (< 161 px)."""
  if min(a.shape[:2]) < ms_ssim_min_side():
    return float("nan")
  return metrics.ms_ssim(a, b)


def variants(args) -> list[tuple[str, str, str | None]]:
  """(label, sampler, solver grid) per line of the table and plot."""
  out = []
  for name in args.samplers.split(","):
    samplers.sampler_id(name)  # a clear error for an unknown name
    out.append((name, name, None))
  for grid in filter(None, args.solver_grids.split(",")):
    if grid not in samplers.GRIDS:
      raise SystemExit(f"unknown grid {grid!r}; use {samplers.GRIDS}")
    out.append((f"dpmpp2m[{grid}]", "dpmpp2m", grid))
  return out


def measure(cm, cases: list, lines, steps_list, ref_steps: int) -> list:
  """One row per (line, S): means over the photos."""
  refs = []
  for name, case in cases:
    ref, ref_img, seconds = decode(cm, case, ref_steps, "ddim")
    refs.append(ref)
    print(
      f"  {name}: {case['bytes']} bytes, reference DDIM-{ref_steps} "
      f"{metrics.psnr(ref_img, case['img']):.2f} dB ({seconds:.1f} s)",
      flush=True,
    )
  print(HEADER, flush=True)
  rows = []
  for label, sampler, grid in lines:
    for steps in steps_list:
      per = []
      for (_, case), ref in zip(cases, refs, strict=True):
        x, image, seconds = decode(cm, case, steps, sampler, grid)
        per.append(
          (
            psnr_float(x, ref),
            metrics.psnr(image, case["img"]),
            ms_ssim(image, case["img"]),
            seconds,
          )
        )
      times = [p[3] for p in per]
      rows.append(
        {
          "sampler": label,
          "steps": steps,
          "psnr_vs_reference": float(np.mean([p[0] for p in per])),
          "psnr": float(np.mean([p[1] for p in per])),
          "ms_ssim": float(np.mean([p[2] for p in per])),
          "seconds": statistics.median(times[1:] or times),
        }
      )
      print(format_row(rows[-1]), flush=True)
  return rows


HEADER = (
  f"{'sampler':<20} {'S':>5} {'dB vs ref':>10} {'PSNR':>8} "
  f"{'MS-SSIM':>8} {'time':>8}"
)


def format_row(r: dict) -> str:
  return (
    f"{r['sampler']:<20} {r['steps']:>5} {r['psnr_vs_reference']:>10.2f} "
    f"{r['psnr']:>8.2f} {r['ms_ssim']:>8.4f} {r['seconds']:>7.2f}s"
  )


def plot(rows: list, path: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for label in dict.fromkeys(r["sampler"] for r in rows):
    mine = [r for r in rows if r["sampler"] == label]
    ax.plot(
      [r["steps"] for r in mine],
      [r["psnr_vs_reference"] for r in mine],
      marker="o",
      label=label,
    )
  ax.set_xscale("log")
  ticks = sorted({r["steps"] for r in rows})
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.minorticks_off()
  ax.set_xlabel("decode steps S (U-Net calls)")
  ax.set_ylabel("PSNR vs the reference decode (dB)")
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  args = parse_args(argv)
  cm = codec.load(args.model)
  size = tuple(int(v) for v in args.size.split("x"))
  if args.steps:
    steps_list = [int(v) for v in args.steps.split(",")]
  else:
    steps_list = [int(v) for v in STEPS.split(",")]
    if cm.family == "eps":
      steps_list += list(EPS_EXTRA_STEPS)
  lines = variants(args)
  print(
    f"{args.model} ({cm.family} family), photos {args.photos} at "
    f"{size[1]}x{size[0]}, reference DDIM-{args.ref_steps}, "
    f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    flush=True,
  )
  cases = [
    (n, encode(cm, img, args.seed)) for n, img in load_photos(args.photos, size)
  ]
  rows = measure(cm, cases, lines, steps_list, args.ref_steps)
  os.makedirs(args.out, exist_ok=True)
  title = (
    f"{os.path.basename(os.path.normpath(args.model))} ({cm.family}), "
    f"{len(cases)} photos {size[1]}x{size[0]}, ref DDIM-{args.ref_steps}"
  )
  plot(rows, os.path.join(args.out, "samplers.png"), title)
  report = {
    "model": os.path.abspath(args.model),
    "family": cm.family,
    "photos": args.photos.split(","),
    "size": list(size),
    "ref_steps": args.ref_steps,
    "bytes": {n: c["bytes"] for n, c in cases},
    "rows": rows,
  }
  with open(os.path.join(args.out, "samplers.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}/samplers.json and samplers.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
