"""Tests of cdc_jax.data.grain_pipeline and cdc_jax.data.pipeline: the
grain data path gives the threaded Loader's batches."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from cdc_jax.data.grain_pipeline import GrainLoader
from cdc_jax.data.loader import Loader
from cdc_jax.data.pipeline import make_loader
from cdc_jax.data.sources import ImageFolderSource
from configs import common

SCREEN_LOGGER = "cdc_jax.data.screen"
CROP = 16


def _folder(root, n, bad=(), small=()):
  """n images 20x24 where image k is constant colour 10 * k (so a crop
  names its file); ``bad`` ones are junk bytes, ``small`` ones 8 px high."""
  os.makedirs(root, exist_ok=True)
  for k in range(n):
    path = os.path.join(root, f"img{k:02d}.png")
    if k in bad:
      with open(path, "wb") as f:
        f.write(b"not an image")
      continue
    h = 8 if k in small else 20
    Image.fromarray(np.full((h, 24, 3), 10 * k, np.uint8)).save(path)
  return str(root)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
  """9 files: 2 unreadable, 1 smaller than the crop."""
  root = tmp_path_factory.mktemp("messy")
  return ImageFolderSource(_folder(root, 9, bad=(2, 6), small=(4,)))


def _grain(source, worker_count=0, **kw):
  kw.setdefault("seed", 7)
  return GrainLoader(source, 3, CROP, worker_count=worker_count, **kw)


def _loader(source, **kw):
  kw.setdefault("seed", 7)
  return Loader(source, 3, CROP, **kw)


def _take(loader, n):
  with loader:
    return [next(loader) for _ in range(n)]


def test_batches_are_the_loaders(messy):
  ref = _loader(messy)
  want = [ref.batch_at(k) for k in range(6)]
  got = _take(_grain(messy), 6)
  for k, (a, b) in enumerate(zip(got, want, strict=True)):
    assert a.dtype == np.uint8 and a.shape == (3, CROP, CROP, 3), k
    np.testing.assert_array_equal(a, b, err_msg=f"batch {k}")
  # Different steps and seeds differ (the comparison above is not vacuous).
  assert not np.array_equal(want[0], want[1])
  other = _take(_grain(messy, seed=8), 1)[0]
  assert not np.array_equal(other, want[0])


def test_resume_at_step_k_is_the_uninterrupted_batch_k(messy):
  whole = _take(_grain(messy), 7)
  resumed = _take(_grain(messy, start_step=4), 3)
  for a, b in zip(resumed, whole[4:], strict=True):
    np.testing.assert_array_equal(a, b)
  # As the trainer does: set .step before the first batch, and moving it
  # between batches restarts there.
  with _grain(messy) as g:
    g.step = 5
    np.testing.assert_array_equal(next(g), whole[5])
    assert g.step == 6
    g.step = 2
    np.testing.assert_array_equal(next(g), whole[2])
    np.testing.assert_array_equal(g.batch_at(6), whole[6])


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shards_are_disjoint_and_cover_the_data(tmp_path, count):
  n = 7
  source = ImageFolderSource(_folder(tmp_path, n))
  shards, seen = [], set()
  for p in range(count):
    g = _grain(source, process_index=p, process_count=count)
    ref = _loader(source, process_index=p, process_count=count)
    assert g.indices == ref.indices
    shards.append(set(g.indices))
    # The pixels show which file every crop came from: only the shard's.
    colours = {int(c) for c in np.unique(np.stack(_take(g, 8)))}
    assert colours <= {10 * i for i in g.indices}
    seen |= colours
  assert sum(len(s) for s in shards) == n  # disjoint ...
  assert set().union(*shards) == set(range(n))  # ... and covering
  assert len(seen) > count  # more than one file per shard was read


def test_a_process_without_items_reads_all_of_them_with_a_warning(
  tmp_path, caplog
):
  source = ImageFolderSource(_folder(tmp_path, 2))
  with caplog.at_level(logging.WARNING):
    g = _grain(source, process_index=2, process_count=3)
  assert g.indices == [0, 1]
  assert "fewer than the 3 processes" in caplog.text


def test_bad_files_are_skipped_with_one_warning_each(messy, caplog):
  with caplog.at_level(logging.INFO, logger=SCREEN_LOGGER):
    with _grain(messy) as g:
      batches = [next(g) for _ in range(10)]
      skipped = g.survey()  # checks the files the batches did not meet
  colours = {int(c) for c in np.unique(np.stack(batches))}
  assert colours.isdisjoint({20, 40, 60})  # files 2, 4, 6 never used
  assert len(colours) == 6  # all others were
  msgs = [r.getMessage() for r in caplog.records]
  for k in (2, 4, 6):
    name = os.path.join(messy.root, f"img{k:02d}.png")
    assert sum(m.startswith(f"skipping {name}:") for m in msgs) == 1, k
  assert len(skipped.unreadable) == 2 and len(skipped.too_small) == 1
  assert msgs[-1].endswith(
    "skipped 3 of 9 files: 2 unreadable, 1 smaller than the 16x16 crop"
  )


def test_sources_without_names_work():
  images = [np.full((20, 20, 3), 10 * k, np.uint8) for k in range(4)]
  (batch,) = _take(_grain(images), 1)
  assert batch.shape == (3, CROP, CROP, 3)
  assert {int(c) for c in np.unique(batch)} <= {0, 10, 20, 30}


def test_worker_processes_give_the_same_batches(messy, caplog):
  ref = _loader(messy)
  want = [ref.batch_at(k) for k in range(3, 11)]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=SCREEN_LOGGER):
    with _grain(messy, worker_count=2, start_step=3) as g:
      got = [next(g) for _ in range(8)]
      skipped = g.skipped
  for a, b in zip(got, want, strict=True):
    assert type(a) is np.ndarray and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
  # The workers' verdicts reach this process: one warning per bad file
  # the batches met, logged here.
  msgs = [r.getMessage() for r in caplog.records if "skipping" in r.message]
  assert msgs and len(msgs) == len(set(msgs)) == skipped.count


def test_no_usable_image_fails_with_the_loaders_message(tmp_path):
  source = ImageFolderSource(_folder(tmp_path, 3, bad=(0, 1), small=(2,)))
  with pytest.raises(ValueError) as early:
    _grain(source).require_usable()
  g = _grain(source)
  with pytest.raises(ValueError) as late:
    next(g)
  assert str(late.value) == str(early.value)
  assert "no usable images" in str(late.value)
  with pytest.raises(ValueError):  # stays failed
    next(g)
  g.close()
  with pytest.raises(ValueError, match="no usable images"):
    _loader(source).batch_at(0)


class _Exploding:
  """A source whose reads fail with something other than a bad image."""

  def __len__(self):
    return 3

  def __getitem__(self, i):
    raise RuntimeError("disk on fire")


def test_other_errors_are_raised_not_skipped():
  g = _grain(_Exploding())
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(g)
  g.close()
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(g)
  closed = _grain(_Exploding())
  closed.close()
  with pytest.raises(RuntimeError, match="closed"):
    next(closed)


def _config(root, **data):
  """The run config's defaults, with this test's data and batch."""
  c = common.base_config()
  c.data.update(dict(name="folder", path=root, crop_size=CROP, **data))
  c.train.update(dict(batch_size=6, seed=7))
  return c


def test_make_loader_picks_the_path(messy):
  threads = make_loader(_config(messy.root), 1, 2, start_step=3)
  grain = make_loader(
    _config(messy.root, pipeline="grain", workers=0), 1, 2, start_step=3
  )
  assert type(threads) is Loader and type(grain) is GrainLoader
  assert threads.step == grain.step == 3
  np.testing.assert_array_equal(_take(threads, 1)[0], _take(grain, 1)[0])
  assert _take(grain, 0) == [] and grain.indices == [1, 3, 5, 7]


def test_make_loader_rejects_bad_options(messy, caplog):
  with pytest.raises(ValueError, match="data.pipeline='tf'"):
    make_loader(_config(messy.root, pipeline="tf"), 0, 1)
  with pytest.raises(ValueError, match="data.workers=-1"):
    make_loader(_config(messy.root, pipeline="grain", workers=-1), 0, 1)
  with caplog.at_level(logging.WARNING):
    make_loader(_config(messy.root, workers=2), 0, 1).close()
  assert "workers=2 is ignored by the threads pipeline" in caplog.text
