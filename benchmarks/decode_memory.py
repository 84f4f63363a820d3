"""Peak memory of whole-image decoding, per pixel: the codec's estimate.

  python -m benchmarks.decode_memory --config configs/eps_linear.py \
      --config configs/x_cosine.py --sizes 256x256,512x512

For each config (``path[:variant]``, a random-init model with its
entropy tables, as benchmarks/codec.py builds it; ``testing:eps`` and
``testing:x`` are the dim-4 models of ``cdc_jax.testing``) a photo
(``skimage.data.coffee``, resized) is compressed at each size with S
decode steps (``--steps``, default 1), then each file is decoded twice in
a fresh process with ``codec.decompress`` (no memory check):

* ``first``: the process's peak RSS (VmHWM) during the first decode, which
  compiles it, above its RSS after ``codec.load``: what a CLI decode
  needs beyond the loaded model;
* ``again``: the peak of a second decode of the same file (compiled),
  above the RSS before it (VmHWM reset through /proc/self/clear_refs).

Then a least-squares line through the sizes: bytes per padded pixel and
a fixed part, for ``first`` and ``again``. ``cdc_jax.codec.memory`` holds
the ``first`` fits (the conservative ones). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time

from benchmarks.process_memory import above, mark, run_child

MODULE = "benchmarks.decode_memory"  # run_child runs this module


def prepare(spec: str, workdir: str, sizes, steps: int):
  """Exports a random-init model of ``spec``; compresses one file a size."""
  import numpy as np
  import skimage.data

  from benchmarks.codec import fit, model_from_config
  from cdc_jax import codec, model_dir, testing

  path = os.path.join(workdir, "model")
  if spec.startswith("testing:"):
    testing.export_tiny(path, spec.partition(":")[2])
  else:
    _, model_cfg, diff_cfg, params = model_from_config(spec, 0)
    model_dir.export(path, model_cfg, diff_cfg, params)
  cm = codec.load(path)
  for h, w in sizes:
    img = np.ascontiguousarray(fit(skimage.data.coffee(), h, w))
    blob = codec.compress(cm, img, steps=steps)
    with open(os.path.join(workdir, f"{h}x{w}.cdcj"), "wb") as f:
      f.write(blob)


def measure(workdir: str, size: str) -> dict:
  """Decodes one file twice in this (fresh) process; prints a JSON line."""
  from cdc_jax import codec

  cm = codec.load(os.path.join(workdir, "model"))
  with open(os.path.join(workdir, f"{size}.cdcj"), "rb") as f:
    blob = f.read()
  decode = functools.partial(codec.decompress, cm, blob, max_memory=math.inf)
  out = {"loaded": mark()}
  t = time.perf_counter()
  decode()
  out["first_s"] = time.perf_counter() - t
  out["first"] = above(out["loaded"])
  before = mark()
  t = time.perf_counter()
  decode()
  out["again_s"] = time.perf_counter() - t
  out["again"] = above(before)
  print(json.dumps(out))
  return out


def line_fit(xs, ys):
  """Least squares y = a * x + b."""
  n = len(xs)
  mx, my = sum(xs) / n, sum(ys) / n
  sxx = sum((x - mx) ** 2 for x in xs)
  a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
  return a, my - a * mx


def model_of(spec: str):
  from cdc_jax import testing
  from cdc_jax.models.cdc import from_config, to_config
  from configs import common

  if spec.startswith("testing:"):
    return testing.tiny_model(spec.partition(":")[2])
  return from_config(to_config(common.load_config(spec).model))


def run_config(spec: str, sizes, steps: int) -> dict:
  from cdc_jax import codec

  model = model_of(spec)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    prepare(spec, tmp, sizes, steps)
    print(f"{spec}: model and files in {time.perf_counter() - t:.0f} s")
    for h, w in sizes:
      row = run_child(MODULE, "--measure", tmp, f"{h}x{w}")
      hp, wp = codec.padded_size(h, w, model.downsampling_factor)
      row["pixels"] = hp * wp
      row["estimate"] = codec.memory.decode_memory(model, h, w)
      rows.append(row)
      print(
        f"  {w}x{h} ({hp * wp:,} padded px): after load "
        f"{row['loaded'] / 1e6:.0f} MB; first decode +"
        f"{row['first'] / 1e6:.0f} MB ({row['first_s']:.1f} s), again +"
        f"{row['again'] / 1e6:.0f} MB ({row['again_s']:.1f} s); "
        f"codec.memory estimate {row['estimate'] / 1e6:.0f} MB"
      )
  fits = {}
  for key in ("first", "again") if len(rows) > 1 else ():
    a, b = line_fit([r["pixels"] for r in rows], [r[key] for r in rows])
    fits[key] = (a, b)
    print(f"  {key}: {a:,.0f} bytes/pixel + {b / 1e6:,.0f} MB")
  est = codec.memory.bytes_per_pixel(model)
  print(f"  codec.memory estimate: {est:,.0f} bytes/pixel")
  return {"spec": spec, "rows": rows, "fits": fits}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", action="append", help="config[:variant]")
  p.add_argument("--sizes", default="256x256,512x512", help="HxW list")
  p.add_argument("--steps", type=int, default=1, help="decode steps S")
  p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.measure:
    measure(*args.measure)
    return 0
  sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
  results = [run_config(c, sizes, args.steps) for c in args.config]
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
