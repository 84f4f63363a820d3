"""Training on a folder with broken, odd and too small files among good ones.

The folder is written here: good RGB, grayscale, RGBA and 16-bit PNGs
(each a constant colour, so a crop tells which file it came from), and a
truncated PNG, a truncated JPEG, a 0-byte file, a text file named '.jpg'
and an image smaller than the crop.
"""

import io
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from cdc_jax.data.loader import Loader
from cdc_jax.data.sources import ImageFolderSource
from cdc_jax.imageio import ImageError

CROP = 32
SCREEN_LOGGER = "cdc_jax.data.screen"

# File name -> the RGB colour its crops have.
GOOD = {
  "rgb0.png": (1, 1, 1),
  "rgb1.jpg": None,  # JPEG: colour checked loosely, see _colour_of
  "rgb2.png": (21, 21, 21),
  "rgb_exact.png": (31, 31, 31),  # exactly the crop's height
  "gray.png": (100, 100, 100),
  "rgba.png": (10, 20, 30),  # alpha dropped, colour kept
  "gray16.png": (77, 77, 77),  # 16-bit, 77 * 257 -> 77
}
UNREADABLE = {
  "truncated.png": "truncated",
  "truncated.jpg": "truncated",
  "empty.png": "empty",
  "notes.jpg": "not a recognised image format",
}
TOO_SMALL = {"small.png": (24, 20)}  # (W, H)


