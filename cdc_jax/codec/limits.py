"""Decoder resource limits, checked from a file's header before any work.

A valid file (CRC and all) can still ask the decoder for unbounded work:
65,535 decode steps, 2^28 pixels, or a gamma whose x_T overflows. The
codec checks the header against these limits before it decodes anything
or touches a device, and refuses with one line naming the value, the
limit and what raises it (CLI flag, ``decompress`` keyword):

* decode steps <= the model's T (always) and <= ``max_steps`` (default
  1,000, ``--max-steps``); the released decoders use 200 (eps), 65 (x);
* pixels <= ``max_pixels`` (default 40 Mpx, ``--max-pixels``), in the
  spirit of Pillow's decompression-bomb limit (89.5 Mpx, a warning): 8K
  UHD (33.2 Mpx) and most camera sensors pass. A whole-image decode of
  40 Mpx needs ~150 GB with the full models, so on CPU the memory check
  binds first; the cap bounds what a file can ask of small models, of
  accelerators and of decoders that do not hold the image whole. The
  format's own caps are 32,768 per side and 2^28 pixels;
* gamma in [0, 4] (x_T = gamma * N(0, I); 0.8 by default);
* memory: the estimated peak of the decode on CPU <= ``max_memory``
  (default: the machine's physical memory or its cgroup limit on the CPU
  backend, never the memory free at the moment; no check on accelerators;
  ``--max-memory``); a tiled file is estimated per tile;
* a tiled file's layout (``check_tile``): tile sides multiples of the
  model's downsampling factor (64) up to ``MAX_SIDE``, the overlap a
  multiple of the latent grid (16) and at most half a tile side, so the
  tiles' work is at most about 9 times (4 typically) a whole-image decode's.

The encoder refuses steps, gamma and sizes outside the same limits, so it
never writes a file that a decoder with the same limits refuses.

The memory estimate is ``fixed + batch * padded pixels * bytes/pixel``,
fitted to the peak RSS of decodes on CPU (``benchmarks/decode_memory.py``;
numbers in the constants below). A tiled decode (``codec.tiling``) holds
one tile's U-Net activations plus whole-image arrays (x_t, the blend
accumulator, the context maps): ``fixed + tile pixels * bytes/pixel +
padded pixels * whole-image bytes/pixel``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import numpy as np

from cdc_jax.codec.errors import CodecError
from cdc_jax.codec.geometry import padded_size

DEFAULT_MAX_STEPS = 1000
DEFAULT_MAX_PIXELS = 40_000_000
GAMMA_RANGE = (0.0, 4.0)
# The format's caps (per side, and in pixels), whatever the flags say.
MAX_SIDE = 32768
MAX_PIXELS = 2**28
MAX_STEPS = 2**16 - 1  # the header's u16

_FLAGS = {
  "max_steps": "--max-steps",
  "max_pixels": "--max-pixels",
  "max_memory": "--max-memory",
}


def _raise_with(name: str) -> str:
  return f"raise it with {_FLAGS[name]}, or {name}= in the API"


@dataclasses.dataclass(frozen=True)
class Limits:
  """What a decode may cost. ``max_memory`` in bytes: None for the
  machine's memory (``machine_memory``), ``math.inf`` for no check."""

  max_steps: int = DEFAULT_MAX_STEPS
  max_pixels: int = DEFAULT_MAX_PIXELS
  max_memory: float | None = None

  def __post_init__(self):
    for name in ("max_steps", "max_pixels"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
        raise CodecError(f"{name} must be a positive integer, got {v!r}")
    m = self.max_memory
    if m is not None and (isinstance(m, bool) or not float(m) > 0):
      raise CodecError(f"max_memory must be a positive number, got {m!r}")


# -- the header ----------------------------------------------------------------


def check_size(h: int, w: int, max_pixels: int | None = None):
  """The format's caps, then ``max_pixels`` (when given)."""
  if h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
    raise CodecError(
      f"image size {w}x{h} exceeds the codec's limit ({MAX_SIDE} per side, "
      f"{MAX_PIXELS} pixels)"
    )
  if max_pixels is not None and h * w > max_pixels:
    raise CodecError(
      f"image size {w}x{h} ({h * w:,} pixels) is over the limit of "
      f"{max_pixels:,} pixels ({_raise_with('max_pixels')})"
    )


def check_header(header, timesteps: int, limits: Limits, model=None):
  """Steps, gamma, size and (given the model) tile layout of a parsed
  header against ``limits``."""
  s = header.steps
  if s < 1:
    raise CodecError("invalid header: 0 decode steps")
  if s > timesteps:
    raise CodecError(
      f"the header asks for {s} decode steps, more than the model's "
      f"{timesteps} diffusion steps (no flag raises this limit: the file is "
      "damaged or was not made for this model)"
    )
  if s > limits.max_steps:
    raise CodecError(
      f"the header asks for {s} decode steps, over the limit of "
      f"{limits.max_steps} ({_raise_with('max_steps')})"
    )
  g = header.gamma
  lo, hi = GAMMA_RANGE
  if not lo <= g <= hi:  # NaN too
    raise CodecError(
      f"the header's gamma {g:g} is outside [{lo:g}, {hi:g}] (no flag "
      "raises this limit: the file is damaged or was not made by cdc_jax)"
    )
  check_size(header.height, header.width, limits.max_pixels)
  if model is not None and header.tile_height:
    tile = (header.tile_height, header.tile_width, header.tile_overlap)
    problem = tile_problem(model, *tile)
    if problem:
      raise CodecError(
        f"the header's tile layout ({_fmt_tile(*tile)}) is invalid: "
        f"{problem} (no flag raises this limit: the file is damaged or was "
        "not made for this model)"
      )


def tile_problem(model, height: int, width: int, overlap: int) -> str:
  """What is wrong with a tile layout for ``model`` ('' if nothing)."""
  f, fy = model.downsampling_factor, model.y_factor
  for side in (height, width):
    if side < f or side % f or side > MAX_SIDE:
      return (
        f"tile sides must be multiples of {f} from {f} to {MAX_SIDE}, "
        f"got {side}"
      )
  if overlap % fy or overlap > min(height, width) // 2:
    return (
      f"the overlap must be a multiple of {fy} and at most half a tile "
      f"side ({min(height, width) // 2}), got {overlap}"
    )
  return ""


def _fmt_tile(height: int, width: int, overlap: int) -> str:
  return f"{width}x{height} tiles, overlap {overlap}"


# -- the encoder's settings ----------------------------------------------------


def check_steps(steps: int, timesteps: int, max_steps: int) -> int:
  """Decode steps an encoder may write into a header."""
  steps = int(steps)
  if steps < 1:
    raise CodecError(f"--steps must be at least 1, got {steps}")
  if steps > timesteps:
    raise CodecError(
      f"--steps {steps} is more than the model's {timesteps} diffusion steps"
    )
  if steps > max_steps:
    raise CodecError(
      f"--steps {steps} is over the decode-step limit of {max_steps} "
      f"({_raise_with('max_steps')}; decoding will need the same)"
    )
  return steps


def check_image(img, max_pixels: int) -> tuple[int, int]:
  """An encoder's input: uint8 [H, W, 3] within the size limits."""
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
    raise CodecError(
      f"expected a uint8 [H, W, 3] image, got {img.dtype} {img.shape}"
    )
  h, w, _ = img.shape
  if h < 1 or w < 1:
    raise CodecError("the image is empty")
  check_size(h, w, max_pixels)
  return h, w


def check_gamma(gamma) -> float:
  lo, hi = GAMMA_RANGE
  if not lo <= float(gamma) <= hi:
    raise CodecError(f"--gamma must be in [{lo:g}, {hi:g}], got {gamma}")
  return float(gamma)


def check_seed(seed) -> int:
  if not 0 <= seed < 2**64:
    raise CodecError(f"--seed must be in [0, 2**64), got {seed}")
  return int(seed)


# -- memory --------------------------------------------------------------------

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


def images_per_batch(
  model, height, width, n: int, limits: Limits, tile=None
) -> int:
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
