"""Tests for cdc_jax.data: decoding, sources, crops and the loader."""

import logging
import os
import types

import numpy as np
import pytest
from PIL import Image

from cdc_jax import data


def _noise(h, w, c=3, seed=0):
  rng = np.random.default_rng(seed)
  shape = (h, w, c) if c else (h, w)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _save(path, img, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, **kw)
  return str(path)


def _folder(root, n, h=40, w=48):
  """n noise images; image k is constant colour k so it can be told."""
  for k in range(n):
    a = np.full((h, w, 3), k, np.uint8)
    _save(os.path.join(root, f"img{k:02d}.png"), Image.fromarray(a))
  return str(root)


# Decoding.


def test_modes_come_back_as_uint8_rgb(tmp_path):
  gray = _noise(10, 12, c=0)
  rgb = _noise(10, 12)
  rgba = np.concatenate([rgb, _noise(10, 12, c=1, seed=1)], axis=-1)
  cases = {
    "l.png": Image.fromarray(gray),
    "rgba.png": Image.fromarray(rgba),
    "p.png": Image.fromarray(rgb).quantize(16),
    "la.png": Image.fromarray(gray).convert("LA"),
    "cmyk.jpg": Image.new("CMYK", (12, 10), (255, 0, 0, 0)),
  }
  for name, img in cases.items():
    out = data.load_image(_save(tmp_path / name, img))
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8, name
  np.testing.assert_array_equal(
    data.load_image(tmp_path / "l.png")[..., 1], gray
  )
  # Alpha is dropped, colours kept as stored.
  np.testing.assert_array_equal(data.load_image(tmp_path / "rgba.png"), rgb)
  # Pure cyan: no red, full green and blue (JPEG leaves some slack).
  cyan = data.load_image(tmp_path / "cmyk.jpg").astype(int)
  assert cyan[..., 0].max() < 20 and cyan[..., 1:].min() > 235


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
  a = np.array([[0, 257, 32896, 65535]], np.uint16)
  img = Image.fromarray(a)
  assert img.mode == "I;16"
  out = data.load_image(_save(tmp_path / "a.png", img))
  assert out.shape == (1, 4, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_exif_orientation_is_applied(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
  path = _save(tmp_path / "r.jpg", Image.new("RGB", (30, 20)), exif=exif)
  assert data.load_image(path).shape == (30, 20, 3)


def test_bad_files_raise_image_error_naming_them(tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  full = _save(tmp_path / "full.png", Image.fromarray(_noise(64, 64)))
  blob = open(full, "rb").read()
  truncated = tmp_path / "cut.png"
  truncated.write_bytes(blob[: len(blob) // 2])
  for path, problem in [
    (text, "not a recognised image"),
    (empty, "empty"),
    (truncated, "truncated"),
    (tmp_path / "missing.png", "not found"),
  ]:
    with pytest.raises(data.ImageError, match=problem) as e:
      data.load_image(path)
    assert str(path) in str(e.value)
    assert e.value.path == str(path)
    assert isinstance(e.value, ValueError)


# Files and sources.


def test_find_images_is_recursive_sorted_and_filtered(tmp_path):
  for rel in ["b/x.PNG", "a.jpeg", "b/a.Tif", "c.txt", ".hidden.png", "z.bmp"]:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
  found = [os.path.relpath(p, tmp_path) for p in data.find_images(tmp_path)]
  # Sorted by path components, so 'b/...' sits between 'a.jpeg' and 'z.bmp'.
  assert found == [
    "a.jpeg",
    os.path.join("b", "a.Tif"),
    os.path.join("b", "x.PNG"),
    "z.bmp",
  ]


def test_empty_folder_error_names_it(tmp_path):
  (tmp_path / "readme.txt").write_text("hi")
  with pytest.raises(ValueError, match="no images") as e:
    data.ImageFolderSource(tmp_path)
  assert str(tmp_path) in str(e.value)
  with pytest.raises(ValueError, match="does not exist"):
    data.ImageFolderSource(tmp_path / "nope")


def test_folder_skips_bad_file_with_warning(tmp_path, caplog):
  root = _folder(tmp_path, 2)
  bad = tmp_path / "img01.png"
  bad.write_text("garbage")
  source = data.ImageFolderSource(root)
  assert len(source) == 2
  loader = data.Loader(source, batch_size=6, crop_size=32, seed=0)
  with caplog.at_level(logging.WARNING, logger="cdc_jax.data"):
    batches = [loader.batch_at(k) for k in range(3)]
  # Only the good image (colour 0) is ever used.
  assert all((b == 0).all() for b in batches)
  msgs = [r.getMessage() for r in caplog.records]
  assert sum(str(bad) in m for m in msgs) == 1, msgs


def test_folder_all_bad_raises_naming_folder(tmp_path):
  (tmp_path / "a.png").write_text("garbage")
  (tmp_path / "b.jpg").write_text("garbage")
  loader = data.Loader(data.ImageFolderSource(tmp_path), 2, 8, seed=0)
  with pytest.raises(ValueError, match="no readable images") as e:
    next(loader)
  assert str(tmp_path) in str(e.value)


def _vimeo(root, sequences=("00001/0001", "00001/0002"), list_file=True):
  for s, seq in enumerate(sequences):
    for f in range(1, 8):
      a = np.full((40, 64, 3), 10 * s + f, np.uint8)
      _save(
        os.path.join(root, "sequences", seq, f"im{f}.png"), Image.fromarray(a)
      )
  if list_file:
    with open(os.path.join(root, "sep_trainlist.txt"), "w") as fh:
      fh.write("\n".join(sequences) + "\n\n")
  return str(root)


def test_vimeo_source_and_crops(tmp_path):
  source = data.VimeoSeptupletSource(_vimeo(tmp_path))
  assert len(source) == 14
  assert source.name(9).endswith(os.path.join("00001", "0002", "im3.png"))
  assert source[9][0, 0, 0] == 13
  loader = data.Loader(source, batch_size=16, crop_size=32, seed=1)
  batch = next(loader)
  loader.close()
  assert batch.shape == (16, 32, 32, 3) and batch.dtype == np.uint8
  # Random frames from both septuplets.
  values = set(np.unique(batch[:, 0, 0, 0]))
  assert values <= {f for f in range(1, 8)} | {10 + f for f in range(1, 8)}
  assert len(values) > 3


def test_vimeo_missing_list_explains_layout(tmp_path):
  root = _vimeo(tmp_path, list_file=False)
  with pytest.raises(ValueError, match="sep_trainlist.txt") as e:
    data.VimeoSeptupletSource(root)
  assert "sequences/" in str(e.value)
  with pytest.raises(ValueError, match="sep_testlist.txt"):
    data.VimeoSeptupletSource(root, split="test")


def test_embedded_source_holds_out_one_photo():
  names = [n for n, _ in data.embedded_images()]
  assert names == [
    "astronaut",
    "chelsea",
    "coffee",
    "motorcycle_left",
    "motorcycle_right",
  ]
  source = data.EmbeddedSource()
  assert data.HELD_OUT == "chelsea"
  assert source.names == [n for n in names if n != "chelsea"]
  assert len(source) == 4
  for i in range(len(source)):
    img = source[i]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  assert "chelsea" in data.EmbeddedSource(exclude=()).names


def test_make_source(tmp_path):
  cfg = types.SimpleNamespace
  assert isinstance(
    data.make_source(cfg(name="embedded", path="")), data.EmbeddedSource
  )
  folder = data.make_source(cfg(name="folder", path=_folder(tmp_path, 1)))
  assert isinstance(folder, data.ImageFolderSource)
  with pytest.raises(ValueError, match="--config.data.path="):
    data.make_source(cfg(name="vimeo", path=""))
  with pytest.raises(ValueError, match="--config.data.path="):
    data.make_source(cfg(name="folder"))
  with pytest.raises(ValueError, match="unknown data source"):
    data.make_source(cfg(name="imagenet", path="x"))


# Crops and the loader.


def test_random_crop_too_small_is_clear():
  rng = np.random.default_rng(0)
  img = _noise(40, 64)
  crop = data.random_crop(img, 40, rng)
  assert crop.shape == (40, 40, 3)
  with pytest.raises(data.ImageError, match="crop_size") as e:
    data.random_crop(img, 48, rng, name="/d/small.png")
  assert "/d/small.png" in str(e.value) and "64x40" in str(e.value)


def test_too_small_image_surfaces_from_loader(tmp_path):
  source = data.ImageFolderSource(_folder(tmp_path, 2, h=20, w=20))
  with data.Loader(source, 2, 32, seed=0) as loader:
    with pytest.raises(data.ImageError, match="remove the file"):
      next(loader)


def test_loader_is_deterministic_and_resumable(tmp_path):
  source = data.ImageFolderSource(_folder(tmp_path, 6))

  def take(n, **kw):
    with data.Loader(source, batch_size=4, crop_size=32, **kw) as loader:
      return [next(loader) for _ in range(n)]

  a = take(4, seed=3)
  for batch in a:
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8
  for x, y in zip(a, take(4, seed=3), strict=True):
    np.testing.assert_array_equal(x, y)
  # Resuming at step 2 gives batches 2, 3 of the uninterrupted run.
  for x, y in zip(a[2:], take(2, seed=3, start_step=2), strict=True):
    np.testing.assert_array_equal(x, y)
  b = take(4, seed=3, process_index=1, process_count=2)
  assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  c = take(4, seed=4)
  assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_loader_shards_are_disjoint(tmp_path):
  source = data.ImageFolderSource(_folder(tmp_path, 5))
  shards = []
  for p in range(2):
    loader = data.Loader(
      source, 8, 32, seed=0, process_index=p, process_count=2
    )
    shards.append(set(loader.indices))
    # Images are constant colour k, so the batch reveals what was read.
    used = {int(v) for k in range(4) for v in loader.batch_at(k)[:, 0, 0, 0]}
    assert used <= shards[-1]
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(5))


def test_loader_fewer_files_than_processes_uses_all(tmp_path, caplog):
  source = data.ImageFolderSource(_folder(tmp_path, 2))
  with caplog.at_level(logging.WARNING, logger="cdc_jax.data"):
    loader = data.Loader(
      source, 2, 32, seed=0, process_index=3, process_count=4
    )
  assert loader.indices == [0, 1]
  assert "fewer than the 4 processes" in caplog.text


class _Exploding:
  def __len__(self):
    return 3

  def __getitem__(self, i):
    raise RuntimeError("disk on fire")

  def name(self, i):
    return f"item{i}"


def test_prefetch_error_surfaces_in_next():
  loader = data.Loader(_Exploding(), 2, 8, seed=0)
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(loader)
  # And keeps surfacing rather than hanging.
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(loader)
  assert loader._thread.daemon
