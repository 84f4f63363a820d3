"""Tests of cdc_jax.data.loader: random crops and the batch loader."""

import logging
import os
import threading

import numpy as np
import pytest
from PIL import Image

from cdc_jax.data import loader as loader_lib
from cdc_jax.data.loader import Loader
from cdc_jax.data.sources import ImageFolderSource
from cdc_jax.imageio import ImageError

LOGGER = "cdc_jax.data.loader"
SCREEN_LOGGER = "cdc_jax.data.screen"


def _noise(h, w, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _folder(root, n, h=40, w=48):
  """n images; image k is constant colour k so a batch shows its sources."""
  for k in range(n):
    a = np.full((h, w, 3), k, np.uint8)
    Image.fromarray(a).save(os.path.join(root, f"img{k:02d}.png"))
  return str(root)


class _ArraySource:
  """In-memory source that counts reads; item k is constant colour k."""

  def __init__(self, n, h=40, w=48, bad=()):
    self.images = [np.full((h, w, 3), k, np.uint8) for k in range(n)]
    self.bad = set(bad)
    self.reads = [0] * n

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    self.reads[i] += 1
    if i in self.bad:
      raise ImageError(self.name(i), "cannot decode image (test)")
    return self.images[i]

  def name(self, i):
    return f"item{i}"


class _Exploding:
  def __len__(self):
    return 3

  def __getitem__(self, i):
    raise RuntimeError("disk on fire")

  def name(self, i):
    return f"item{i}"


# --- random_crop -----------------------------------------------------------


def test_random_crop_covers_every_offset():
  img = _noise(40, 64)
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(1000):
    crop = loader_lib.random_crop(img, 40, rng)
    assert crop.shape == (40, 40, 3) and np.shares_memory(crop, img)
    left = int(np.flatnonzero((img[0, :25] == crop[0, 0]).all(-1))[0])
    np.testing.assert_array_equal(crop, img[:, left : left + 40])
    seen.add(left)
  assert seen == set(range(25))
  full = loader_lib.random_crop(img[:8, :8], 8, rng)
  np.testing.assert_array_equal(full, img[:8, :8])


def test_random_crop_too_small_is_clear():
  rng = np.random.default_rng(0)
  img = _noise(40, 64)
  with pytest.raises(ImageError, match="crop_size") as e:
    loader_lib.random_crop(img, 48, rng, name="/d/small.png")
  assert "/d/small.png" in str(e.value) and "64x40" in str(e.value)
  assert e.value.path == "/d/small.png"
  with pytest.raises(ImageError, match="65x65"):
    loader_lib.random_crop(img, 65, rng)


def test_too_small_images_only_is_a_clear_error(tmp_path):
  _folder(tmp_path, 2, h=20, w=24)
  source = ImageFolderSource(tmp_path)
  with Loader(source, 2, 32, seed=0) as loader:
    with pytest.raises(ValueError, match="no usable images") as e:
      next(loader)
  msg = str(e.value)
  assert str(tmp_path) in msg
  assert "2 smaller than the 32x32 crop" in msg
  # The biggest square the small images allow, as a hint.
  assert "crop_size of at most 20 that is a multiple" in msg


# --- batches ---------------------------------------------------------------


def test_loader_is_deterministic_and_resumable(tmp_path):
  source = ImageFolderSource(_folder(tmp_path, 6))

  def take(n, **kw):
    with Loader(source, batch_size=4, crop_size=32, **kw) as loader:
      batches = [next(loader) for _ in range(n)]
      assert loader.step == kw.get("start_step", 0) + n
      return batches

  a = take(4, seed=3)
  for batch in a:
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8
  for x, y in zip(a, take(4, seed=3), strict=True):
    np.testing.assert_array_equal(x, y)
  # Resuming at step 2 gives batches 2, 3 of the uninterrupted run.
  for x, y in zip(a[2:], take(2, seed=3, start_step=2), strict=True):
    np.testing.assert_array_equal(x, y)
  # batch_at is the same function of the step, without the thread.
  direct = Loader(source, batch_size=4, crop_size=32, seed=3)
  np.testing.assert_array_equal(direct.batch_at(3), a[3])
  b = take(4, seed=3, process_index=1, process_count=2)
  assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  c = take(4, seed=4)
  assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_loader_draws_from_the_whole_shard():
  source = _ArraySource(6)
  loader = Loader(source, batch_size=8, crop_size=32, seed=1)
  used = {int(v) for k in range(10) for v in loader.batch_at(k)[:, 0, 0, 0]}
  assert used == set(range(6))


def test_loader_shards_are_disjoint(tmp_path):
  source = ImageFolderSource(_folder(tmp_path, 5))
  shards = []
  for p in range(2):
    loader = Loader(source, 8, 32, seed=0, process_index=p, process_count=2)
    shards.append(set(loader.indices))
    # Images are constant colour k, so the batch reveals what was read.
    used = {int(v) for k in range(4) for v in loader.batch_at(k)[:, 0, 0, 0]}
    assert used <= shards[-1]
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(5))


