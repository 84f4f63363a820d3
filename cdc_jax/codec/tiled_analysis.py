"""Tiled analysis: the encoder's g_a in the memory of one tile.

A whole-image g_a holds its full-resolution activations for every pixel
(about 2 KB per pixel for the full models on CPU, ``encode_memory``), so
a 3840x2160 photo needs ~17 GB just to be encoded. g_a is convolutional
(ResNet blocks, channel LayerNorm, stride-2 convs; no attention), so y at
a latent pixel depends only on the image near it:

* **Cores on the latent grid.** y [1, H/16, W/16, C] is cut into cores of
  ``tile`` pixels (multiples of the model's ``y_factor``, 16); along each
  axis the cores are spread evenly from 0 to the side minus a core (the
  last shifted inward, overlapping its neighbour, instead of padded).
* **Crops with a margin.** g_a runs on each core widened by
  ``ANALYSIS_MARGIN`` latent pixels (64 image pixels) on every side,
  shifted inward at the image borders, so all crops share one shape and
  g_a compiles once per crop shape. Crops start on the latent grid, so
  the stride-2 convs sample the same positions as on the whole image.
  A latent pixel's receptive field reaches 47 image pixels (3 latent
  pixels) beyond its own 16 (7x7 and 3x3 convs at full resolution, 3x3
  convs and stride-2 3x3 convs below; measured by
  tests/test_codec_tiled_encode.py), less than the margin: each core's y
  is the whole-image y up to float rounding (XLA may pick other conv
  algorithms per shape). The cores' y are stitched into the whole y on
  the host.
* h_a, Q, h_s and the entropy coding then run on the whole y and z, as in
  a whole-image encode (1/256 and 1/4096 of the pixels' positions).

A rounding difference can flip a symbol of Q(y - mu) where y - mu sits
within float error of a half-integer: the file stays valid (the decoder
decodes the symbols written), its rate and distortion move by a hair.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np

from cdc_jax.codec.errors import CodecError
from cdc_jax.codec.geometry import padded_size
from cdc_jax.codec.memory import fmt_bytes, memory_budget
from cdc_jax.models.cdc import CDC
from cdc_jax.models.entropy import quantize

ANALYSIS_MARGIN = 4  # latent pixels around a core (g_a reaches 3)
ANALYSIS_TILE = 1024  # the largest core side ``analysis_tile`` picks (px)

# Peak RSS of g_a + h_a on CPU (float32, a fresh process, the model
# loaded first; python -m benchmarks.encode_tiled --memory) above the RSS
# after loading, fitted over 256x256 and 512x512 as bytes per padded
# pixel + a fixed part (the compile, mostly):
#   model (g_a width)            bytes/pixel   fixed
#   full eps (64)                1,578         73 MB
#   cdc_jax.testing eps (4)        102         67 MB
# The estimate is linear in g_a's full-resolution width (dim *
# context_dim_mults[0]), above the measured peaks per pixel (by 5 % for
# the full model), with a fixed part that covers h_s, the bit estimate
# and the range coder too.
ENC_PER_PIXEL_WIDTH = 25.0  # bytes/pixel per channel of g_a's width
ENC_PER_PIXEL_BASE = 64.0  # bytes/pixel
ENC_FIXED = 250_000_000  # bytes
# A tiled analysis holds these per padded pixel of the whole image, on the
# host: the uint8 image and its padded copy, the float32 x, the y crops
# and the stitched y (256 channels at 1/256 of the pixels), mu and sigma.
ENC_WHOLE_IMAGE_BYTES = 80.0


def analysis_bytes_per_pixel(model) -> float:
  """g_a + h_a memory per padded pixel of one image for ``model``."""
  width = model.dim * model.context_dim_mults[0]
  f32 = ENC_PER_PIXEL_WIDTH * width + ENC_PER_PIXEL_BASE
  return f32 * np.dtype(model.dtype).itemsize / 4


def crop_side(side: int, padded: int, fy: int) -> int:
  """The image pixels of a crop around a core of ``side`` pixels."""
  return min(min(side, padded) + 2 * ANALYSIS_MARGIN * fy, padded)


def encode_memory(model, height: int, width: int, tile=None) -> float:
  """Estimated peak memory (bytes) of the encoder's analysis of one
  ``height`` x ``width`` image: whole, or in cores of ``tile = (core
  height, core width)`` pixels."""
  f, fy = model.downsampling_factor, model.y_factor
  hp, wp = padded_size(height, width, f)
  if tile is None:
    return ENC_FIXED + hp * wp * analysis_bytes_per_pixel(model)
  crop = crop_side(tile[0], hp, fy) * crop_side(tile[1], wp, fy)
  return (
    ENC_FIXED
    + crop * analysis_bytes_per_pixel(model)
    + hp * wp * ENC_WHOLE_IMAGE_BYTES
  )


def analysis_tile(
  model, height: int, width: int, tiled: bool = False, max_memory=None
) -> tuple[int, int] | None:
  """The core ``(height, width)`` in pixels of a tiled analysis, or None
  for a whole-image g_a: tiled when ``tiled`` (the file is tiled) or when
  the whole-image estimate exceeds ``max_memory`` (None: the
  machine's memory, on CPU; as ``codec.memory.memory_budget``). The core is
  the largest square of at most ``ANALYSIS_TILE`` pixels whose estimate
  fits; if not even the smallest does, a CodecError for an explicit
  ``max_memory``, else (the machine's memory) the smallest."""
  budget, what = memory_budget(max_memory)
  if not tiled and (
    budget is None or encode_memory(model, height, width) <= budget
  ):
    return None
  fy = model.y_factor
  for side in range(ANALYSIS_TILE, fy - 1, -fy):
    need = encode_memory(model, height, width, (side, side))
    if budget is None or need <= budget:
      return side, side
  if max_memory is None:  # best effort within what is free now
    return fy, fy
  raise CodecError(
    f"encoding {width}x{height} needs about {fmt_bytes(need)} even "
    f"in {fy}x{fy} tiles, more than {what} ({fmt_bytes(budget)}; "
    "set the budget with --max-memory, or max_memory= in the API)"
  )


def _starts(size: int, core: int) -> list[int]:
  """Core starts (latent pixels) along one axis: evenly spread from 0 to
  ``size - core``, consecutive ones at most ``core`` apart."""
  if core >= size:
    return [0]
  n = 1 + math.ceil((size - core) / core)
  return [k * (size - core) // (n - 1) for k in range(n)]


def windows(hl: int, wl: int, core: tuple[int, int]):
  """The crops of a ``hl`` x ``wl`` latent grid for ``core`` latent
  pixels: (crop height, crop width, [(sy, sx, ty, tx)]) with crop starts
  ``sy, sx`` and core starts ``ty, tx`` (latent pixels)."""
  m = ANALYSIS_MARGIN
  th, tw = min(core[0], hl), min(core[1], wl)
  ch, cw = min(th + 2 * m, hl), min(tw + 2 * m, wl)
  out = []
  for ty in _starts(hl, th):
    for tx in _starts(wl, tw):
      sy = min(max(ty - m, 0), hl - ch)
      sx = min(max(tx - m, 0), wl - cw)
      out.append((sy, sx, ty, tx))
  return ch, cw, out


def analyze(cm, x, tile: tuple[int, int]):
  """g_a in tiles, then h_a and z's symbols on the whole y: what
  ``cm.analyze`` computes whole. ``x`` [1, Hp, Wp, 3] (host or device,
  padded), ``tile`` the core (height, width) in pixels (multiples of the
  model's ``y_factor``). Returns (y [1, Hp/16, Wp/16, C] float32, z_sym)
  as device arrays. ``cm`` is a ``codec.CodecModel``."""
  fy = cm.model.y_factor
  if tile[0] % fy or tile[1] % fy or min(tile) < fy:
    raise CodecError(
      f"analysis tiles must be multiples of {fy} pixels, got {tile}"
    )
  x = np.asarray(x)
  fns = _functions(cm.model)
  hl, wl = x.shape[1] // fy, x.shape[2] // fy
  ch, cw, wins = windows(hl, wl, (tile[0] // fy, tile[1] // fy))
  th, tw = min(tile[0] // fy, hl), min(tile[1] // fy, wl)
  y = None
  for sy, sx, ty, tx in wins:
    crop = x[:, sy * fy : (sy + ch) * fy, sx * fy : (sx + cw) * fy]
    part = np.asarray(fns.g_a(cm.params, crop))  # [1, ch, cw, C]
    if y is None:
      y = np.zeros((x.shape[0], hl, wl, part.shape[-1]), np.float32)
    dy, dx = ty - sy, tx - sx
    y[:, ty : ty + th, tx : tx + tw] = part[:, dy : dy + th, dx : dx + tw]
  y = jax.device_put(y)
  return y, fns.hyper_analysis(cm.params, y)


class _Functions:
  def __init__(self, model: CDC):
    def apply(p, *args, method):
      return model.apply({"params": p}, *args, method=method)

    def hyper_analysis(p, y):  # h_a and z's symbols
      z = apply(p, y, method=CDC.h_a)
      return quantize(z, "symbols", apply(p, method=CDC.medians))

    self.g_a = jax.jit(functools.partial(apply, method=CDC.g_a))
    self.hyper_analysis = jax.jit(hyper_analysis)


@functools.lru_cache(maxsize=8)
def _functions(model: CDC) -> _Functions:
  """The jitted pieces: g_a compiles once per crop shape, h_a per image."""
  return _Functions(model)
