"""Tests of cdc_jax.data.sources: folders, Vimeo-90k, embedded photos."""

import errno
import logging
import os
import types

import numpy as np
import pytest
from PIL import Image

from cdc_jax.data import sources
from cdc_jax.imageio import ImageError


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)
  return str(path)


def _folder(root, n, h=40, w=48):
  """n images; image k is constant colour k so it can be told apart."""
  for k in range(n):
    colour_k = np.full((h, w, 3), k, np.uint8)
    _save(os.path.join(root, f"img{k:02d}.png"), colour_k)
  return str(root)


def _vimeo(root, sequences=("00001/0001", "00001/0002"), list_file=True):
  """Septuplets whose frame f of sequence s is constant 10 * s + f."""
  for s, seq in enumerate(sequences):
    for f in range(1, 8):
      frame = np.full((40, 64, 3), 10 * s + f, np.uint8)
      _save(os.path.join(root, "sequences", seq, f"im{f}.png"), frame)
  if list_file:
    with open(os.path.join(root, "sep_trainlist.txt"), "w") as fh:
      fh.write("\n".join(sequences) + "\n\n")
  return str(root)


# --- find_images and folders -----------------------------------------------


def test_find_images_is_recursive_sorted_and_filtered(tmp_path):
  for rel in [
    "b/x.PNG",
    "a.jpeg",
    "b/a.Tif",
    "c.txt",
    ".hidden.png",
    ".git/d.png",
    "z.bmp",
    "y.webp",
  ]:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
  found = [os.path.relpath(p, tmp_path) for p in sources.find_images(tmp_path)]
  # Sorted by path components, so 'b/...' sits between 'a.jpeg' and 'y.webp'.
  assert found == [
    "a.jpeg",
    os.path.join("b", "a.Tif"),
    os.path.join("b", "x.PNG"),
    "y.webp",
    "z.bmp",
  ]
  assert all(p.startswith(str(tmp_path)) for p in sources.find_images(tmp_path))
  with pytest.raises(ValueError, match="does not exist"):
    sources.find_images(tmp_path / "c.txt")


def test_find_images_follows_links_once_and_survives_loops(tmp_path):
  root, outside = tmp_path / "root", tmp_path / "outside"
  _save(root / "a" / "x.png", np.zeros((4, 4, 3), np.uint8))
  _save(outside / "y.png", np.zeros((4, 4, 3), np.uint8))
  os.symlink(root, root / "a" / "loop")  # a link back to an ancestor
  os.symlink(root / "a", root / "b")  # a second name for 'a'
  os.symlink(outside, root / "ext")  # a linked folder outside root
  os.symlink(tmp_path / "nowhere.png", root / "dangling.png")
  found = [os.path.relpath(p, root) for p in sources.find_images(root)]
  # Each real folder once, by its first name in sorted order; the broken
  # link is listed (the loader skips it as unreadable).
  assert found == [
    os.path.join("a", "x.png"),
    "dangling.png",
    os.path.join("ext", "y.png"),
  ]


def test_find_images_skips_unlistable_subfolder(tmp_path, monkeypatch, caplog):
  for rel in ("ok/x.png", "locked/y.png", "z.png"):
    _save(tmp_path / rel, np.zeros((4, 4, 3), np.uint8))
  locked = os.path.join(str(tmp_path), "locked")
  real_scandir = os.scandir

  def scandir(path="."):
    if os.fspath(path) in (locked, str(tmp_path / "gone")):
      raise PermissionError(errno.EACCES, "Permission denied", path)
    return real_scandir(path)

  monkeypatch.setattr(os, "scandir", scandir)
  with caplog.at_level(logging.WARNING, logger="cdc_jax.data.sources"):
    found = sources.find_images(tmp_path)
  assert [os.path.relpath(p, tmp_path) for p in found] == [
    os.path.join("ok", "x.png"),
    "z.png",
  ]
  (record,) = caplog.records
  assert locked in record.getMessage() and "cannot list" in record.getMessage()
  (tmp_path / "gone").mkdir()
  with pytest.raises(ValueError, match="cannot be listed") as e:
    sources.find_images(tmp_path / "gone")
  assert "gone" in str(e.value)


@pytest.mark.skipif(
  not hasattr(os, "geteuid") or os.geteuid() == 0,
  reason="permissions do not apply to root",
)
def test_find_images_unreadable_folder_for_real(tmp_path):
  _save(tmp_path / "locked" / "y.png", np.zeros((4, 4, 3), np.uint8))
  _save(tmp_path / "z.png", np.zeros((4, 4, 3), np.uint8))
  os.chmod(tmp_path / "locked", 0)
  try:
    found = sources.find_images(tmp_path)
  finally:
    os.chmod(tmp_path / "locked", 0o755)
  assert found == [str(tmp_path / "z.png")]


