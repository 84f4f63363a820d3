"""The batch loader: endless, deterministic, resumable random crops.

``Loader`` turns a source (``cdc_jax.data.sources``) into per-process
batches of uint8 crops; batch k is a pure function of (seed, process, k).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from cdc_jax.data import shard
from cdc_jax.data.screen import Screen, Skipped
from cdc_jax.data.sources import Source
from cdc_jax.imageio import ImageError

CACHE_MAX_ITEMS = shard.CACHE_MAX_ITEMS


def random_crop(
  img: np.ndarray,
  size: int,
  rng: np.random.Generator,
  name: str = "image",
) -> np.ndarray:
  """Takes a uniformly placed ``size`` x ``size`` crop (a view of ``img``).

  Args:
    img: [H, W, C] array.
    size: crop side.
    rng: source of the offsets (top in [0, H - size], left in
      [0, W - size]).
    name: file or item name for the error message.

  Raises:
    ImageError: the image is smaller than the crop on either side.
  """
  h, w = img.shape[:2]
  if h < size or w < size:
    raise ImageError(
      name,
      f"image is {w}x{h} (WxH), smaller than the {size}x{size} crop; use a "
      "smaller --config.data.crop_size or remove the file",
    )
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return img[top : top + size, left : left + size]


class _Failure:
  """Carries an exception from the prefetch thread to the consumer."""

  def __init__(self, exc: BaseException):
    self.exc = exc


class Loader(Iterator[np.ndarray]):
  """Endless stream of random-crop batches for one process.

  Yields uint8 arrays [batch_size, crop_size, crop_size, 3]: the
  per-process share of the global batch. Process ``p`` of ``n`` reads
  only source items ``i`` with ``i % n == p``; if that shard is empty
  (fewer items than processes) it reads all items, with a warning.

  Batch ``k`` is a pure function of (seed, process_index, k): its
  image indices (drawn with replacement, so there are no epochs) and
  crop offsets come from ``np.random.default_rng([seed, process_index,
  k])``. A run resumed with ``start_step=k`` therefore sees exactly the
  batches an uninterrupted run would, without replaying earlier ones.

  Unusable items are skipped (``cdc_jax.data.screen``): those that fail
  to decode (``ImageError`` from the source: empty, truncated, not an
  image, ...) and images smaller than the crop on either side (skipped,
  not padded). Each is logged once by name and a draw that hits one is
  simply redrawn. Whether an item is usable depends only on the item, so
  with bad files present batch ``k`` is still a pure function of (seed,
  process_index, k), the same in a fresh ``Loader``. Once every item of
  the shard has been checked, one summary line is logged ("skipped 3 of
  9 files: 2 unreadable, 1 smaller than the 64x64 crop"); ``skipped``
  gives the counts at any time. If no item of the shard is usable,
  ``ValueError`` is raised at the first batch, from ``next()`` or
  ``batch_at``, before any training step runs (only decoding can tell,
  and a real data set is too big to decode up front), or earlier by
  ``require_usable()``, which decodes until it finds one usable item.

  Batches are built by a daemon thread that keeps up to ``prefetch``
  ready; while the queue is full it checks the not yet drawn items in
  shard order, so the summary comes after one pass over the files even
  on a data set too big for random draws to cover. Errors in the thread
  are re-raised by ``next()``. Call ``close()`` (or use ``with``) to stop
  the thread.

  Attributes:
    step: index of the batch the next ``next()`` returns.
    indices: the source indices of this process's shard.
  """

  def __init__(
    self,
    source: Source,
    batch_size: int,
    crop_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    prefetch: int = 2,
    cache: bool | None = None,
  ):
    """Sets up the shard; the thread starts on the first ``next()``.

    Args:
      source: the images.
      batch_size: per-process batch size.
      crop_size: side of the square crops.
      seed: data seed, shared by all processes.
      process_index: this process (e.g. ``jax.process_index()``).
      process_count: number of processes.
      start_step: first batch to produce (for resuming).
      prefetch: batches to prepare ahead (at least 1).
      cache: keep decoded images in memory; default: when the source
        has at most ``CACHE_MAX_ITEMS`` items.
    """
    self.indices, where, cache = shard.open_shard(
      source, batch_size, crop_size, process_index, process_count, cache
    )
    self.source = source
    self.batch_size = batch_size
    self.crop_size = crop_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.step = start_step
    self._screen = Screen(source, self.indices, crop_size, cache, where)
    self._prefetch = max(1, prefetch)
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._failure: BaseException | None = None

  # Building batches (pure functions of the step).

  @property
  def skipped(self) -> Skipped:
    """The items of this shard skipped so far, by reason, and how many of
    the shard's items have been checked."""
    return self._screen.report()

  def survey(self) -> Skipped:
    """Checks every not yet checked item of the shard now.

    The prefetch thread does this in its idle time anyway; call it to
    know the whole picture up front (it decodes every file once).

    Raises:
      ValueError: no item of the shard is usable.
    """
    while self._screen.survey_step():
      pass
    self._screen.raise_if_none_usable()
    return self.skipped

  def require_usable(self) -> None:
    """Fails now, rather than at the first batch, if nothing is usable.

    Checks items in shard order until one is usable: one decode on a
    healthy data set, every file on one with no usable image. Call it
    before costly setup (model init, compilation) to fail fast.

    Raises:
      ValueError: no item of the shard is usable.
    """
    while not self._screen.any_usable and self._screen.survey_step():
      pass
    self._screen.raise_if_none_usable()

  def batch_at(self, step: int) -> np.ndarray:
    """Builds batch ``step`` directly (no prefetching).

    Raises:
      ValueError: no item of the shard is usable.
    """
    rng = np.random.default_rng([self.seed, self.process_index, step])
    size = self.crop_size
    batch = np.empty((self.batch_size, size, size, 3), np.uint8)
    n = len(self.indices)
    for b in range(self.batch_size):
      while True:
        # Rejection sampling over the whole shard: the draws don't depend
        # on which items are already known to be skipped, so the batch is
        # the same whatever ran before.
        i = self.indices[int(rng.integers(n))]
        img = self._screen.get(i)
        if img is not None:
          break
        self._screen.raise_if_none_usable()
      batch[b] = random_crop(img, size, rng, self.source.name(i))
    return batch

  # Prefetching.

  def _put(self, item: Any, survey: bool = True) -> bool:
    """Queues ``item`` unless stopped; returns False once stopped.

    While the queue is full and some item is unchecked, checks one item
    per try (``survey``) instead of waiting idle.
    """
    while not self._stop.is_set():
      try:
        if survey and self._screen.pending:
          self._queue.put_nowait(item)
        else:
          self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        if survey and self._screen.pending:
          self._screen.survey_step()
    return False

  def _worker(self, step: int) -> None:
    try:
      while not self._stop.is_set():
        if not self._put(self.batch_at(step)):
          return
        step += 1
    except BaseException as e:  # Handed to the consumer.
      self._put(_Failure(e), survey=False)

  def _start(self) -> None:
    self._queue = queue.Queue(maxsize=self._prefetch)
    self._thread = threading.Thread(
      target=self._worker,
      args=(self.step,),
      name="cdc_jax.data.Loader",
      daemon=True,
    )
    self._thread.start()

  def __iter__(self) -> Loader:
    return self

  def __next__(self) -> np.ndarray:
    if self._failure is not None:
      raise self._failure
    if self._stop.is_set():
      raise RuntimeError("Loader is closed")
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if isinstance(item, _Failure):
      self._failure = item.exc
      raise item.exc
    self.step += 1
    return item

  def close(self) -> None:
    """Stops the prefetch thread (no-op if never started)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5.0)

  def __enter__(self) -> Loader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
