"""Tiled decoding against whole-image decoding: PSNR, peak memory, time.

  # (a) the PSNR cost of tiling where both fit, and the peak RSS of both
  python -m benchmarks.decode_tiled --config configs/eps_linear.py \
      --size 512x768 --variants whole,256:64,384:128 --steps 2
  python -m benchmarks.decode_tiled --model MODEL_DIR --steps 65 ...
  # (b) the largest image: a full-size model, 3840x2160, tiles as
  # --tile auto picks them for the machine's memory
  python -m benchmarks.decode_tiled --config configs/eps_linear.py \
      --size 2160x3840 --variants auto --steps 2

The model is ``--model DIR`` (a model directory or training workdir, e.g.
a trained one), or ``--config path[:variant]`` / ``testing:eps`` (random
init, as benchmarks/codec.py builds it, with its entropy model calibrated
on a 256x384 crop: ``cdc_jax.testing.calibrate_entropy_model``). A random
U-Net reconstructs nothing: its PSNR against the original is meaningless,
and the tiled-vs-whole PSNR only says how much tiling moves the decode of
that network; measure a trained model for the real cost.

The image is ``skimage.data.coffee()`` resized to cover ``--size`` (or
``--image``). It is compressed once per variant (same seed and latents)
in a subprocess; then each file is decoded in a fresh subprocess with
``codec.decompress`` (JAX's default compile options, no memory check),
which reports its peak RSS (``ru_maxrss``), the peak above its RSS after
``codec.load`` (VmHWM, as benchmarks/decode_memory.py), the time of each
step (from the progress callback; the first includes the compiles), the
compile time and the ``codec.memory`` estimate. Variants: ``whole``,
``auto`` (``tile="auto"`` for ``--max-memory``), ``N`` or ``N:O`` (N x N
tiles, overlap O pixels). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time

from benchmarks.process_memory import above, gb, mark, run_child

MODULE = "benchmarks.decode_tiled"  # run_child runs this module
CALIBRATION = (256, 384)


def _variant_kw(variant: str, max_memory) -> dict:
  if variant == "whole":
    return {}
  if variant == "auto":
    return {"tile": "auto", "max_memory": max_memory}
  tile, _, overlap = variant.partition(":")
  kw = {"tile": int(tile)}
  if overlap:
    kw["tile_overlap"] = int(overlap)
  return kw


# -- subprocesses --------------------------------------------------------------


def prepare(args, workdir: str) -> str:
  """The model directory (exported here unless --model) and the image."""
  import jax
  import numpy as np
  import skimage.data

  jax.config.update("jax_disable_most_optimizations", True)  # setup only
  from benchmarks.codec import fit, model_from_config
  from cdc_jax import model_dir, testing
  from cdc_jax.imageio import load_image

  h, w = args.size
  src = load_image(args.image) if args.image else skimage.data.coffee()
  np.save(
    os.path.join(workdir, "image.npy"), np.ascontiguousarray(fit(src, h, w))
  )
  if args.model:
    return args.model
  path = os.path.join(workdir, "model")
  if args.config.startswith("testing:"):
    testing.export_tiny(path, args.config.partition(":")[2])
    return path
  model, model_cfg, diff_cfg, params = model_from_config(args.config, 0)
  calib = np.ascontiguousarray(fit(skimage.data.coffee(), *CALIBRATION))
  params = testing.calibrate_entropy_model(model, params, calib)
  model_dir.export(path, model_cfg, diff_cfg, params)
  return path


def zero_file(cm, img, steps: int, **kw):
  """A valid file of ``img``'s size whose symbols are all 0 (y_hat = mu),
  made without the encoder's transforms (``kw``: tiles, as ``compress``)."""
  import jax.numpy as jnp
  import numpy as np

  from cdc_jax import codec
  from cdc_jax.codec import tiling
  from cdc_jax.coding import container

  h, w, _ = img.shape
  f = cm.downsampling_factor
  shapes = cm.model.latent_shapes(1, *codec.padded_size(h, w, f))
  z = np.zeros(shapes["z"], np.int32)
  _, sigma = cm.hyper(cm.params, jnp.asarray(z))
  y = np.zeros(shapes["y"], np.int32)
  idx = cm.y_indexes(z, sigma, container.FORMAT_VERSION)
  latents = codec.Latents(z, y, idx, 0.0)
  layout = tiling.plan(
    cm.model,
    h,
    w,
    kw.get("tile"),
    kw.get("tile_overlap"),
    kw.get("max_memory"),
  )
  header = container.Header(
    fingerprint=cm.fingerprint,
    height=h,
    width=w,
    family=codec.FAMILY_IDS[cm.family],
    steps=steps,
    gamma=codec.DEFAULT_GAMMA,
    **(layout.header_fields() if layout else {}),
  )
  blob = container.pack(header, [codec.entropy_encode(cm, latents)])
  return codec.Compressed(blob, 0.0, h, w, layout)


