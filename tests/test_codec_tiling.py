"""Tests of tiled decoding (cdc_jax.codec.tiling) and the tile layout in
the file header (format v2 and v3).

The tiny eps model of ``cdc_jax.testing`` on a 64x96 photo (padded to
64x128); tiles of 64 px overlapping by 32 make a 1x3 grid. Decodes use
S = 2. Pixels of a random-init U-Net mean nothing: the tests check sizes,
layouts, limits, exactness relations and determinism, not image quality
(benchmarks/decode_tiled.py measures that).
"""

import copy
import dataclasses
import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import codec, testing
from cdc_jax.codec import cli, decompress_many, memory, tiling
from cdc_jax.coding import container, range_coder
from cdc_jax.coding.errors import BitstreamError
from cdc_jax.models.cdc import CDC, init_params
from cdc_jax.sample import initial_noise

STEPS = 2
SIZE = (64, 96)  # padded to 64 x 128
TILE = dict(tile=64, tile_overlap=32)


@pytest.fixture(scope="module")
def img():
  return testing.photo("astronaut", SIZE, 100, 100)


@pytest.fixture(scope="module")
def files(cm, img):
  """The same image, seed and steps: whole, one big tile, 1x3 tiles."""
  kw = dict(steps=STEPS, seed=5)
  return {
    "whole": codec.compress(cm, img, **kw),
    "one_tile": codec.compress(cm, img, tile=128, **kw),
    "tiled": codec.compress(cm, img, **TILE, **kw),
  }


@pytest.fixture(scope="module")
def decoded(cm, files):
  calls = []
  out = {k: codec.decompress(cm, b) for k, b in files.items() if k != "tiled"}
  out["tiled"] = codec.decompress(
    cm, files["tiled"], progress=lambda d, t: calls.append((d, t))
  )
  out["progress"] = calls
  return out


# -- the header ----------------------------------------------------------------


def test_tiled_file_records_the_layout(files):
  header, _ = container.unpack(files["tiled"])
  assert files["tiled"][4] == 3 == container.FORMAT_VERSION
  assert tiling.Layout.of(header) == tiling.Layout(64, 64, 32)
  one, _ = container.unpack(files["one_tile"])
  assert (one.tile_height, one.tile_width, one.tile_overlap) == (128, 128, 64)


def test_whole_and_tiled_files_differ_only_in_the_layout(files):
  whole = files["whole"]
  assert whole[4] == container.FORMAT_VERSION
  header, streams = container.unpack(whole)
  assert tiling.Layout.of(header) is None
  # The same stream; the layout fields are 0 in the whole-image file.
  tiled_header, tiled_streams = container.unpack(files["tiled"])
  assert tiled_streams == streams and len(files["tiled"]) == len(whole)
  assert (
    container.pack(
      dataclasses.replace(
        tiled_header, tile_height=0, tile_width=0, tile_overlap=0
      ),
      tiled_streams,
    )
    == whole
  )


@pytest.mark.parametrize("family", ["eps", "x"])
def test_golden_v1_files_still_parse(family):
  with open(f"tests/golden/{family}.cdcj", "rb") as f:
    blob = f.read()
  header, _ = container.unpack(blob)
  assert blob[4] == 1 == header.version and tiling.Layout.of(header) is None
  assert container.pack(header, container.unpack(blob)[1]) == blob


@pytest.mark.parametrize(
  "tile", [(64, 64, 0), (128, 64, 32), (32768, 65535, 65535), (1, 2, 3)]
)
def test_layout_survives_pack_unpack(tile):
  fields = dict(
    zip(("tile_height", "tile_width", "tile_overlap"), tile, strict=True)
  )
  header = container.Header(bytes(16), 70, 90, steps=3, **fields)
  back, streams = container.unpack(container.pack(header, [b"abc"]))
  assert back == header and streams == [b"abc"]


@pytest.mark.parametrize(
  "fields",
  [
    dict(tile_height=64),  # no width
    dict(tile_width=64),
    dict(tile_overlap=16),  # an overlap without tiles
    dict(tile_height=2**16, tile_width=64),
    dict(tile_height=64, tile_width=64, tile_overlap=-1),
  ],
)
def test_header_refuses_malformed_layouts(fields):
  with pytest.raises(ValueError, match="tile"):
    container.Header(bytes(16), 70, 90, **fields)


def test_v2_file_without_a_layout_is_invalid(files):
  blob = bytearray(files["tiled"])
  at = len(blob) - 4 - 4 - len(container.unpack(files["tiled"])[1][0]) - 6
  blob[at : at + 6] = bytes(6)  # tile height, width, overlap = 0
  blob[4] = 2  # v3 allows it (a whole-image file), v2 does not
  body = bytes(blob[:-4])
  blob = body + zlib.crc32(body).to_bytes(4, "little")
  with pytest.raises(BitstreamError, match="v2 file without a tile layout"):
    container.unpack(blob)