def test_folder_source_reads_images_by_index(tmp_path):
  source = sources.ImageFolderSource(_folder(tmp_path, 3))
  assert len(source) == 3
  for k in range(3):
    assert source.name(k) == os.path.join(str(tmp_path), f"img{k:02d}.png")
    img = source[k]
    assert img.shape == (40, 48, 3) and img.dtype == np.uint8
    assert np.all(img == k)
  assert str(tmp_path) in repr(source)


def test_folder_source_bad_file_raises_image_error(tmp_path):
  """Files are only decoded on access (the loader skips bad ones)."""
  (tmp_path / "a.png").write_text("garbage")
  source = sources.ImageFolderSource(tmp_path)
  assert len(source) == 1
  with pytest.raises(ImageError) as e:
    source[0]
  assert e.value.path == source.name(0)


def test_empty_folder_error_names_it_and_what_it_holds(tmp_path):
  (tmp_path / "readme.txt").write_text("hi")
  (tmp_path / "sub").mkdir()
  for name in ("a.HEIC", "b.heic", "LICENSE"):
    (tmp_path / "sub" / name).write_text("x")
  with pytest.raises(ValueError, match="no images") as e:
    sources.ImageFolderSource(tmp_path)
  assert str(tmp_path) in str(e.value)
  assert "found 4 other files (.heic: 2, .txt: 1, no extension: 1)" in str(
    e.value
  )
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="found no files at all"):
    sources.ImageFolderSource(tmp_path / "empty")
  with pytest.raises(ValueError, match="does not exist"):
    sources.ImageFolderSource(tmp_path / "nope")


# --- Vimeo-90k -------------------------------------------------------------


def test_vimeo_source_items_are_frames(tmp_path):
  source = sources.VimeoSeptupletSource(_vimeo(tmp_path))
  assert len(source) == 14
  assert source.sequences == ["00001/0001", "00001/0002"]
  assert source.name(9).endswith(os.path.join("00001", "0002", "im3.png"))
  assert source[9][0, 0, 0] == 13
  for i in range(len(source)):
    assert np.all(source[i] == 10 * (i // 7) + i % 7 + 1)
  for i in (-1, 14):
    with pytest.raises(IndexError):
      source.name(i)
  assert "split='train'" in repr(source)


def test_vimeo_layout_errors_explain_layout(tmp_path):
  root = _vimeo(tmp_path / "v", list_file=False)
  with pytest.raises(ValueError, match="sep_trainlist.txt") as e:
    sources.VimeoSeptupletSource(root)
  assert "sequences/" in str(e.value)
  with pytest.raises(ValueError, match="sep_testlist.txt"):
    sources.VimeoSeptupletSource(root, split="test")
  with pytest.raises(ValueError, match="split"):
    sources.VimeoSeptupletSource(root, split="val")
  with open(os.path.join(root, "sep_trainlist.txt"), "w") as fh:
    fh.write("\n\n")
  with pytest.raises(ValueError, match="lists no sequences"):
    sources.VimeoSeptupletSource(root)
  with open(os.path.join(root, "sep_trainlist.txt"), "w") as fh:
    fh.write("09999/0001\n")
  with pytest.raises(ValueError, match="im1.png not found"):
    sources.VimeoSeptupletSource(root)


# --- embedded photos -------------------------------------------------------


def test_embedded_source_holds_out_one_photo():
  names = [n for n, _ in sources.embedded_images()]
  assert names == [
    "astronaut",
    "chelsea",
    "coffee",
    "motorcycle_left",
    "motorcycle_right",
  ]
  source = sources.EmbeddedSource()
  assert sources.HELD_OUT == "chelsea"
  assert source.names == [n for n in names if n != "chelsea"]
  assert len(source) == 4
  for i in range(len(source)):
    img = source[i]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert source.name(i) == f"embedded:{source.names[i]}"
  assert "chelsea" in sources.EmbeddedSource(exclude=()).names


def test_embedded_source_rejects_bad_exclude():
  with pytest.raises(ValueError, match="unknown embedded images"):
    sources.EmbeddedSource(exclude=("lena",))
  names = [n for n, _ in sources.embedded_images()]
  with pytest.raises(ValueError, match="all embedded images are excluded"):
    sources.EmbeddedSource(exclude=names)


# --- make_source -----------------------------------------------------------


def test_make_source(tmp_path):
  cfg = types.SimpleNamespace
  assert isinstance(
    sources.make_source(cfg(name="embedded", path="")), sources.EmbeddedSource
  )
  folder = sources.make_source(cfg(name="folder", path=_folder(tmp_path, 1)))
  assert isinstance(folder, sources.ImageFolderSource)
  vimeo = sources.make_source(
    cfg(name="vimeo", path=_vimeo(tmp_path / "v"), split="train")
  )
  assert isinstance(vimeo, sources.VimeoSeptupletSource) and len(vimeo) == 14
  with pytest.raises(ValueError, match="--config.data.path="):
    sources.make_source(cfg(name="vimeo", path=""))
  with pytest.raises(ValueError, match="--config.data.path="):
    sources.make_source(cfg(name="folder"))
  with pytest.raises(ValueError, match="unknown data source"):
    sources.make_source(cfg(name="imagenet", path="x"))
