"""Host input speed: the threaded Loader against the grain pipeline.

  python -m benchmarks.host_input
  python -m benchmarks.host_input --workers 0,1,2,4 --batches 40

Writes ``--images`` JPEGs of ``--size`` (default 200 of 768x512, quality
90) into a temporary folder: the embedded scikit-image photos resized with
Lanczos to cover the size, centre-cropped, then flipped, rolled and
brightened per file so that no two files are alike. Then, for the threaded
``Loader`` and for ``GrainLoader`` with each worker count, it pulls
``--batches`` batches of ``--batch`` random ``--crop`` crops (no pixel
cache: every crop decodes its file, as on a large data set) and prints
the time to the first batch (thread or worker start-up included) and the
steady rate in images per second (the batches after the first).

Only the host side is measured: nothing is sent to a device. The numbers
depend on the cores free at the time; the load average is printed with
them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from cdc_jax.data.grain_pipeline import GrainLoader
from cdc_jax.data.loader import Loader
from cdc_jax.data.sources import ImageFolderSource, embedded_images


def write_jpegs(root: str, n: int, width: int, height: int) -> None:
  """``n`` distinct photo-like JPEGs of width x height in ``root``."""
  bases = []
  for _, a in embedded_images():
    img = Image.fromarray(a)
    s = max(width / img.width, height / img.height)
    size = (round(img.width * s), round(img.height * s))
    img = img.resize(size, Image.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    bases.append(np.asarray(img.crop((left, top, left + width, top + height))))
  rng = np.random.default_rng(0)
  for k in range(n):
    a = bases[k % len(bases)]
    if rng.integers(2):
      a = a[:, ::-1]
    a = np.roll(a, int(rng.integers(width)), axis=1)
    gain = rng.uniform(0.8, 1.2)
    a = np.clip(a.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    path = os.path.join(root, f"img{k:04d}.jpg")
    Image.fromarray(a).save(path, quality=90)


def measure(loader, batches: int) -> tuple[float, float]:
  """(seconds to the first batch, images/s over the other batches)."""
  with loader:
    t0 = time.perf_counter()
    first = next(loader)
    t1 = time.perf_counter()
    for _ in range(batches - 1):
      next(loader)
    t2 = time.perf_counter()
  return t1 - t0, len(first) * (batches - 1) / (t2 - t1)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--size", default="768x512", help="WxH of the JPEGs")
  p.add_argument("--crop", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--batches", type=int, default=25)
  p.add_argument("--workers", default="0,1,2", help="grain worker counts")
  p.add_argument("--prefetch", type=int, default=2)
  args = p.parse_args()
  width, height = map(int, args.size.split("x"))
  with tempfile.TemporaryDirectory() as root:
    t = time.perf_counter()
    write_jpegs(root, args.images, width, height)
    source = ImageFolderSource(root)
    mb = sum(os.path.getsize(f) for f in source.files) / 2**20
    print(
      f"{args.images} JPEGs of {width}x{height} ({mb:.1f} MB) written in "
      f"{time.perf_counter() - t:.1f} s; batches of {args.batch} "
      f"{args.crop}x{args.crop} crops, {args.batches} per row"
    )
    common = dict(seed=0, prefetch=args.prefetch, cache=False)
    batch = (source, args.batch, args.crop)
    rows = [("threads (Loader)", Loader(*batch, **common))]
    for w in map(int, args.workers.split(",")):
      loader = GrainLoader(*batch, **common, worker_count=w)
      rows.append((f"grain, workers={w}", loader))
    print(f"{'pipeline':<20} {'first batch s':>14} {'images/s':>10}")
    for name, loader in rows:
      first, rate = measure(loader, args.batches)
      print(f"{name:<20} {first:14.2f} {rate:10.1f}")
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"cores: {os.cpu_count()}, load average (1, 5, 15 min): {load}")
  print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
  main()
