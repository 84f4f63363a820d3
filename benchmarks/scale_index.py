"""The exact scale path's cost: file size and time against the float path.

  python -m benchmarks.scale_index [--model DIR] [--photos a,b,c]

For each photo (padded to the model's factor): the file size when y's
tables are chosen by the exact integer path (format v3) and by the
float32 sigma of h_s (formats v1, v2), the model's own estimate (what
the original CDC code reports as bpp), and how many elements get another
table. Then the time of the exact path at 768x512 and 3840x2160 beside
the encoder's analysis (g_a, h_a, h_s) at 768x512. Without ``--model``:
the released eps architecture with its entropy model calibrated on the
first photo (``cdc_jax.testing.entropy_codec``; no U-Net needed).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import codec, testing
from cdc_jax.coding import container
from cdc_jax.imageio import to_float
from cdc_jax.models.cdc import CDC

PHOTOS = "motorcycle_left,motorcycle_right,coffee"


def best_of(fn, repeats: int = 3) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def file_bytes(cm, latents, idx, h, w) -> int:
  """The file's size with y coded by the tables ``idx`` (one header)."""
  header = container.Header(cm.fingerprint, h, w, steps=1)
  lat = codec.Latents(latents.z_sym, latents.y_sym, idx, 0.0)
  return len(container.pack(header, [codec.entropy_encode(cm, lat)]))


def sizes(cm, name: str) -> dict:
  img = testing.photo(name)
  h, w, _ = img.shape
  x = to_float(codec.pad_image(img, cm.downsampling_factor))[None]
  latents = codec.encode_latents(cm, x)
  _, sigma = cm.hyper(cm.params, jnp.asarray(latents.z_sym))
  legacy = cm.y_indexes(latents.z_sym, sigma, 1)
  px = h * w
  return {
    "photo": f"{name} {w}x{h}",
    "estimate": latents.estimated_bits / px,
    "exact": 8 * file_bytes(cm, latents, latents.y_indexes, h, w) / px,
    "float": 8 * file_bytes(cm, latents, legacy, h, w) / px,
    "moved": int(np.sum(legacy != latents.y_indexes)),
    "elements": legacy.size,
    "z_sym": latents.z_sym,
    "x": x,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", help="a model directory (default: see above)")
  p.add_argument("--photos", default=PHOTOS, help="skimage.data photos")
  args = p.parse_args(argv)
  names = args.photos.split(",")
  if args.model:
    cm = codec.load(args.model)
  else:
    first = testing.photo(names[0])
    cm = testing.entropy_codec(CDC(), codec.pad_image(first, 64))
  print(
    f"{'photo':24s} {'estimate':>9s} {'float':>9s} {'exact':>9s} "
    f"{'exact/float':>12s} {'moved':>12s}"
  )
  rows = [sizes(cm, n) for n in names]
  for r in rows:
    print(
      f"{r['photo']:24s} {r['estimate']:9.5f} {r['float']:9.5f} "
      f"{r['exact']:9.5f} {100 * (r['exact'] / r['float'] - 1):+11.4f}% "
      f"{r['moved']:5d}/{r['elements']}"
    )
  print(
    "(bpp: the model's estimate = the original's; file sizes include "
    "the header)"
  )
  r = next(r for r in rows if r["x"].shape[1:3] == (512, 768))
  z = r["z_sym"]
  exact = best_of(lambda: cm.scales(z))
  analysis = best_of(
    lambda: cm.hyper(cm.params, cm.analyze(cm.params, jnp.asarray(r["x"]))[1])
  )
  z4k = np.tile(z, (1, 3, 5, 1))[:, : 2176 // 64, : 3840 // 64]
  exact4k = best_of(lambda: cm.scales(z4k), 1)
  print(
    f"exact scale indexes 768x512: {exact * 1e3:.1f} ms "
    f"(analysis g_a + h_a + h_s: {analysis:.2f} s)"
  )
  print(
    f"exact scale indexes 3840x2160 (padded 3840x2176): {exact4k * 1e3:.0f} ms"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
