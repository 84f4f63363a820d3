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

The memory estimate and the budget are ``codec.memory``'s.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cdc_jax.codec.errors import CodecError

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
