"""The decoder's memory model: the estimated peak of a decode, and the
budget it is checked against (``codec.limits`` checks the rest of a header).

The estimate is ``fixed + batch * padded pixels * bytes/pixel``, fitted to
the peak RSS of decodes on CPU (``benchmarks/decode_memory.py``; numbers
in the constants below). A tiled decode (``codec.tiling``) holds one
tile's U-Net activations plus whole-image arrays (x_t, the blend
accumulator, the context maps): ``fixed + tile pixels * bytes/pixel +
padded pixels * whole-image bytes/pixel``. The budget is the machine's
physical memory or its cgroup limit on the CPU backend (never the memory
free at the moment), or ``max_memory``.
"""

from __future__ import annotations

import math
import os
import re

import jax
import numpy as np

from cdc_jax.codec.errors import CodecError
from cdc_jax.codec.geometry import padded_size

# Peak RSS of whole-image decodes on CPU (float32, S = 1, a fresh process,
# benchmarks/decode_memory.py) above the RSS after loading the model, fitted
# over two sizes as bytes per padded pixel + a fixed part:
#   model (dim, context channels)   bytes/pixel   fixed (first decode)
#   full eps (64, 3)                3,680         371 MB
#   full x (64, 64)                 3,947         326 MB
#   configs' tiny eps (8, 3)          442         302 MB
#   configs' tiny x (8, 8)            494         291 MB
#   cdc_jax.testing eps (4, 3)        217         289 MB
#   cdc_jax.testing x (4, 4)          272         285 MB
# (bytes/pixel of a second decode of the same file; the fixed part is the
# first decode's, mostly the compiler's). The estimate is an envelope: linear
# in the U-Net's full-resolution width (dim * dim_mults[0]) and the context
# channels, above every measured peak by 5 % (full) to 35 % (tiny models).
PER_PIXEL_WIDTH = 58.0  # bytes/pixel per channel of U-Net width
PER_PIXEL_CONTEXT = 5.0  # bytes/pixel per context channel
PER_PIXEL_BASE = 64.0  # bytes/pixel
FIXED = 400_000_000  # bytes: compiling the decode, the entropy decoder
# A tiled decode's whole-image arrays besides the context maps, in floats
# per padded pixel and image channel: x_T, x_t, the blend accumulator, the
# next x_t, the host copy, and y_hat, mu, sigma and the symbols (1/256 of
# the pixels times 256 channels). A tiled decode compiles more programs
# (the U-Net, g_s, slicing and blending), so its fixed part is larger.
# Peaks above the loaded model (benchmarks/decode_tiled.py, full eps, S =
# 2, random weights) against this estimate:
#   768x512 in 256x256 tiles (overlap 64)      0.77 GB   estimate 0.83 GB
#   768x512 in 512x512 tiles (overlap 128)     1.48 GB            1.58 GB
#   3840x2160 in 1024x1024 tiles (overlap 128) 5.28 GB            6.28 GB
#   3840x2160 in 896x1152 tiles (overlap 128)  5.53 GB            6.22 GB
# (the same fit gives 0.40 to 0.44 GB for the fixed part of the first two).
WHOLE_IMAGE_FLOATS = 8.0
FIXED_TILED = 500_000_000  # bytes


def bytes_per_pixel(model) -> float:
  """Decode memory per padded pixel of one image for ``model`` (a CDC)."""
  width = model.dim * model.dim_mults[0]
  ctx = model.context_channels
  f32 = PER_PIXEL_WIDTH * width + PER_PIXEL_CONTEXT * ctx + PER_PIXEL_BASE
  return f32 * np.dtype(model.dtype).itemsize / 4


def context_floats(model) -> float:
  """Floats per image pixel of g_s's context maps (c0 at H ... c3 at H/8),
  which a tiled decode holds for the whole image."""
  d = model.dim
  if model.reverse_context_dim_mults is None:  # eps: mirrors the encoder
    widths = [d * m for m in reversed(model.context_dim_mults[:-1])]
  else:
    widths = [d * m for m in model.reverse_context_dim_mults[1:]]
  widths.append(model.context_channels)  # finest last
  n = len(widths)
  return float(sum(c / 4 ** (n - 1 - i) for i, c in enumerate(widths)))


def whole_image_bytes(model) -> float:
  """A tiled decode's memory per padded pixel of the whole image."""
  ctx = context_floats(model) * np.dtype(model.dtype).itemsize
  return ctx + 4.0 * WHOLE_IMAGE_FLOATS * model.channels


