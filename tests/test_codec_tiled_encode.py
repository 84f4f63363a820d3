"""Tests of the encoder's tiled analysis (cdc_jax.codec.tiled_analysis).

The tiny eps model of ``cdc_jax.testing``. The closeness test needs crops
smaller than the image around a 4-latent-pixel margin: a 160x160 photo
(padded to 192x192, a 12x12 latent grid) in 32 px cores makes 6x6 crops
of 10x10 latent pixels. Decodes use S = 1 on a 64x96 photo.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import codec, testing
from cdc_jax.codec import tiled_analysis as ta
from cdc_jax.imageio import to_float
from cdc_jax.models.cdc import CDC

# Measured on the tiny eps model (float32 CPU): max |y_tiled - y_whole| up
# to 1.3e-5 (|y| up to 35, 512x768); the bound leaves room for other XLA
# builds.
Y_ATOL = 1e-4


def _x(cm, img):
  return to_float(codec.pad_image(img, cm.downsampling_factor))[None]


def test_g_a_receptive_field_is_within_the_margin(cm):
  """A change of one image pixel moves y only within ANALYSIS_MARGIN - 1
  latent pixels of the pixel's own latent pixel (at both ends of one)."""
  fy, m = cm.model.y_factor, ta.ANALYSIS_MARGIN
  side = fy * (2 * m + 4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (1, side, side, 3)), jnp.float32)
  g_a = jax.jit(
    lambda x: cm.model.apply({"params": cm.params}, x, method=CDC.g_a)
  )
  base = np.asarray(g_a(x))
  mid = side // 2 // fy  # the latent pixel of the perturbed pixels
  reach = 0
  for p in (mid * fy, mid * fy + fy - 1):
    moved = np.asarray(g_a(x.at[0, p, p].add(1.0)))
    changed = np.argwhere(np.any(base != moved, axis=-1))[:, 1:]
    reach = max(reach, int(np.abs(changed - mid).max()))
  assert 2 <= reach <= m - 1


def test_windows_cover_the_grid_with_one_crop_shape():
  ch, cw, wins = ta.windows(12, 17, (3, 5))
  assert (ch, cw) == (11, 13)
  covered = np.zeros((12, 17), bool)
  for sy, sx, ty, tx in wins:
    assert 0 <= sy <= ty and ty + 3 <= sy + ch <= 12
    assert 0 <= sx <= tx and tx + 5 <= sx + cw <= 17
    covered[ty : ty + 3, tx : tx + 5] = True
  assert covered.all()
  assert ta.windows(4, 8, (16, 16)) == (4, 8, [(0, 0, 0, 0)])


def test_tiled_y_is_close_to_whole_y(cm):
  x = _x(cm, testing.photo("astronaut", (160, 160), 60, 180))
  y, z = cm.analyze(cm.params, jnp.asarray(x))
  ty, tz = ta.analyze(cm, x, (32, 32))
  assert len(ta.windows(12, 12, (2, 2))[2]) == 36
  assert ty.shape == y.shape
  diff = np.abs(np.asarray(ty) - np.asarray(y))
  assert diff.max() <= Y_ATOL, diff.max()
  # A symbol flips only where a value is within float error of a
  # half-integer: rare (none measured here).
  assert np.mean(np.asarray(tz) != np.asarray(z)) <= 1e-3
  a = codec.encode_latents(cm, x)
  b = codec.encode_latents(cm, x, (32, 32))
  assert np.mean(a.y_sym != b.y_sym) <= 1e-3
  assert b.estimated_bits == pytest.approx(a.estimated_bits, rel=1e-3)


def test_tiles_must_be_on_the_latent_grid(cm):
  with pytest.raises(codec.CodecError, match="multiples of 16"):
    ta.analyze(cm, np.zeros((1, 64, 64, 3), np.float32), (24, 32))


def test_a_tiled_file_is_encoded_in_tiles_and_decodes_to_its_size(cm):
  img = testing.photo("astronaut", (64, 96), 100, 100)
  res = codec.compress_image(cm, img, steps=1, tile=64, tile_overlap=32)
  whole = codec.compress_image(cm, img, steps=1)
  assert res.analysis_tile is not None and res.layout is not None
  assert whole.analysis_tile is None and whole.layout is None
  assert res.estimated_bits == pytest.approx(whole.estimated_bits, rel=1e-3)
  out = codec.decompress(cm, res.data)
  assert out.shape == (64, 96, 3) and out.dtype == np.uint8


def test_auto_tiles_the_analysis_when_the_budget_is_small(cm):
  model, h, w = cm.model, 256, 256
  whole = ta.encode_memory(model, h, w)
  small = ta.encode_memory(model, h, w, (32, 32))
  assert small < whole
  budget = (whole + small) / 2
  assert ta.analysis_tile(model, h, w, max_memory=2 * whole) is None
  tile = ta.analysis_tile(model, h, w, max_memory=budget)
  assert tile is not None and tile[0] % 16 == 0
  assert ta.encode_memory(model, h, w, tile) <= budget
  img = testing.photo("astronaut", (h, w), 60, 180)
  res = codec.compress_image(cm, img, steps=1, max_memory=budget)
  assert res.analysis_tile == tile and res.layout is None
  plain = codec.compress_image(cm, img, steps=1, max_memory=2 * whole)
  assert plain.analysis_tile is None


def test_a_budget_below_the_smallest_tile_is_a_clear_error(cm):
  need = ta.encode_memory(cm.model, 64, 96, (16, 16))
  with pytest.raises(codec.CodecError, match="even in 16x16 tiles"):
    ta.analysis_tile(cm.model, 64, 96, max_memory=need / 2)
