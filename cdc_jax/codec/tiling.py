"""Tiled decoding: images of any size in the memory of one tile.

A whole-image decode holds the U-Net's activations for every pixel at
once (~3.8 KB per pixel for the full models on CPU), so a 3840x2160 photo
needs ~32 GB. A tiled file (format v2) records a tile layout, and the
decoder then runs the U-Net on one tile at a time:

* **Tiles live on the latent grid.** Tile sides are multiples of the
  model's downsampling factor (64) and tile starts multiples of the latent
  grid (16), so every tile's crop of the context maps (c0 at H .. c3 at
  H/8) is whole pixels. Along each axis the tiles are spread evenly from 0
  to the padded side minus a tile (the edge tiles shift inward instead of
  being padded), each overlapping the next by at least the layout's
  overlap; all tiles have one shape, so the U-Net compiles once per tile
  shape, whatever the image size and S (the step's time is an argument).
* **Context exactly as whole-image decoding.** The context decoder g_s is
  convolutional (no attention): its output at a latent position depends
  on y_hat within 5 latent pixels (4.7 for c0, measured by
  tests/test_codec_tiling.py), less than ``CONTEXT_MARGIN``. g_s runs per
  tile on the y_hat crop widened by that margin, and each tile's window of
  the output is written into whole-image context maps, which match a
  whole-image g_s up to float rounding.
* **The sampler runs step-synchronised over all tiles** (as
  MultiDiffusion, Bar-Tal et al. 2023): one whole-image x_t, drawn from the
  file's seed as in an untiled decode. At each step the U-Net runs tile by
  tile on the crop of x_t, and the tiles' predictions (eps-hat or x0-hat)
  are blended into one whole-image prediction with weights that ramp
  linearly across each overlap and sum to 1 at every pixel; one update of
  the sampler's state (``samplers.step``: DDIM, or DPM-Solver++(2M) with
  its previous whole-image x0) follows. Both updates are affine in the
  prediction, so this equals blending the tiles' updated x_t
  (MultiDiffusion's least-squares consensus), exactly for eps models and
  up to the x0 clipping of x models. The tiles agree at every step, so
  there are no seams to hide, only the U-Net's view that is cut at tile
  borders (zero padding, and its linear attention sums over the tile
  instead of the image): the cost in PSNR is measured by
  benchmarks/decode_tiled.py.

With one tile covering the whole image the blend weights are exactly 1 and
the decode computes what an untiled decode computes, as separately
compiled steps (XLA may round a few floats differently; the tests bound
it). The decode is deterministic: fixed tile order, fixed float32 weights
computed on the host, one device stream.

Memory: one tile's U-Net activations plus a few whole-image arrays (x_t,
the blend accumulator, the context maps): ``codec.memory.decode_memory``
with ``tile``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import samplers
from cdc_jax.codec.errors import CodecError
from cdc_jax.codec.limits import tile_problem
from cdc_jax.codec.memory import decode_memory, fmt_bytes, memory_budget
from cdc_jax.models.cdc import CDC

CONTEXT_MARGIN = 6  # latent pixels of y_hat around a tile for g_s
DEFAULT_OVERLAP = 128  # pixels (at most half a tile side)
AUTO_TILE = 1024  # ``tile="auto"`` tiles have at most AUTO_TILE**2 pixels


@dataclasses.dataclass(frozen=True)
class Layout:
  """A file's tile layout, in pixels (the header's three fields)."""

  tile_height: int
  tile_width: int
  overlap: int

  @classmethod
  def of(cls, header) -> Layout | None:
    """The layout in a container header (None: a whole-image decode)."""
    if not header.tile_height:
      return None
    return cls(header.tile_height, header.tile_width, header.tile_overlap)

  @property
  def tile(self) -> tuple[int, int]:
    return self.tile_height, self.tile_width

  def header_fields(self) -> dict:
    return {
      "tile_height": self.tile_height,
      "tile_width": self.tile_width,
      "tile_overlap": self.overlap,
    }


def tile_of(header) -> tuple[int, int] | None:
  """(tile height, tile width) of a header, None if untiled."""
  layout = Layout.of(header)
  return None if layout is None else layout.tile


def default_overlap(tile_side: int, step: int = 16) -> int:
  """``DEFAULT_OVERLAP``, at most half of ``tile_side``, a multiple of
  ``step`` (the latent grid)."""
  return min(DEFAULT_OVERLAP, tile_side // 2) // step * step


# -- the grid ------------------------------------------------------------------


def axis_starts(size: int, tile: int, overlap: int, step: int) -> list[int]:
  """Tile starts along one axis of ``size`` (tile clamped to it): evenly
  spread multiples of ``step`` from 0 to ``size - tile``, neighbours
  overlapping by at least ``overlap`` (``size``, ``tile`` and ``overlap``
  multiples of ``step``, ``overlap < tile``)."""
  tile = min(tile, size)
  if tile == size:
    return [0]
  n = 1 + math.ceil((size - tile) / (tile - overlap))
  span = (size - tile) // step
  return [step * (k * span // (n - 1)) for k in range(n)]


def axis_weights(size: int, tile: int, starts: list[int]) -> np.ndarray:
  """Blend weights [tiles, tile] along one axis: linear ramps across each
  overlap with a neighbour, normalised to sum to 1 at every position."""
  tile = min(tile, size)
  pos = np.arange(tile, dtype=np.float64) + 0.5
  raw = np.ones((len(starts), tile))
  for k, s in enumerate(starts):
    if k > 0 and starts[k - 1] + tile > s:  # ramp up from the previous
      raw[k] = np.minimum(raw[k], pos / (starts[k - 1] + tile - s))
    if k + 1 < len(starts) and s + tile > starts[k + 1]:  # down to the next
      raw[k] = np.minimum(raw[k], (tile - pos) / (s + tile - starts[k + 1]))
  total = np.zeros(size)
  for k, s in enumerate(starts):
    total[s : s + tile] += raw[k]
  norm = np.stack([raw[k] / total[s : s + tile] for k, s in enumerate(starts)])
  return norm.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Grid:
  """The tiles of one padded image: shape, starts and 1-D blend weights
  (tile (i, j) weighs pixel (y, x) by ``wy[i, y] * wx[j, x]``)."""

  th: int
  tw: int
  tops: list[int]
  lefts: list[int]
  wy: np.ndarray  # [len(tops), th]
  wx: np.ndarray  # [len(lefts), tw]

  def __len__(self) -> int:
    return len(self.tops) * len(self.lefts)

  def weight(self, i: int, j: int) -> np.ndarray:
    """Tile (i, j)'s 2-D blend weights [th, tw]."""
    return np.outer(self.wy[i], self.wx[j])