# -- decoding ------------------------------------------------------------------


def test_tiled_round_trip_has_the_header_size(decoded, img):
  out = decoded["tiled"]
  assert out.shape == img.shape and out.dtype == np.uint8
  assert decoded["progress"] == [(1, STEPS), (2, STEPS)]


def test_tiled_decode_is_deterministic(cm, files, decoded):
  np.testing.assert_array_equal(
    codec.decompress(cm, files["tiled"]), decoded["tiled"]
  )


def test_one_tile_covering_the_image_equals_the_untiled_decode(
  cm, files, decoded
):
  """Same arithmetic, separately compiled: floats within 1e-5, pixels
  within one level (identical here so far)."""
  header, stream = codec.parse(cm, files["one_tile"])
  y_hat = codec.decode_latents(cm, header, stream)
  shape = codec.noise_shape(cm, header)
  x_init = initial_noise(header.seed, shape, header.gamma)
  layout = tiling.Layout.of(header)
  tiled = tiling.run(cm, y_hat, x_init, STEPS, layout)
  whole = tiling.run(cm, y_hat, x_init, STEPS, None)
  np.testing.assert_allclose(np.asarray(tiled), np.asarray(whole), atol=1e-5)
  diff = np.abs(decoded["one_tile"].astype(int) - decoded["whole"])
  assert diff.max() <= 1 and np.mean(diff != 0) < 1e-3


def test_tiles_change_the_decode_only_within_bounds(decoded):
  """1x3 tiles of a random-init U-Net: a different but finite decode."""
  assert not np.array_equal(decoded["tiled"], decoded["whole"])


def test_context_maps_from_tiles_equal_the_whole_image_g_s(cm, files):
  header, stream = codec.parse(cm, files["tiled"])
  y_hat = codec.decode_latents(cm, header, stream)
  g = tiling.grid(tiling.Layout(64, 64, 32), 64, 128)
  maps = tiling.context_maps(cm.model, cm.params, y_hat, g)
  whole = cm.model.apply({"params": cm.params}, y_hat, method=CDC.g_s)
  assert [m.shape for m in maps] == [w.shape for w in whole]
  for m, w in zip(maps, whole, strict=True):
    np.testing.assert_allclose(np.asarray(m), np.asarray(w), atol=1e-5)


def test_g_s_receptive_field_is_within_the_context_margin(cm):
  """A change of y_hat at one latent pixel moves the context maps only
  within CONTEXT_MARGIN latent pixels of it."""
  m = tiling.CONTEXT_MARGIN
  side, c = 2 * m + 8, cm.model.latent_shapes(1, 64, 64)["y"][-1]
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.normal(size=(1, side, side, c)), jnp.float32)
  g_s = jax.jit(
    lambda y: cm.model.apply({"params": cm.params}, y, method=CDC.g_s)
  )
  base = g_s(y)
  mid = side // 2
  moved = g_s(y.at[0, mid, mid].add(10.0))
  for a, b in zip(base, moved, strict=True):
    r = a.shape[1] // side  # map pixels per latent pixel
    changed = np.argwhere(np.any(np.asarray(a) != np.asarray(b), axis=-1))
    rows = changed[:, 1] // r
    cols = changed[:, 2] // r
    reach = max(np.abs(rows - mid).max(), np.abs(cols - mid).max())
    assert 1 <= reach <= m - 1, (a.shape, reach)


def test_decompress_many_decodes_tiled_and_whole_files(cm, files, decoded):
  out = decompress_many(cm, [files["tiled"], files["whole"]])
  np.testing.assert_array_equal(out[0], decoded["tiled"])
  np.testing.assert_array_equal(out[1], decoded["whole"])


# -- the grid ------------------------------------------------------------------


@pytest.mark.parametrize(
  "size,tile,overlap",
  [
    (128, 64, 32),
    (2176, 512, 128),
    (3840, 1024, 128),
    (320, 192, 96),
    (256, 64, 0),
    (64, 128, 64),
    (1088, 256, 16),
  ],
)
def test_axis_starts_cover_evenly_on_the_latent_grid(size, tile, overlap):
  starts = tiling.axis_starts(size, tile, overlap, 16)
  t = min(tile, size)
  assert starts[0] == 0 and starts[-1] == size - t
  assert all(s % 16 == 0 for s in starts)
  gaps = np.diff(starts)
  assert np.all(gaps > 0) and np.all(t - gaps >= overlap)  # overlap kept
  assert len(starts) == 1 or gaps.max() - gaps.min() <= 16  # even