def decode_memory(
  model, height: int, width: int, batch: int = 1, tile=None
) -> float:
  """Estimated peak memory (bytes) of decoding ``batch`` images of
  ``height`` x ``width`` at once (padded to the model's factor): whole,
  or in tiles of ``tile = (tile height, tile width)`` pixels."""
  f = model.downsampling_factor
  hp, wp = padded_size(height, width, f)
  if tile is None:
    return FIXED + batch * hp * wp * bytes_per_pixel(model)
  th, tw = min(tile[0], hp), min(tile[1], wp)
  per_image = th * tw * bytes_per_pixel(model)
  per_image += hp * wp * whole_image_bytes(model)
  return FIXED_TILED + batch * per_image


def fixed_memory(tile=None) -> float:
  """The part of ``decode_memory`` that does not grow with the batch."""
  return FIXED if tile is None else FIXED_TILED


def machine_memory() -> int | None:
  """Bytes of memory this process may hold at most: the machine's
  physical memory (MemTotal), capped by a cgroup memory limit; None where
  neither can be read. A stable quantity: whether a valid file decodes
  does not depend on what else runs at that moment (a decode that then
  does not fit what is free swaps or fails like any other program)."""
  found = []
  try:
    with open("/proc/meminfo") as f:
      m = re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M)
    if m:
      found.append(int(m.group(1)) * 1024)
  except OSError:
    pass
  for limit in ("memory.max", "memory/memory.limit_in_bytes"):  # v2, v1
    try:
      with open(os.path.join("/sys/fs/cgroup", limit)) as f:
        lim = f.read().strip()
    except OSError:
      continue
    if lim.isdigit() and int(lim) < 2**60:
      found.append(int(lim))
  return min(found) if found else None


def fmt_bytes(n: float) -> str:
  if n >= 1e9:
    return f"{n / 1e9:.1f} GB"
  if n >= 1e6:
    return f"{n / 1e6:.0f} MB"
  return f"{n / 1e3:.0f} kB" if n >= 1e3 else f"{n:.0f} bytes"


def memory_budget(max_memory) -> tuple[float | None, str]:
  """(bytes or None for no check, what it is) for a ``max_memory``."""
  if max_memory is None and jax.default_backend() == "cpu":
    # Measured on CPU; on accelerators only an explicit budget is checked.
    return machine_memory(), "the machine's memory"
  if max_memory is None or math.isinf(max_memory):
    return None, "no budget"
  return float(max_memory), "the budget"


def images_per_batch(model, height, width, n: int, limits, tile=None) -> int:
  """How many of ``n`` images of this size (decoded whole, or in tiles of
  ``tile = (tile height, tile width)``) one batch may decode within the
  memory budget (at least 1); raises CodecError if not even one fits."""
  budget, what = memory_budget(limits.max_memory)
  if budget is None:
    return n
  need = decode_memory(model, height, width, tile=tile)
  if need > budget:
    raise CodecError(_too_big(model, height, width, tile, need, budget, what))
  fixed = fixed_memory(tile)
  each = max(need - fixed, 1.0)
  return int(max(1, min(n, (budget - fixed) // each)))


def _too_big(model, height, width, tile, need, budget, what) -> str:
  per_px = bytes_per_pixel(model)
  if tile is None:
    pixels = (need - FIXED) / per_px
    how = (
      f"decoding {width}x{height} whole needs about {fmt_bytes(need)} "
      f"(estimated {fmt_bytes(FIXED)} + {per_px:,.0f} bytes/pixel x "
      f"{pixels:,.0f} padded pixels)"
    )
    fix = (
      "; or re-encode the image with --tile auto (or --tile N; tile= in "
      "the API) to decode it in tiles"
    )
  else:
    how = (
      f"decoding {width}x{height} in {tile[1]}x{tile[0]} tiles needs about "
      f"{fmt_bytes(need)} (estimated {fmt_bytes(FIXED_TILED)} + "
      f"{per_px:,.0f} bytes/pixel of a tile + "
      f"{whole_image_bytes(model):,.0f} bytes/pixel of the image)"
    )
    fix = "; or re-encode the image with smaller tiles (--tile N)"
  return (
    f"{how}, more than {what} ({fmt_bytes(budget)}; set the budget with "
    f"--max-memory, or max_memory= in the API{fix})"
  )


def parse_size(text: str) -> float:
  """'16G', '800M', '12GiB', '1e9', 'inf' -> bytes (K, M, G, T decimal)."""
  m = re.fullmatch(
    r"\s*([0-9.]+(?:e[0-9]+)?|inf)\s*([kmgt]?)(i?)b?\s*", text.lower()
  )
  if not m:
    raise ValueError(f"not a size: {text!r} (e.g. 16G, 800M, inf)")
  base = 1024 if m.group(3) else 1000
  value = float(m.group(1)) * base ** " kmgt".index(m.group(2) or " ")
  if not value > 0:
    raise ValueError(f"the size must be positive, got {text!r}")
  return value
