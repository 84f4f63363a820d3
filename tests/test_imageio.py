"""Tests of cdc_jax.imageio: decoding, atomic writes, pixel conversions."""

import os

import numpy as np
import pytest
from PIL import Image

from cdc_jax import imageio
from cdc_jax.imageio import ImageError, WriteError


def _noise(h, w, c=3, seed=0):
  rng = np.random.default_rng(seed)
  shape = (h, w, c) if c else (h, w)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _save(path, img, **kw):
  img.save(path, **kw)
  return str(path)


# --- load_image ------------------------------------------------------------


def test_modes_come_back_as_uint8_rgb(tmp_path):
  gray = _noise(10, 12, c=0)
  rgb = _noise(10, 12)
  rgba = np.concatenate([rgb, _noise(10, 12, c=1, seed=1)], axis=-1)
  cases = {
    "l.png": Image.fromarray(gray),
    "rgba.png": Image.fromarray(rgba),
    "p.png": Image.fromarray(rgb).quantize(16),
    "la.png": Image.fromarray(gray).convert("LA"),
    "1.png": Image.fromarray(gray > 127),
    "cmyk.jpg": Image.new("CMYK", (12, 10), (255, 0, 0, 0)),
  }
  for name, img in cases.items():
    out = imageio.load_image(_save(tmp_path / name, img))
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8, name
  for name in ("l.png", "la.png"):
    out = imageio.load_image(tmp_path / name)
    for c in range(3):
      np.testing.assert_array_equal(out[..., c], gray)
  bits = imageio.load_image(tmp_path / "1.png")[..., 0]
  np.testing.assert_array_equal(bits, np.where(gray > 127, 255, 0))
  # Alpha is dropped, colours kept as stored.
  np.testing.assert_array_equal(imageio.load_image(tmp_path / "rgba.png"), rgb)
  # The palette image decodes to its palette colours.
  palette = np.asarray(cases["p.png"].convert("RGB"))
  np.testing.assert_array_equal(imageio.load_image(tmp_path / "p.png"), palette)
  # Pure cyan: no red, full green and blue (JPEG leaves some slack).
  cyan = imageio.load_image(tmp_path / "cmyk.jpg").astype(int)
  assert cyan[..., 0].max() < 20 and cyan[..., 1:].min() > 235


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
  a = np.array([[0, 257, 32896, 65535]], np.uint16)
  img = Image.fromarray(a)
  assert img.mode == "I;16"
  out = imageio.load_image(_save(tmp_path / "a.png", img))
  assert out.shape == (1, 4, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_32bit_int_and_float_images(tmp_path):
  """Mode I: 8-bit if it fits, else 16-bit; mode F: [0, 1] or [0, 255]."""
  cases = [
    (np.array([[0, 200, 255]], np.int32), [0, 200, 255]),
    (np.array([[0, 257, 65535, 70000]], np.int32), [0, 1, 255, 255]),
    (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),
    (np.array([[0.0, 127.0, 300.0, -5.0]], np.float32), [0, 127, 255, 0]),
  ]
  for k, (a, want) in enumerate(cases):
    path = _save(tmp_path / f"{k}.tif", Image.fromarray(a))
    assert Image.open(path).mode in ("I", "F")
    out = imageio.load_image(path)
    assert out.shape == (1, a.shape[1], 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], want, err_msg=str(a))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_exif_orientation_is_applied(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
  path = _save(tmp_path / "r.jpg", Image.new("RGB", (30, 20)), exif=exif)
  assert imageio.load_image(path).shape == (30, 20, 3)


def test_bad_files_raise_image_error_naming_them(tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  full = _save(tmp_path / "full.png", Image.fromarray(_noise(64, 64)))
  blob = open(full, "rb").read()
  truncated = tmp_path / "cut.png"
  truncated.write_bytes(blob[: len(blob) // 2])
  folder = tmp_path / "dir.png"
  folder.mkdir()
  for path, problem in [
    (text, "not a recognised image"),
    (empty, "empty"),
    (truncated, "truncated"),
    (tmp_path / "missing.png", "not found"),
    (folder, "not a regular file"),
  ]:
    with pytest.raises(ImageError, match=problem) as e:
      imageio.load_image(path)
    assert str(path) in str(e.value)
    assert e.value.path == str(path)
    assert problem in e.value.problem
    assert isinstance(e.value, ValueError)


# --- writing ---------------------------------------------------------------


def test_write_atomic_writes_and_replaces(tmp_path):
  path = tmp_path / "out.bin"
  imageio.write_atomic(path, b"first")
  imageio.write_atomic(str(path), b"second")
  assert path.read_bytes() == b"second"
  assert os.listdir(tmp_path) == ["out.bin"]  # no temporary files left


def test_write_atomic_failures_name_the_file(tmp_path):
  missing = tmp_path / "nope" / "out.bin"
  with pytest.raises(WriteError, match="does not exist") as e:
    imageio.write_atomic(missing, b"x")
  assert str(missing) in str(e.value) and isinstance(e.value, OSError)
  # The target is a directory: the rename fails, the old entry survives.
  target = tmp_path / "taken"
  target.mkdir()
  with pytest.raises(WriteError, match="cannot write") as e:
    imageio.write_atomic(target, b"x")
  assert str(target) in str(e.value)
  assert target.is_dir() and os.listdir(tmp_path) == ["taken"]


def test_save_png_roundtrip(tmp_path):
  img = _noise(17, 23)
  path = tmp_path / "a.png"
  imageio.save_png(path, img)
  np.testing.assert_array_equal(imageio.load_image(path), img)
  assert path.read_bytes() == imageio.encode_png(img)
  assert imageio.encode_png(img)[:8] == b"\x89PNG\r\n\x1a\n"


# --- pixel range -----------------------------------------------------------


def test_to_float_and_back_is_exact():
  u = np.arange(256, dtype=np.uint8).reshape(16, 16)
  x = imageio.to_float(u)
  assert x.dtype == np.float32 and x.shape == u.shape
  assert x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(imageio.to_uint8(x), u)


def test_to_uint8_clamps_and_rounds_like_the_original():
  x = np.array([-5.0, -1.0, 0.0, 1.0, 7.0, np.nan, np.inf, -np.inf])
  # NaN is taken as 0.0 (mid grey), infinities clamp like large values.
  np.testing.assert_array_equal(
    imageio.to_uint8(x), [0, 0, 128, 255, 255, 128, 255, 0]
  )
  # (x + 1) / 2 * 255 + 0.5, truncated: 0.5 / 255 below a level rounds up.
  level = (np.array([10, 100]) / 255.0) * 2 - 1
  eps = 0.4 / 255 * 2
  np.testing.assert_array_equal(imageio.to_uint8(level - eps), [10, 100])
  np.testing.assert_array_equal(imageio.to_uint8(level + eps), [10, 100])
  assert imageio.to_uint8(np.zeros((2, 3, 4))).dtype == np.uint8