@pytest.mark.parametrize(
  "hp,wp,layout",
  [
    (64, 128, (64, 64, 32)),
    (192, 320, (128, 64, 16)),
    (128, 128, (64, 64, 0)),
    (448, 576, (192, 128, 64)),
    (64, 64, (128, 128, 64)),
  ],
)
def test_blend_weights_sum_to_one_everywhere(hp, wp, layout):
  g = tiling.grid(tiling.Layout(*layout), hp, wp)
  total = np.zeros((hp, wp))
  for i, top in enumerate(g.tops):
    for j, left in enumerate(g.lefts):
      w = g.weight(i, j)
      assert w.shape == (g.th, g.tw) and w.min() > 0 and w.max() <= 1
      total[top : top + g.th, left : left + g.tw] += w
  np.testing.assert_allclose(total, 1.0, atol=1e-6)
  if len(g) == 1:
    assert np.all(g.weight(0, 0) == 1.0)  # exactly: one tile, no blending


def test_blend_weights_ramp_linearly_across_an_overlap():
  g = tiling.grid(tiling.Layout(64, 64, 32), 64, 128)  # lefts 0, 32, 64
  assert g.lefts == [0, 32, 64]
  np.testing.assert_array_equal(g.wx[0][:32], 1.0)
  ramp = (np.arange(32) + 0.5) / 32
  np.testing.assert_allclose(g.wx[1][:32], ramp, rtol=1e-6)
  np.testing.assert_allclose(g.wx[0][32:], ramp[::-1], rtol=1e-6)


# -- limits --------------------------------------------------------------------


class _Forbidden:
  def __call__(self, *args, **kw):
    raise AssertionError("decoding was started")

  def __getattr__(self, name):
    return self


@pytest.fixture(scope="module")
def guarded(cm):
  g = copy.copy(cm)
  g.hyper = _Forbidden()
  g.sampler = _Forbidden()
  return g


def _forge(blob: bytes, **fields) -> bytes:
  """``blob`` with header fields set unchecked (CRC re-sealed)."""
  header, streams = container.unpack(blob)
  header = dataclasses.replace(header)
  for name, value in fields.items():
    object.__setattr__(header, name, value)
  return container.pack(header, streams)


@pytest.mark.parametrize(
  "tile,phrase",
  [
    ((100, 64, 0), "tile sides must be multiples of 64 from 64 to 32768"),
    ((32, 64, 0), "got 32"),
    ((64, 65472, 0), "got 65472"),
    ((64, 64, 48), "at most half a tile side (32), got 48"),
    ((128, 128, 8), "a multiple of 16"),
    ((64, 64, 65535), "got 65535"),
  ],
)
@pytest.mark.parametrize("many", [False, True], ids=["one", "many"])
def test_hostile_tile_layout_is_refused_before_work(
  tile, phrase, many, guarded, files
):
  fields = dict(
    zip(("tile_height", "tile_width", "tile_overlap"), tile, strict=True)
  )
  blob = _forge(files["tiled"], **fields)
  with pytest.raises(codec.CodecError) as err:
    if many:
      decompress_many(guarded, [blob], max_memory=math.inf)
    else:
      codec.decompress(guarded, blob, max_memory=math.inf)
  msg = str(err.value)
  assert "the header's tile layout" in msg and phrase in msg, msg
  assert "\n" not in msg


def test_malformed_v2_layout_is_a_codec_error(guarded, files):
  blob = _forge(files["tiled"], tile_width=0)  # height without width
  with pytest.raises(codec.CodecError, match="invalid header: a tile layout"):
    codec.decompress(guarded, blob)


def test_memory_estimate_of_a_tiled_file_is_per_tile():
  model = CDC()  # the full eps model
  whole = memory.decode_memory(model, 2160, 3840)
  tiled = memory.decode_memory(model, 2160, 3840, tile=(512, 512))
  per_tile = 512 * 512 * memory.bytes_per_pixel(model)
  image = 2176 * 3840 * memory.whole_image_bytes(model)
  assert tiled == pytest.approx(memory.FIXED_TILED + per_tile + image)
  assert tiled < whole / 5
  # The tile's part does not grow with the image; the whole-image arrays do.
  bigger = memory.decode_memory(model, 4320, 7680, tile=(512, 512))
  assert bigger - tiled == pytest.approx(3 * image, rel=0.01)
  # A tile larger than the image counts as the (padded) image.
  assert memory.decode_memory(model, 50, 60, tile=(1024, 1024)) == (
    pytest.approx(memory.decode_memory(model, 64, 64, tile=(64, 64)))
  )


def test_context_floats_match_the_context_maps(cm):
  x = testing.tiny_model("x")
  for model in (cm.model, x):
    params = jax.eval_shape(
      functools.partial(init_params, model), jax.random.key(0)
    )
    y = jnp.zeros(model.latent_shapes(1, 64, 64)["y"])
    maps = jax.eval_shape(
      lambda p, y, m=model: m.apply({"params": p}, y, method=CDC.g_s),
      params,
      y,
    )
    floats = sum(np.prod(m.shape) for m in maps) / (64 * 64)
    assert memory.context_floats(model) == floats