def _encode(array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def _write_bad_files(root):
  noise = np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8)
  png, jpg = _encode(noise, "PNG"), _encode(noise, "JPEG")
  (root / "truncated.png").write_bytes(png[: len(png) // 2])
  (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
  (root / "empty.png").write_bytes(b"")
  (root / "notes.jpg").write_text("not a picture\n")
  Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(root / "small.png")


def _write_good_files(root):
  def rgb(v, h=40):
    return np.full((h, 48, 3), v, np.uint8)

  Image.fromarray(rgb(1)).save(root / "rgb0.png")
  Image.fromarray(rgb(11)).save(root / "rgb1.jpg", quality=95)
  Image.fromarray(rgb(21)).save(root / "rgb2.png")
  Image.fromarray(rgb(31, h=CROP)).save(root / "rgb_exact.png")
  Image.fromarray(np.full((40, 48), 100, np.uint8)).save(root / "gray.png")
  rgba = np.zeros((40, 48, 4), np.uint8) + np.uint8([10, 20, 30, 0])
  Image.fromarray(rgba).save(root / "rgba.png")
  gray16 = np.full((40, 48), 77 * 257, np.uint16)
  Image.fromarray(gray16).save(root / "gray16.png")
  assert Image.open(root / "gray16.png").mode.startswith("I")


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
  root = tmp_path_factory.mktemp("messy")
  _write_good_files(root)
  _write_bad_files(root)
  return root


@pytest.fixture(scope="module")
def all_bad(tmp_path_factory):
  root = tmp_path_factory.mktemp("all_bad")
  _write_bad_files(root)
  return root


def _colour_of(crop):
  """The colour of a constant crop (JPEG's 11 may come back as 10..12)."""
  first = tuple(int(v) for v in crop[0, 0])
  assert (crop == crop[0, 0]).all(), "a crop mixes files"
  if all(10 <= v <= 12 for v in first) and len(set(first)) == 1:
    return "rgb1.jpg"
  names = [n for n, c in GOOD.items() if c == first]
  assert names, f"crop of colour {first} is from no good file"
  return names[0]


def test_messy_folder_trains_and_warns_once_per_file(messy, caplog):
  source = ImageFolderSource(messy)
  assert len(source) == len(GOOD) + len(UNREADABLE) + len(TOO_SMALL)
  used = set()
  with caplog.at_level(logging.INFO, logger=SCREEN_LOGGER):
    with Loader(source, batch_size=4, crop_size=CROP, seed=0) as loader:
      for _ in range(25):
        batch = next(loader)
        assert batch.shape == (4, CROP, CROP, 3) and batch.dtype == np.uint8
        used.update(_colour_of(crop) for crop in batch)
      loader.survey()  # whatever the thread left unchecked
      for k in range(25, 30):  # and more batches after the first pass
        used.update(_colour_of(crop) for crop in loader.batch_at(k))
  assert used == set(GOOD)
  msgs = [r.getMessage() for r in caplog.records]
  for name in [*UNREADABLE, *TOO_SMALL]:
    path = os.path.join(str(messy), name)
    assert sum(m.startswith(f"skipping {path}:") for m in msgs) == 1, msgs
  for name in GOOD:
    assert not any(os.path.join(str(messy), name) in m for m in msgs)
  small = os.path.join(str(messy), "small.png")
  assert f"skipping {small}: image is 24x20 (WxH), smaller than" in "".join(
    msgs
  )
  summaries = [m for m in msgs if "skipped" in m]
  assert summaries == [
    f"{source!r}: skipped 5 of 12 files: 4 unreadable, 1 smaller than the "
    f"{CROP}x{CROP} crop"
  ]


def test_skipped_counts_are_public(messy):
  loader = Loader(ImageFolderSource(messy), 2, CROP, seed=0)
  before = loader.skipped
  assert before.checked == 0 and before.count == 0 and not before.complete
  assert "0 of 12 checked so far" in str(before)
  report = loader.survey()
  assert report.complete and report.checked == report.total == 12
  assert report.count == 5 and report.crop_size == CROP
  path = {n: os.path.join(str(messy), n) for n in [*UNREADABLE, *TOO_SMALL]}
  assert set(report.unreadable) == {path[n] for n in UNREADABLE}
  for name, problem in UNREADABLE.items():
    assert problem in report.unreadable[path[name]]
  assert report.too_small == {path["small.png"]: (24, 20)}
  assert loader.skipped == report
  # A snapshot: later checks don't change a report already handed out.
  assert before.checked == 0


def test_batches_are_a_function_of_seed_and_step_with_bad_files(messy):
  source = ImageFolderSource(messy)
  fresh = Loader(source, 4, CROP, seed=7)
  reference = [fresh.batch_at(k) for k in range(6)]
  # Another history: every file checked first, then the steps backwards.
  surveyed = Loader(ImageFolderSource(messy), 4, CROP, seed=7)
  surveyed.survey()
  for k in reversed(range(6)):
    np.testing.assert_array_equal(surveyed.batch_at(k), reference[k])
  # Without the cache (every draw decodes the file again).
  uncached = Loader(ImageFolderSource(messy), 4, CROP, seed=7, cache=False)
  for k in range(6):
    np.testing.assert_array_equal(uncached.batch_at(k), reference[k])
  # Resumed at step 2 through the prefetch thread.
  with Loader(source, 4, CROP, seed=7, start_step=2) as resumed:
    for k in range(2, 6):
      np.testing.assert_array_equal(next(resumed), reference[k])
  other_seed = Loader(source, 4, CROP, seed=8)
  assert not all(
    np.array_equal(other_seed.batch_at(k), reference[k]) for k in range(6)
  )


def test_folder_without_usable_image_fails_at_first_batch(all_bad):
  source = ImageFolderSource(all_bad)  # has files, none usable
  with Loader(source, 2, CROP, seed=0) as loader:
    with pytest.raises(ValueError, match="no usable images") as e:
      next(loader)
    assert loader.step == 0
  msg = str(e.value)
  assert str(all_bad) in msg
  assert "all 5 files were skipped (4 unreadable, 1 smaller than" in msg
  assert "crop_size of at most 20 that is a multiple" in msg
  with pytest.raises(ValueError, match="no usable images"):
    Loader(source, 2, CROP, seed=0).survey()
  # A crop the small image fits makes it usable.
  assert Loader(source, 2, 16, seed=0).batch_at(0).shape == (2, 16, 16, 3)


class _CountingSource:
  """n in-memory items (item k has colour k % 256), some undecodable."""

  def __init__(self, n, bad):
    self.n, self.bad, self.reads = n, set(bad), [0] * n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.reads[i] += 1
    if i in self.bad:
      raise ImageError(self.name(i), "cannot decode image (test)")
    return np.full((CROP, CROP, 3), i % 256, np.uint8)

  def name(self, i):
    return f"item{i}"


def test_prefetch_thread_checks_every_item_while_idle(caplog):
  # 300 items and batches of 1: random draws alone would need ~1,900
  # steps to reach them all; the thread checks the rest while idle.
  source = _CountingSource(300, bad={5, 150, 299})
  with caplog.at_level(logging.WARNING, logger=SCREEN_LOGGER):
    with Loader(source, 1, CROP, seed=0, cache=True, prefetch=2) as loader:
      first = next(loader)
      deadline = time.monotonic() + 60
      while not loader.skipped.complete and time.monotonic() < deadline:
        time.sleep(0.01)
      report = loader.skipped
      np.testing.assert_array_equal(first, loader.batch_at(0))
      np.testing.assert_array_equal(next(loader), loader.batch_at(1))
  assert report.complete, report
  assert sorted(report.unreadable) == ["item150", "item299", "item5"]
  assert source.reads == [1] * 300  # cached: every item decoded once
  msgs = [r.getMessage() for r in caplog.records]
  summaries = [m for m in msgs if "skipped" in m]
  assert len(summaries) == 1 and "skipped 3 of 300 files" in summaries[0]


def test_summary_of_a_clean_folder_says_so(tmp_path, caplog):
  _write_good_files(tmp_path)
  with caplog.at_level(logging.INFO, logger=SCREEN_LOGGER):
    report = Loader(ImageFolderSource(tmp_path), 2, CROP, seed=0).survey()
  assert report.count == 0 and report.complete
  assert str(report) == f"all {len(GOOD)} files usable with the 32x32 crop"
  assert [r.getMessage() for r in caplog.records] == [
    f"ImageFolderSource({str(tmp_path)!r}): {report}"
  ]
  assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_require_usable_fails_fast_or_costs_one_decode(all_bad):
  loader = Loader(ImageFolderSource(all_bad), 2, CROP, seed=0)
  with pytest.raises(ValueError, match="no usable images") as e:
    loader.require_usable()  # no batch drawn, no thread started
  assert str(all_bad) in str(e.value) and loader.skipped.complete
  healthy = _CountingSource(50, bad={0})
  Loader(healthy, 2, CROP, seed=0).require_usable()
  assert healthy.reads == [1, 1] + [0] * 48  # item 0 bad, item 1 usable