def grid(layout: Layout, hp: int, wp: int, step: int = 16) -> Grid:
  """The tiles of a padded ``hp`` x ``wp`` image (``step``: the latent
  grid, the model's ``y_factor``)."""
  tops = axis_starts(hp, layout.tile_height, layout.overlap, step)
  lefts = axis_starts(wp, layout.tile_width, layout.overlap, step)
  return Grid(
    th=min(layout.tile_height, hp),
    tw=min(layout.tile_width, wp),
    tops=tops,
    lefts=lefts,
    wy=axis_weights(hp, layout.tile_height, tops),
    wx=axis_weights(wp, layout.tile_width, lefts),
  )


# -- choosing a layout (encoder) -----------------------------------------------


def plan(
  model, height: int, width: int, tile=None, overlap=None, max_memory=None
) -> Layout | None:
  """The layout an encoder writes for ``tile``: None or 0 (whole-image),
  a side N (N x N tiles), (height, width), or ``"auto"``: whole-image if
  its estimated decode memory fits ``max_memory`` (None: the memory
  available now, on CPU; as ``codec.limits``), else the tiles of at most
  ``AUTO_TILE`` ** 2 pixels that fit it with the least U-Net work per step
  (sides that cut the image into n tiles sharing about the overlap; the
  larger tile on a tie), or, if none fits, the largest square tile that
  does. ``overlap`` in pixels (default ``default_overlap``). Raises
  CodecError for layouts the model cannot decode."""
  if tile is None or (not isinstance(tile, str) and tile == 0):
    if overlap:
      raise CodecError("--tile-overlap needs --tile")
    return None
  if tile == "auto":
    return _auto(model, height, width, overlap, max_memory)
  if isinstance(tile, str):
    raise CodecError(f"--tile must be a number of pixels or 'auto', got {tile}")
  th, tw = (tile, tile) if np.ndim(tile) == 0 else tuple(tile)
  if overlap is None:
    overlap = default_overlap(min(th, tw), model.y_factor)
  layout = Layout(int(th), int(tw), int(overlap))
  problem = tile_problem(model, *layout.tile, layout.overlap)
  if problem:
    raise CodecError(f"tiles {tw}x{th}, overlap {overlap}: {problem}")
  return layout


