"""Distilled students against their teacher: dB per S beside the teacher's
own samplers, against the teacher's converged decode.

  python -m benchmarks.distill TEACHER DISTILL_WORKDIR [MORE_WORKDIRS ...]
  python -m benchmarks.distill TEACHER DISTILL_WORKDIR \
      --photos chelsea,rocket,camera --size 256x256 --ref-steps 1000 \
      --samplers ddim,dpmpp2m --out /tmp/distill

TEACHER is the model the run distilled (``distill.teacher``);
DISTILL_WORKDIR the ``--mode=distill`` workdir, whose ``model_s<S>``
folders are the students (several workdirs of the same teacher, e.g.
variants of a setting, are measured against one reference and labelled
by their folder names). Each photo (``benchmarks.samplers``' centre
crops, not among the embedded training photos) is encoded once by the
teacher; a student decodes the same file (its bitstream is the teacher's)
from the same x_T. Rows: the teacher's DDIM decode at S = ``--ref-steps``
is the reference (the converged decode); per student S, the student's
S-step decode and the teacher's own S-step decode with each sampler;
the teacher's DDIM at its family's default S (65 x, 200 eps) and at its
distillation grid's S. Per row, means over the photos: PSNR against the
reference (floats clipped to [-1, 1], peak-to-peak 2), PSNR and MS-SSIM
against the photo, decode time (median over the photos after the first,
which compiles). First, the teacher's latent use (``benchmarks.samplers``).
The distillation cost comes from each workdir's ``rounds.json``. Writes
``distill.json`` and ``distill.png`` (dB vs S: teacher per sampler,
student) to ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

import numpy as np

from benchmarks import samplers as bs
from cdc_jax import codec, samplers
from cdc_jax.eval import metrics


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("teacher", help="the teacher's model directory or workdir")
  p.add_argument("workdirs", nargs="+", help="--mode=distill workdir(s)")
  p.add_argument("--photos", default=bs.PHOTOS, help="skimage.data names")
  p.add_argument("--size", default="256x256", help="crop H x W")
  p.add_argument("--ref-steps", type=int, default=1000, help="DDIM ref S")
  p.add_argument("--samplers", default=",".join(samplers.SAMPLERS))
  p.add_argument("--seed", type=int, default=0, help="the files' seed")
  p.add_argument("--out", default="/tmp/cdc_distill", help="output folder")
  return p.parse_args(argv)


def students(workdirs: list, teacher) -> list:
  """[(S, label, CodecModel)] of the workdirs' model_s<S> folders, S
  descending; each must decode the teacher's files."""
  out = []
  for workdir in workdirs:
    label = "student"
    if len(workdirs) > 1:
      label = f"student ({os.path.basename(os.path.normpath(workdir))})"
    found = []
    for path in glob.glob(os.path.join(workdir, "model_s*")):
      cm = codec.load(path)
      if cm.student is not None and cm.fingerprint == teacher.fingerprint:
        found.append((cm.student.steps, label, cm))
    if not found:
      raise SystemExit(f"{workdir}: no model_s<S> students of the teacher")
    out += found
  return sorted(out, key=lambda p: -p[0])


def row_of(label: str, steps: int, cm, sampler: str, cases, refs) -> dict:
  per = []
  for (_, case), ref in zip(cases, refs, strict=True):
    x, image, seconds = bs.decode(cm, case, steps, sampler)
    per.append(
      (
        bs.psnr_float(x, ref["ddim"]),
        metrics.psnr(image, case["img"]),
        bs.ms_ssim(image, case["img"]),
        seconds,
      )
    )
  row = {"decoder": label, "steps": steps}
  for i, k in enumerate(("psnr_vs_ref", "psnr", "ms_ssim")):
    row[k] = float(np.mean([p[i] for p in per]))
  times = [p[-1] for p in per]
  row["seconds"] = statistics.median(times[1:] or times)
  print(
    f"{label:<18} {steps:>5} {row['psnr_vs_ref']:>9.2f} {row['psnr']:>7.2f} "
    f"{row['ms_ssim']:>8.4f} {row['seconds']:>7.2f}s",
    flush=True,
  )
  return row


def measure(teacher, studs, names, cases, refs) -> list:
  print(f"{'decoder':<18} {'S':>5} {'vs ref':>9} {'PSNR':>7} {'MS-SSIM':>8}")
  rows = []
  base = studs[0][2].student.base_steps
  for steps in sorted({codec.DEFAULT_STEPS[teacher.family], base}):
    rows.append(row_of("teacher ddim", steps, teacher, "ddim", cases, refs))
  done = set()
  for steps, label, cm in studs:
    rows.append(
      row_of(label, steps, cm, cm.sampler.student_sampler, cases, refs)
    )
    for name in names if steps not in done else ():
      rows.append(row_of(f"teacher {name}", steps, teacher, name, cases, refs))
    done.add(steps)
  return rows