def test_loader_fewer_files_than_processes_uses_all(tmp_path, caplog):
  source = ImageFolderSource(_folder(tmp_path, 2))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    loader = Loader(source, 2, 32, seed=0, process_index=3, process_count=4)
  assert loader.indices == [0, 1]
  assert "fewer than the 4 processes" in caplog.text


# --- reads: cache and bad items ------------------------------------------


def test_cache_reads_each_item_once():
  cached = _ArraySource(4)
  loader = Loader(cached, 8, 16, seed=0, cache=True)
  batches = [loader.batch_at(k) for k in range(6)]
  assert cached.reads == [1, 1, 1, 1]
  uncached = _ArraySource(4)
  loader = Loader(uncached, 8, 16, seed=0, cache=False)
  for k, batch in enumerate(batches):
    np.testing.assert_array_equal(loader.batch_at(k), batch)
  assert sum(uncached.reads) == 6 * 8  # one read per crop
  # The default caches small sources only.
  small = _ArraySource(loader_lib.CACHE_MAX_ITEMS)
  Loader(small, 4, 16, seed=0).batch_at(0)
  big = _ArraySource(loader_lib.CACHE_MAX_ITEMS + 1, h=16, w=16)
  big_loader = Loader(big, 64, 16, seed=0)
  big_loader.batch_at(0)
  big_loader.batch_at(0)
  assert max(small.reads) == 1 and sum(big.reads) == 2 * 64


def test_bad_item_is_skipped_read_once_and_logged_once(caplog):
  source = _ArraySource(3, bad={1})
  loader = Loader(source, 6, 16, seed=0, cache=False)
  with caplog.at_level(logging.WARNING, logger=SCREEN_LOGGER):
    batches = [loader.batch_at(k) for k in range(5)]
  used = {int(v) for b in batches for v in b[:, 0, 0, 0]}
  assert used == {0, 2}
  assert source.reads[1] == 1  # known bad: never read again
  msgs = [r.getMessage() for r in caplog.records]
  assert sum("item1" in m for m in msgs) == 1, msgs


def test_folder_skips_bad_file_with_warning(tmp_path, caplog):
  root = _folder(tmp_path, 2)
  bad = tmp_path / "img01.png"
  bad.write_text("garbage")
  source = ImageFolderSource(root)
  assert len(source) == 2
  loader = Loader(source, batch_size=6, crop_size=32, seed=0)
  with caplog.at_level(logging.WARNING, logger=SCREEN_LOGGER):
    batches = [loader.batch_at(k) for k in range(3)]
  # Only the good image (colour 0) is ever used.
  assert all((b == 0).all() for b in batches)
  msgs = [r.getMessage() for r in caplog.records]
  assert sum(str(bad) in m for m in msgs) == 1, msgs


def test_folder_all_bad_raises_naming_folder(tmp_path):
  (tmp_path / "a.png").write_text("garbage")
  (tmp_path / "b.jpg").write_text("garbage")
  loader = Loader(ImageFolderSource(tmp_path), 2, 8, seed=0)
  with pytest.raises(ValueError, match="no usable images") as e:
    next(loader)
  assert str(tmp_path) in str(e.value)
  assert "all 2 files were skipped (2 unreadable" in str(e.value)
  loader.close()


def test_all_bad_stops_after_trying_each_item_once():
  source = _ArraySource(5, bad=range(5))
  loader = Loader(source, 4, 8, seed=0, cache=False)
  with pytest.raises(ValueError, match="all 5 files were skipped"):
    loader.batch_at(0)
  assert source.reads == [1] * 5


# --- the prefetch thread ---------------------------------------------------


def test_prefetch_error_surfaces_in_next():
  loader = Loader(_Exploding(), 2, 8, seed=0)
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(loader)
  # And keeps surfacing rather than hanging.
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(loader)
  assert loader.step == 0
  loader.close()


def test_prefetch_thread_is_a_daemon_and_close_stops_it():
  before = set(threading.enumerate())
  loader = Loader(_ArraySource(3), 2, 16, seed=0, prefetch=1)
  assert set(threading.enumerate()) == before  # starts on the first next()
  first = next(loader)
  started = set(threading.enumerate()) - before
  assert len(started) == 1
  (thread,) = started
  assert thread.daemon  # never keeps the interpreter alive
  loader.close()
  assert not thread.is_alive()
  with pytest.raises(RuntimeError, match="closed"):
    next(loader)
  np.testing.assert_array_equal(first, loader.batch_at(0))


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(batch_size=0), "positive"),
    (dict(crop_size=0), "positive"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(process_index=-1), "process_index"),
  ],
)
def test_loader_rejects_bad_arguments(kw, match):
  args = dict(batch_size=2, crop_size=8, seed=0) | kw
  with pytest.raises(ValueError, match=match):
    Loader(_ArraySource(2), **args)


def test_loader_rejects_empty_source():
  with pytest.raises(ValueError, match="empty"):
    Loader(_ArraySource(0), 2, 8, seed=0)