def _auto(model, height, width, overlap, max_memory) -> Layout | None:
  budget, what = memory_budget(max_memory)
  if budget is None or decode_memory(model, height, width) <= budget:
    return None
  f = model.downsampling_factor
  hp, wp = (math.ceil(v / f) * f for v in (height, width))
  o = DEFAULT_OVERLAP if overlap is None else overlap
  best = None  # (U-Net pixels per step, -tile pixels), layout
  for th in _sides(hp, o, f):
    for tw in _sides(wp, o, f):
      if th * tw > AUTO_TILE**2:
        continue
      layout = plan(model, height, width, (th, tw), o)
      need = decode_memory(model, height, width, tile=layout.tile)
      g = grid(layout, hp, wp, model.y_factor)
      key = (len(g) * g.th * g.tw, -g.th * g.tw)
      if need <= budget and (best is None or key < best[0]):
        best = key, layout
  if best is not None:
    return best[1]
  for side in range(min(AUTO_TILE, 2 * o) // f * f, f - 1, -f):
    layout = plan(model, height, width, side, overlap)
    need = decode_memory(model, height, width, tile=layout.tile)
    if need <= budget:
      return layout
  raise CodecError(
    f"decoding {width}x{height} needs about {fmt_bytes(need)} even "
    f"in {f}x{f} tiles, more than {what} ({fmt_bytes(budget)}; set "
    "the budget with --max-memory, or max_memory= in the API)"
  )


def _sides(size: int, overlap: int, f: int) -> list[int]:
  """Tile sides (multiples of ``f``, at least twice ``overlap``) that cut
  ``size`` into n = 1, 2, ... tiles sharing about ``overlap`` pixels."""
  out, n = [], 1
  while True:
    side = min(size, math.ceil((size + (n - 1) * overlap) / n / f) * f)
    if side < max(f, 2 * overlap):
      return out
    if side not in out:
      out.append(side)
    n += 1


# -- decoding ------------------------------------------------------------------


def run(
  cm, y_hat, x_init, steps: int, layout, progress=None, *, sampler="ddim"
):
  """g_s and the sampler (a ``samplers.SAMPLERS`` name) from x_T
  (``x_init``): one whole-image decode (``cm.sampler``), or tiled as
  ``layout`` (a Layout or None) says. Returns x_0 [B, Hp, Wp, 3]."""
  if layout is None:
    return cm.sampler.decode_latent(
      cm.params, y_hat, x_init, steps, progress, sampler=sampler
    )
  return decode_tiled(cm, y_hat, x_init, steps, layout, progress, sampler)


def decode_tiled(
  cm, y_hat, x_init, steps: int, layout, progress=None, sampler="ddim"
):
  """The tiled decode (module docstring); ``progress(done, total)`` after
  each step. ``cm`` is a ``codec.CodecModel``."""
  fns = _functions(cm.model)
  _, hp, wp, _ = x_init.shape
  g = grid(layout, hp, wp, cm.model.y_factor)
  tables = cm.sampler.tables(steps, sampler)
  maps = context_maps(cm.model, cm.params, y_hat, g)
  tiles = [
    (np.int32(top), wy, np.int32(left), wx)
    for top, wy in zip(g.tops, jnp.asarray(g.wy), strict=True)
    for left, wx in zip(g.lefts, jnp.asarray(g.wx), strict=True)
  ]
  state = samplers.init_state(sampler, x_init)
  for i in range(steps):
    row = type(tables)(*(a[i] for a in tables))
    acc = jnp.zeros_like(x_init)
    for top, wy, left, wx in tiles:
      xt, ct = fns.crop(state[0], maps, top, left, g.th, g.tw)
      out = fns.unet(cm.params, xt, row.time, ct)
      acc = fns.add(acc, out, wy, wx, top, left)
    state = jax.block_until_ready(fns.step(state, acc, row, sampler=sampler))
    if progress is not None:
      progress(i + 1, steps)
  return state[0]


def context_maps(model, params, y_hat, g: Grid) -> list:
  """g_s(y_hat) for the whole image, computed tile by tile on y_hat crops
  widened by ``CONTEXT_MARGIN`` (shifted inward at the borders)."""
  fns = _functions(model)
  fy, m = model.y_factor, CONTEXT_MARGIN
  _, hl, wl, _ = y_hat.shape
  th, tw = g.th // fy, g.tw // fy
  ch, cw = min(th + 2 * m, hl), min(tw + 2 * m, wl)
  shapes = jax.eval_shape(fns.g_s, params, y_hat)
  maps = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  for top in g.tops:
    for left in g.lefts:
      ty, tx = top // fy, left // fy
      sy, sx = min(max(ty - m, 0), hl - ch), min(max(tx - m, 0), wl - cw)
      crop = fns.crop_y(y_hat, np.int32(sy), np.int32(sx), ch, cw)
      pieces = fns.g_s(params, crop)
      at = [np.int32(v) for v in (ty - sy, tx - sx, ty, tx)]
      maps = fns.place(maps, pieces, *at, th, tw, ch)
  return maps


@dataclasses.dataclass(frozen=True)
class _Functions:
  g_s: object
  unet: object
  crop: object
  crop_y: object
  place: object
  add: object
  step: object


@functools.lru_cache(maxsize=8)
def _functions(model: CDC) -> _Functions:
  """The jitted pieces for ``model``: the U-Net and g_s compile per tile
  (crop) shape, the slicing and blending per image shape (cheap)."""

  def g_s(params, y):
    return model.apply({"params": params}, y, method=CDC.g_s)

  def unet(params, x, t, context):
    t = jnp.full((x.shape[0], 1), t, jnp.float32)
    return model.apply({"params": params}, x, t, context, method=CDC.denoise)

  def step(state, pred, row, sampler):
    return samplers.step(sampler, model.family, state, pred, row)

  static = ("th", "tw")
  return _Functions(
    g_s=jax.jit(g_s),
    unet=jax.jit(unet),
    crop=jax.jit(_crop, static_argnames=static),
    crop_y=jax.jit(_window, static_argnames=static),
    place=jax.jit(_place, static_argnames=(*static, "ch"), donate_argnums=0),
    add=jax.jit(_add, donate_argnums=0),
    step=jax.jit(step, static_argnames="sampler"),
  )


def _window(a, top, left, th: int, tw: int, scale: int = 1):
  """a[:, top*s : (top+th)*s, left*s : (left+tw)*s] (s = ``scale``)."""
  b, _, _, c = a.shape
  start = (0, top * scale, left * scale, 0)
  return jax.lax.dynamic_slice(a, start, (b, th * scale, tw * scale, c))


def _crop(x, maps, top, left, th: int, tw: int):
  """Tile crops of x_t and of each context map (map l at H / 2^l)."""
  hp = x.shape[1]
  ct = []
  for c in maps:
    s = hp // c.shape[1]
    ct.append(_window(c, top // s, left // s, th // s, tw // s))
  return _window(x, top, left, th, tw), ct


def _place(maps, pieces, sy, sx, ty, tx, th: int, tw: int, ch: int):
  """Writes each g_s piece's tile window (latent ``th`` x ``tw`` at
  ``sy, sx`` in the crop, ``ch`` latent rows) into the whole maps at
  latent ``ty, tx``."""
  out = []
  for whole, piece in zip(maps, pieces, strict=True):
    r = piece.shape[1] // ch  # map pixels per latent pixel
    win = _window(piece, sy, sx, th, tw, r)
    out.append(jax.lax.dynamic_update_slice(whole, win, (0, ty * r, tx * r, 0)))
  return out


def _add(acc, out, wy, wx, top, left):
  """acc[tile] += (wy x wx) * out: a tile's weighted prediction."""
  w = wy[None, :, None, None] * wx[None, None, :, None]
  cur = _window(acc, top, left, out.shape[1], out.shape[2])
  return jax.lax.dynamic_update_slice(acc, cur + w * out, (0, top, left, 0))