def plot(rows: list, path: str, title: str) -> None:
  """dB vs S per decoder at the students' S; the teacher's DDIM at its
  other S (its default, its grid's) as dashed lines."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  ss = {r["steps"] for r in rows if r["decoder"].startswith("student")}
  for name in dict.fromkeys(r["decoder"] for r in rows):
    mine = [r for r in rows if r["decoder"] == name and r["steps"] in ss]
    xs = [r["steps"] for r in mine]
    ax.plot(xs, [r["psnr_vs_ref"] for r in mine], "o-", label=name)
  lines: dict = {}  # dB -> S values (lines within 0.5 dB drawn once)
  for r in rows:
    if r["steps"] not in ss:
      near = [d for d in lines if abs(d - r["psnr_vs_ref"]) < 0.5]
      lines.setdefault(near[0] if near else r["psnr_vs_ref"], []).append(
        str(r["steps"])
      )
  for db, steps in lines.items():
    ax.axhline(db, ls="--", lw=1, color="gray")
    ax.annotate(
      f"teacher ddim S={', '.join(steps)}",
      (min(ss), db),
      textcoords="offset points",
      xytext=(0, 3),
      fontsize=7,
      color="gray",
    )
  ticks = sorted(ss)
  ax.set_xscale("log")
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.minorticks_off()
  ax.set_xlabel("decode steps S (U-Net calls)")
  ax.set_ylabel("PSNR vs the teacher's converged decode (dB)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _name(path: str) -> str:
  """A model's name for titles: its folder, or the workdir above a
  workdir's ``model``."""
  path = os.path.normpath(os.path.abspath(path))
  base = os.path.basename(path)
  return os.path.basename(os.path.dirname(path)) if base == "model" else base


def replot(json_path: str) -> str:
  """Redraws distill.png from a distill.json (no decoding)."""
  with open(json_path) as f:
    report = json.load(f)
  out = os.path.join(os.path.dirname(json_path), "distill.png")
  plot(report["rows"], out, report.get("title", ""))
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  teacher = codec.load(args.teacher)
  studs = students(args.workdirs, teacher)
  names = args.samplers.split(",")
  for name in names:
    samplers.sampler_id(name)
  size = tuple(int(v) for v in args.size.split("x"))
  print(
    f"teacher {args.teacher} ({teacher.family}), students S = "
    f"{', '.join(str(s) for s, _, _ in studs)}, photos {args.photos} at "
    f"{size[1]}x{size[0]}, ref DDIM-{args.ref_steps}, {os.cpu_count()} CPUs",
    flush=True,
  )
  cases = [
    (n, bs.encode(teacher, img, args.seed))
    for n, img in bs.load_photos(args.photos, size)
  ]
  use = bs.latent_use(teacher, cases)
  refs = bs.references(teacher, cases, args.ref_steps, 0)
  rows = measure(teacher, studs, names, cases, refs)
  cost = {}
  for workdir in args.workdirs:
    rounds_path = os.path.join(workdir, "rounds.json")
    if os.path.isfile(rounds_path):
      with open(rounds_path) as f:
        cost[workdir] = json.load(f)
      for r in cost[workdir]:
        print(
          f"{workdir} round {r['round']}: S {2 * r['steps']} -> "
          f"{r['steps']}, {r['optimizer_steps']} steps, {r['seconds']:.0f} s"
        )
  os.makedirs(args.out, exist_ok=True)
  title = (
    f"{_name(args.teacher)} ({teacher.family}) "
    f"and its students, {len(cases)} photos {size[1]}x{size[0]}, "
    f"ref DDIM-{args.ref_steps}"
  )
  plot(rows, os.path.join(args.out, "distill.png"), title)
  report = {
    "teacher": os.path.abspath(args.teacher),
    "workdirs": [os.path.abspath(w) for w in args.workdirs],
    "family": teacher.family,
    "photos": args.photos.split(","),
    "size": list(size),
    "ref_steps": args.ref_steps,
    "title": title,
    "latent_use": use,
    "rounds": cost,
    "rows": [{k: bs.json_value(v) for k, v in r.items()} for r in rows],
  }
  with open(os.path.join(args.out, "distill.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}/distill.json and distill.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
