"""Decode samplers against the converged decode: dB and time per S.

  python -m benchmarks.samplers /tmp/cdc_tiny/model        # or a workdir
  python -m benchmarks.samplers MODEL --photos chelsea,rocket,camera \
      --size 256x256 --steps 2,4,8,16,32,65 --ref-steps 1000 \
      --samplers ddim,dpmpp2m --out /tmp/samplers
  # the solver's grid, measured: one line per grid
  python -m benchmarks.samplers MODEL --solver-grids logsnr,quadratic,time

For a model directory (or training workdir), each photo (a centre crop of
``--size`` of an ``skimage.data`` photo; the defaults are not among the
quick start's training photos) is encoded once (``codec.compress``: one
file, one seed). Its latents are decoded, all from the same x_T,
whole-image, through ``codec.tiling.run``: with DDIM at S =
``--ref-steps``, the reference end point of the probability-flow ODE,
with the solver at S = ``--ode-steps`` (a second reference: DDIM, first
order, is still ~45 dB from it at S = 1000 on a trained tiny x model,
where the solver's decodes at S = 1000 on two different grids agree to
63 dB), then with each sampler at each S (default 2, 4, 8, 16, 32, 65,
and 200 for an eps model). Per decode: PSNR against each reference
(float decodes clipped to [-1, 1], peak-to-peak 2: how well the ODE is
solved), PSNR and MS-SSIM of the uint8 image against the photo, and the
decode time (g_s and the loop; the first photo's decodes include the
compile, so the time is the median over the other photos when there are
any). First, whether the model uses its latent at all: each photo
decoded (DDIM, the family's default S) from its own latent and from the
next photo's, the PSNR gap against the photo (``latent_use``). Prints a
table and writes ``samplers.json`` and ``samplers.png`` (dB against each
reference vs S, one line per sampler) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from cdc_jax import codec, samplers, testing
from cdc_jax.codec import tiling
from cdc_jax.eval import metrics
from cdc_jax.eval.ms_ssim import min_side as ms_ssim_min_side
from cdc_jax.sample import initial_noise

PHOTOS = "chelsea,rocket,camera"
STEPS = "2,4,8,16,32,65"
EPS_EXTRA_STEPS = (200,)  # the eps family's default S


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("model", help="model directory or training workdir")
  p.add_argument("--photos", default=PHOTOS, help="skimage.data names")
  p.add_argument("--size", default="256x256", help="crop H x W")
  p.add_argument("--steps", help=f"S list (default {STEPS}, +200 for eps)")
  p.add_argument("--ref-steps", type=int, default=1000, help="DDIM ref S")
  p.add_argument(
    "--ode-steps",
    type=int,
    default=1000,
    help="S of the solver's reference decode (0: none)",
  )
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


def references(cm, cases: list, ref_steps: int, ode_steps: int) -> list:
  """Per photo {"ddim": DDIM-ref_steps decode, "ode": dpmpp2m-ode_steps
  decode (when ode_steps)}, floats clipped to [-1, 1]."""
  out = []
  for name, case in cases:
    ref, ref_img, seconds = decode(cm, case, ref_steps, "ddim")
    line = (
      f"  {name}: {case['bytes']} bytes, DDIM-{ref_steps} "
      f"{metrics.psnr(ref_img, case['img']):.2f} dB ({seconds:.1f} s)"
    )
    refs = {"ddim": ref}
    if ode_steps:
      refs["ode"], _, seconds = decode(cm, case, ode_steps, "dpmpp2m")
      line += (
        f", dpmpp2m-{ode_steps} {seconds:.1f} s, the two "
        f"{psnr_float(ref, refs['ode']):.2f} dB apart"
      )
    print(line, flush=True)
    out.append(refs)
  return out


def measure(cm, cases: list, lines, steps_list, refs: list) -> list:
  """One row per (line, S): means over the photos."""
  print(HEADER, flush=True)
  rows = []
  for label, sampler, grid in lines:
    for steps in steps_list:
      per = []
      for (_, case), ref in zip(cases, refs, strict=True):
        x, image, seconds = decode(cm, case, steps, sampler, grid)
        ode = ref.get("ode")
        per.append(
          (
            psnr_float(x, ref["ddim"]),
            np.nan if ode is None else psnr_float(x, ode),
            metrics.psnr(image, case["img"]),
            ms_ssim(image, case["img"]),
            seconds,
          )
        )
      keys = ("psnr_vs_ddim_ref", "psnr_vs_ode_ref", "psnr", "ms_ssim")
      row = {"sampler": label, "steps": steps}
      row.update(
        {k: float(np.mean([p[i] for p in per])) for i, k in enumerate(keys)}
      )
      times = [p[-1] for p in per]
      row["seconds"] = statistics.median(times[1:] or times)
      rows.append(row)
      print(format_row(row), flush=True)
  return rows


def latent_use(cm, cases: list) -> dict:
  """Does the model decode its latent? Each photo decoded (DDIM, the
  family's default S) from its own latent and from the next photo's
  (the same x_T), both against the photo; the gap is what the file adds.
  Needs two photos or more (None otherwise)."""
  if len(cases) < 2:
    return None
  steps = codec.DEFAULT_STEPS[cm.family]
  own, other = [], []
  for i, (_, case) in enumerate(cases):
    swapped = dict(case, y_hat=cases[(i + 1) % len(cases)][1]["y_hat"])
    own.append(metrics.psnr(decode(cm, case, steps, "ddim")[1], case["img"]))
    rec = decode(cm, swapped, steps, "ddim")[1]
    other.append(metrics.psnr(rec, case["img"]))
  out = {
    "steps": steps,
    "psnr_own_latent": float(np.mean(own)),
    "psnr_next_photos_latent": float(np.mean(other)),
  }
  out["gap_db"] = out["psnr_own_latent"] - out["psnr_next_photos_latent"]
  print(
    f"latent use (DDIM-{steps}, vs the photo): own latent "
    f"{out['psnr_own_latent']:.2f} dB, the next photo's "
    f"{out['psnr_next_photos_latent']:.2f} dB: {out['gap_db']:.2f} dB gap",
    flush=True,
  )
  return out


HEADER = (
  f"{'sampler':<20} {'S':>5} {'vs DDIM ref':>11} {'vs ODE ref':>10} "
  f"{'PSNR':>7} {'MS-SSIM':>8} {'time':>8}"
)


def format_row(r: dict) -> str:
  return (
    f"{r['sampler']:<20} {r['steps']:>5} {r['psnr_vs_ddim_ref']:>11.2f} "
    f"{r['psnr_vs_ode_ref']:>10.2f} {r['psnr']:>7.2f} {r['ms_ssim']:>8.4f} "
    f"{r['seconds']:>7.2f}s"
  )


def json_value(v):
  """NaN (no ODE reference, MS-SSIM of a small crop) as null."""
  return None if isinstance(v, float) and np.isnan(v) else v


def plot(rows: list, path: str, title: str, labels: dict) -> None:
  """dB against each reference vs S, one line per sampler."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = [k for k in labels if not np.isnan(rows[0][k])]
  fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4))
  ticks = sorted({r["steps"] for r in rows})
  for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
    for name in dict.fromkeys(r["sampler"] for r in rows):
      mine = [r for r in rows if r["sampler"] == name]
      ax.plot(
        [r["steps"] for r in mine], [r[key] for r in mine], "o-", label=name
      )
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("decode steps S (U-Net calls)")
    ax.set_ylabel(f"PSNR vs {labels[key]} (dB)")
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.suptitle(title, fontsize=9)
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
    f"{size[1]}x{size[0]}, ref DDIM-{args.ref_steps}"
    + (f" and dpmpp2m-{args.ode_steps}, " if args.ode_steps else ", ")
    + f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    flush=True,
  )
  cases = [
    (n, encode(cm, img, args.seed)) for n, img in load_photos(args.photos, size)
  ]
  use = latent_use(cm, cases)
  refs = references(cm, cases, args.ref_steps, args.ode_steps)
  rows = measure(cm, cases, lines, steps_list, refs)
  os.makedirs(args.out, exist_ok=True)
  title = (
    f"{os.path.basename(os.path.normpath(args.model))} ({cm.family}), "
    f"{len(cases)} photos {size[1]}x{size[0]}, refs DDIM-{args.ref_steps}"
    + (f", dpmpp2m-{args.ode_steps}" if args.ode_steps else "")
  )
  labels = {
    "psnr_vs_ddim_ref": f"the DDIM-{args.ref_steps} decode",
    "psnr_vs_ode_ref": f"the dpmpp2m-{args.ode_steps} decode",
  }
  plot(rows, os.path.join(args.out, "samplers.png"), title, labels)
  report = {
    "model": os.path.abspath(args.model),
    "family": cm.family,
    "photos": args.photos.split(","),
    "size": list(size),
    "ref_steps": args.ref_steps,
    "ode_steps": args.ode_steps,
    "bytes": {n: c["bytes"] for n, c in cases},
    "latent_use": use,
    "rows": [{k: json_value(v) for k, v in r.items()} for r in rows],
  }
  with open(os.path.join(args.out, "samplers.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}/samplers.json and samplers.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