def encode(
  model: str, workdir: str, variants: list, steps: int, max_memory, zeros: bool
):
  """Compresses the image once per variant; prints a JSON line."""
  import numpy as np

  from cdc_jax import codec

  cm = codec.load(model)
  img = np.load(os.path.join(workdir, "image.npy"))
  out = {}
  for v in variants:
    t = time.perf_counter()
    kw = _variant_kw(v, max_memory)
    if zeros:
      res = zero_file(cm, img, steps, **kw)
    else:
      res = codec.compress_image(cm, img, steps=steps, seed=0, **kw)
    with open(os.path.join(workdir, f"{v}.cdcj"), "wb") as f:
      f.write(res.data)
    lay = res.layout
    out[v] = {
      "encode_s": time.perf_counter() - t,
      "bytes": len(res.data),
      "layout": None
      if lay is None
      else [lay.tile_height, lay.tile_width, lay.overlap],
    }
  out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(out))


def decode(model: str, workdir: str, variant: str):
  """Decodes one file in this fresh process; prints a JSON line."""
  import jax
  import numpy as np

  from cdc_jax import codec

  compile_s = [0.0]

  def on_event(event, duration, **kw):
    if event in (
      "/jax/core/compile/jaxpr_to_mlir_module_duration",
      "/jax/core/compile/backend_compile_duration",
    ):
      compile_s[0] += duration

  jax.monitoring.register_event_duration_secs_listener(on_event)
  cm = codec.load(model)
  with open(os.path.join(workdir, f"{variant}.cdcj"), "rb") as f:
    blob = f.read()
  header, _ = codec.parse(cm, blob)
  loaded = mark()
  marks = []
  t0 = time.perf_counter()
  img = codec.decompress(
    cm,
    blob,
    max_memory=math.inf,
    progress=lambda d, t: marks.append((d, time.perf_counter() - t0)),
  )
  total = time.perf_counter() - t0
  np.save(os.path.join(workdir, f"{variant}.npy"), img)
  from cdc_jax.codec import tiling

  est = codec.memory.decode_memory(
    cm.model, header.height, header.width, tile=tiling.tile_of(header)
  )
  print(
    json.dumps(
      {
        "loaded_rss": loaded,
        "peak_above_load": above(loaded),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": total,
        "marks": marks,
        "compile_s": compile_s[0],
        "estimate": est,
      }
    )
  )


# -- the report ----------------------------------------------------------------