def test_budget_decides_between_whole_and_tiled(
  guarded, cm, files, monkeypatch
):
  # Headers only: the forged size does not match the stream, so the range
  # decoder is the first thing that must not start.
  monkeypatch.setattr(range_coder, "Decoder", _Forbidden())
  size = {"height": 2048, "width": 2048}
  whole, tiled = _forge(files["whole"], **size), _forge(files["tiled"], **size)
  need_whole = memory.decode_memory(cm.model, 2048, 2048)
  need_tiled = memory.decode_memory(cm.model, 2048, 2048, tile=(64, 64))
  assert need_tiled < need_whole
  budget = (need_tiled + need_whole) / 2
  with pytest.raises(codec.CodecError) as err:
    codec.decompress(guarded, whole, max_memory=budget)
  assert "re-encode the image with --tile auto" in str(err.value)
  with pytest.raises(AssertionError, match="decoding was started"):
    codec.decompress(guarded, tiled, max_memory=budget)
  with pytest.raises(codec.CodecError, match="in 64x64 tiles needs about"):
    codec.decompress(guarded, tiled, max_memory=need_tiled - 1)


# -- the encoder ---------------------------------------------------------------


def test_plan_tile_auto_tiles_only_when_the_whole_decode_does_not_fit(cm):
  model, hw, padded = cm.model, (2160, 3840), (2176, 3840)
  assert tiling.plan(model, *hw, "auto", max_memory=math.inf) is None
  whole = memory.decode_memory(model, *hw)
  square = tiling.Layout(tiling.AUTO_TILE, tiling.AUTO_TILE, 128)
  auto = memory.decode_memory(model, *hw, tile=square.tile)
  assert auto < whole
  assert tiling.plan(model, *hw, "auto", max_memory=whole) is None
  budget = (auto + whole) / 2
  layout = tiling.plan(model, *hw, "auto", max_memory=budget)
  assert layout.tile_height * layout.tile_width <= tiling.AUTO_TILE**2
  assert layout.overlap == tiling.DEFAULT_OVERLAP
  need = memory.decode_memory(model, *hw, tile=layout.tile)
  assert need <= budget

  def work(lay):  # U-Net pixels per step
    g = tiling.grid(lay, *padded)
    return len(g) * g.th * g.tw

  # Less work than square tiles of the same size limit (1.24x the image's
  # pixels against 1.88x for 1024 x 1024 here).
  assert work(layout) < 0.7 * work(square)
  small = tiling.plan(model, *hw, "auto", max_memory=need - 1)
  assert small.tile_height * small.tile_width < layout.tile_height * (
    layout.tile_width
  )
  with pytest.raises(codec.CodecError, match="even in 64x64 tiles"):
    tiling.plan(model, *hw, "auto", max_memory=1e6)


@pytest.mark.parametrize(
  "tile,overlap,phrase",
  [
    (100, None, "multiples of 64"),
    (64, 48, "at most half a tile side"),
    ((64, 128), 8, "multiple of 16"),
    ("big", None, "a number of pixels or 'auto'"),
    (None, 32, "--tile-overlap needs --tile"),
  ],
)
def test_encoder_refuses_bad_tiles(cm, img, tile, overlap, phrase):
  with pytest.raises(codec.CodecError, match=phrase):
    codec.compress(cm, img, steps=STEPS, tile=tile, tile_overlap=overlap)


def test_cli_compresses_tiled_and_decompresses(
  model_path, decoded, img, tmp_path, capsys
):
  src, mid, dst = tmp_path / "in.png", tmp_path / "a.cdcj", tmp_path / "o.png"
  from PIL import Image

  Image.fromarray(img).save(src)
  argv = ["compress", "--model", model_path, src, mid, "--steps", STEPS]
  rc = cli.main(
    [str(a) for a in [*argv, "--seed", 5, "--tile", 64, "--tile-overlap", 32]]
  )
  out = capsys.readouterr().out
  assert rc == 0 and "64x64 tiles" in out
  header, _ = container.unpack(mid.read_bytes())
  assert tiling.Layout.of(header) == tiling.Layout(64, 64, 32)
  rc = cli.main(
    [
      str(a)
      for a in ["decompress", "--model", model_path, mid, dst, "--no-progress"]
    ]
  )
  assert rc == 0
  got = np.asarray(Image.open(dst))
  np.testing.assert_array_equal(got, decoded["tiled"])
  rc = cli.main([str(a) for a in [*argv, "--tile", 100]])
  err = capsys.readouterr().err
  assert rc == 2 and "multiples of 64" in err and err.count("\n") == 1
