"""Encoder memory: g_a + h_a per pixel, and tiled compression of big images.

  # (a) the whole-image analysis per pixel (codec.tiled_analysis constants)
  python -m benchmarks.encode_tiled --model MODEL_DIR --memory 256x256,512x512
  # (b) compress a 3840x2160 photo as the CLI's --tile auto --max-memory 8G
  python -m benchmarks.encode_tiled --model MODEL_DIR --size 2160x3840 \
      --tile auto --max-memory 8G

``--model`` is a model directory (e.g. the full eps model that
benchmarks/decode_tiled.py exports into its --workdir, random U-Net with a
calibrated entropy model), or ``testing:eps`` (the dim-4 model, exported
here). Each measurement runs in a fresh subprocess, which reports its
peak RSS (``ru_maxrss``), its peak above the RSS after ``codec.load``
(VmHWM reset through /proc/self/clear_refs) and the wall time.

(a) runs ``cm.analyze`` (g_a, h_a, Q of z: the whole-image encoder's
transforms) once per size and fits bytes per padded pixel + a fixed part
through the peaks above the loaded model. (b) runs ``codec.compress_image``
on ``embedded_images()``'s astronaut upscaled to cover the size (Lanczos,
centre crop) with ``tile``/``max_memory`` as given, and reports the
analysis tile it picked, the file size and the estimate. Linux only.
``ru_maxrss`` includes the parent's RSS when the child was started (Linux
keeps the high-water mark across fork and exec): it is the child's own
peak only for a small parent (a model directory, not ``testing:``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from benchmarks.process_memory import above, gb, mark, run_child

MODULE = "benchmarks.encode_tiled"  # run_child runs this module


def photo(h: int, w: int):
  """The embedded astronaut, upscaled to cover h x w, centre-cropped."""
  import numpy as np
  from PIL import Image

  from cdc_jax.data.sources import embedded_images

  img = dict(embedded_images())["astronaut"]
  ih, iw, _ = img.shape
  s = max(h / ih, w / iw)
  rh, rw = max(h, round(ih * s)), max(w, round(iw * s))
  im = np.asarray(Image.fromarray(img).resize((rw, rh), Image.LANCZOS))
  top, left = (rh - h) // 2, (rw - w) // 2
  return np.ascontiguousarray(im[top : top + h, left : left + w])


def child(mode: str, model: str, size: str, tile: str, budget: str):
  """One measurement in this fresh process; prints a JSON line."""
  import jax.numpy as jnp
  import numpy as np

  from cdc_jax import codec
  from cdc_jax.codec import tiled_analysis
  from cdc_jax.codec.memory import parse_size
  from cdc_jax.imageio import to_float

  h, w = (int(v) for v in size.split("x"))
  img = photo(h, w)
  cm = codec.load(model)
  loaded = mark()
  t = time.perf_counter()
  out = {}
  if mode == "analyze":
    x = to_float(codec.pad_image(img, cm.downsampling_factor))[None]
    y, z = cm.analyze(cm.params, jnp.asarray(x))
    np.asarray(z), np.asarray(y)
    out["estimate"] = tiled_analysis.encode_memory(cm.model, h, w)
  else:
    kw = {"max_memory": None if budget == "none" else parse_size(budget)}
    if tile != "none":
      kw["tile"] = tile if tile == "auto" else int(tile)
    res = codec.compress_image(cm, img, **kw)
    lay = res.layout
    out.update(
      bytes=len(res.data),
      bpp=res.bpp,
      layout=None if lay is None else [lay.tile_height, lay.tile_width],
      analysis_tile=res.analysis_tile,
      estimate=tiled_analysis.encode_memory(cm.model, h, w, res.analysis_tile),
    )
  out.update(
    seconds=time.perf_counter() - t,
    loaded_rss=loaded,
    peak_above_load=above(loaded),
    ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  )
  print(json.dumps(out))


def memory(model: str, sizes: list[str]) -> dict:
  """Peaks of the whole-image analysis per size, and the line fit."""
  import numpy as np

  rows = {}
  for s in sizes:
    r = run_child(MODULE, "--child", "analyze", model, s, "none", "none")
    rows[s] = r
    print(
      f"analyze {s}: {r['seconds']:.1f} s, peak {gb(r['peak_above_load'])} "
      f"above the loaded model, ru_maxrss {gb(r['ru_maxrss'])}, "
      f"estimate {gb(r['estimate'])}"
    )
  if len(sizes) > 1:
    px = [np.prod([int(v) for v in s.split("x")]) for s in sizes]
    peaks = [rows[s]["peak_above_load"] for s in sizes]
    per_px, fixed = np.polyfit(px, peaks, 1)
    print(f"fit: {per_px:,.0f} bytes/pixel + {fixed / 1e6:,.0f} MB")
    rows["fit"] = {"bytes_per_pixel": per_px, "fixed": fixed}
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="testing:eps", help="model dir")
  p.add_argument("--memory", help="sizes HxW,... of (a)")
  p.add_argument("--size", default="2160x3840", help="H x W of (b)")
  p.add_argument("--tile", default="auto", help="auto, N or none")
  p.add_argument("--max-memory", default="8G", help="budget or none")
  p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    child(*args.child)
    return 0
  with tempfile.TemporaryDirectory() as tmp:
    model = args.model
    if model.startswith("testing:"):
      from cdc_jax import testing

      model = os.path.join(tmp, "model")
      testing.export_tiny(model, args.model.partition(":")[2])
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.memory:
      rows = memory(model, args.memory.split(","))
    else:
      r = run_child(
        MODULE,
        "--child",
        "compress",
        model,
        args.size,
        args.tile,
        args.max_memory,
      )
      print(
        f"compress {args.size} (--tile {args.tile} --max-memory "
        f"{args.max_memory}): {r['seconds']:.1f} s, ru_maxrss "
        f"{gb(r['ru_maxrss'])}, {gb(r['peak_above_load'])} above the "
        f"loaded model (estimate {gb(r['estimate'])}); analysis tile "
        f"{r['analysis_tile']}, file layout {r['layout']}, "
        f"{r['bytes']} bytes ({r['bpp']:.3f} bpp)"
      )
      rows = {"compress": r}
    print(json.dumps({"args": vars(args), "rows": rows}, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