def report(args, workdir: str, model: str) -> dict:
  import numpy as np

  from cdc_jax.eval.metrics import psnr

  t = time.perf_counter()
  enc = run_child(
    MODULE,
    "--encode",
    model,
    workdir,
    ",".join(args.variants),
    args.steps,
    args.max_memory or "none",
    int(args.zero_latents),
  )
  print(
    f"encode: {time.perf_counter() - t:.0f} s for {len(args.variants)} "
    f"file(s), peak RSS {gb(enc['peak_rss'])}"
  )
  img = np.load(os.path.join(workdir, "image.npy"))
  rows = {}
  for v in args.variants:
    row = run_child(MODULE, "--decode", model, workdir, v)
    row.update(enc[v])
    row["out"] = np.load(os.path.join(workdir, f"{v}.npy"))
    (d0, t0), (d1, t1) = row["marks"][0], row["marks"][-1]
    row["s_per_step"] = (t1 - t0) / (d1 - d0) if d1 > d0 else None
    row["psnr_original"] = float(psnr(row["out"], img))
    rows[v] = row
    lay = row["layout"]
    what = (
      "whole" if lay is None else f"{lay[1]}x{lay[0]} tiles, overlap {lay[2]}"
    )
    sps = row["s_per_step"]
    print(
      f"{v} ({what}, {row['bytes']} bytes): decode {row['seconds']:.1f} s "
      f"(compile {row['compile_s']:.1f} s; "
      f"{'n/a' if sps is None else f'{sps:.2f}'} s/step after the first); "
      f"peak RSS {gb(row['ru_maxrss'])} (ru_maxrss), "
      f"{gb(row['peak_above_load'])} above the loaded model "
      f"(codec.memory estimate {gb(row['estimate'])}); "
      f"PSNR vs original {row['psnr_original']:.2f} dB"
    )
  if "whole" in rows:
    for v, row in rows.items():
      if v != "whole":
        p = float(psnr(row["out"], rows["whole"]["out"]))
        diff = np.abs(row["out"].astype(int) - rows["whole"]["out"])
        row["psnr_vs_whole"] = p
        print(
          f"{v} vs whole: PSNR {p:.2f} dB, mean |diff| {diff.mean():.2f}, "
          f"max {diff.max()} levels; PSNR vs original "
          f"{row['psnr_original'] - rows['whole']['psnr_original']:+.2f} dB"
        )
  for row in rows.values():
    del row["out"]
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group()
  src.add_argument("--model", help="model directory or training workdir")
  src.add_argument(
    "--config", default="testing:eps", help="config[:variant] or testing:eps"
  )
  p.add_argument("--image", help="an image file (default: skimage coffee)")
  p.add_argument("--size", default="512x768", help="H x W (default 512x768)")
  p.add_argument("--variants", default="whole,256:64", help="see above")
  p.add_argument("--steps", type=int, default=2, help="decode steps S")
  p.add_argument("--max-memory", help="the budget of --variants auto")
  p.add_argument("--workdir", help="keep the files here (default: a tmp dir)")
  p.add_argument(
    "--zero-latents",
    action="store_true",
    help="make the files from zero symbols (y_hat = mu) instead of "
    "encoding the image: for decode time and memory where the encoder "
    "(whole-image g_a) does not fit; PSNR then means nothing",
  )
  p.add_argument("--encode", nargs=6, help=argparse.SUPPRESS)
  p.add_argument("--decode", nargs=3, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.encode:
    model, workdir, variants, steps, budget, zeros = args.encode
    from cdc_jax.codec.memory import parse_size

    budget = None if budget == "none" else parse_size(budget)
    variants = variants.split(",")
    encode(model, workdir, variants, int(steps), budget, zeros == "1")
    return 0
  if args.decode:
    decode(*args.decode)
    return 0
  args.size = tuple(int(v) for v in args.size.split("x"))
  args.variants = args.variants.split(",")
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    os.makedirs(workdir, exist_ok=True)
    t = time.perf_counter()
    model = prepare(args, workdir)
    print(
      f"{args.model or args.config}: {args.size[1]}x{args.size[0]}, "
      f"S = {args.steps}; model ready in {time.perf_counter() - t:.0f} s; "
      f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    rows = report(args, workdir, model)
    print(json.dumps({"args": vars(args), "rows": rows}, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
