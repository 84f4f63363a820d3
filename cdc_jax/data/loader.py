"""The batch loader: endless, deterministic, resumable random crops.

``Loader`` turns a source (``cdc_jax.data.sources``) into per-process
batches of uint8 crops; batch k is a pure function of (seed, process, k).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from cdc_jax.data.sources import Source
from cdc_jax.imageio import ImageError

logger = logging.getLogger(__name__)

# Sources with at most this many items are decoded once and kept in
# memory by ``Loader``.
CACHE_MAX_ITEMS = 64


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

  Items that fail to decode (``ImageError`` from the source) are logged
  once by name and replaced by another random draw; if every item of
  the shard fails, ``ValueError`` is raised. An image smaller than the
  crop raises ``ImageError``. Batches are built by a daemon thread that
  keeps up to ``prefetch`` ready; errors there are re-raised by
  ``next()``. Call ``close()`` (or use ``with``) to stop the thread.

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
    if batch_size < 1 or crop_size < 1:
      raise ValueError(
        f"batch_size and crop_size must be positive, got {batch_size} and "
        f"{crop_size}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(
        f"process_index {process_index} not in [0, {process_count})"
      )
    if len(source) == 0:
      raise ValueError(f"{source!r} is empty")
    self.source = source
    self.batch_size = batch_size
    self.crop_size = crop_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.step = start_step
    self.indices = list(range(process_index, len(source), process_count))
    if not self.indices:
      logger.warning(
        "%r has %d items, fewer than the %d processes; process %d reads "
        "all of them.",
        source,
        len(source),
        process_count,
        process_index,
      )
      self.indices = list(range(len(source)))
    if cache is None:
      cache = len(source) <= CACHE_MAX_ITEMS
    self._cache: dict[int, np.ndarray] | None = {} if cache else None
    self._bad: set[int] = set()
    self._lock = threading.Lock()
    self._prefetch = max(1, prefetch)
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._failure: BaseException | None = None

  # Building batches (pure functions of the step, bar the cache).

  def _load(self, i: int) -> np.ndarray | None:
    """Decodes item ``i``, or returns None (warning once) if it fails."""
    with self._lock:
      if i in self._bad:
        return None
      if self._cache is not None and i in self._cache:
        return self._cache[i]
    try:
      img = self.source[i]
    except ImageError as e:
      with self._lock:
        if i not in self._bad:
          self._bad.add(i)
          logger.warning("Skipping unreadable image %s", e)
      return None
    if self._cache is not None:
      with self._lock:
        self._cache[i] = img
    return img

  def batch_at(self, step: int) -> np.ndarray:
    """Builds batch ``step`` directly (no prefetching)."""
    rng = np.random.default_rng([self.seed, self.process_index, step])
    size = self.crop_size
    batch = np.empty((self.batch_size, size, size, 3), np.uint8)
    n = len(self.indices)
    for b in range(self.batch_size):
      while True:
        # Rejection sampling over the whole shard: the draws don't depend
        # on which files are already known to be bad, so the batch is
        # the same whatever ran before.
        i = self.indices[int(rng.integers(n))]
        img = self._load(i)
        if img is not None:
          break
        with self._lock:
          if all(j in self._bad for j in self.indices):
            raise ValueError(
              f"no readable images in {self.source!r} (process "
              f"{self.process_index} of {self.process_count}, "
              f"{n} files tried); see the warnings above"
            )
      batch[b] = random_crop(img, size, rng, self.source.name(i))
    return batch

  # Prefetching.

  def _put(self, item: Any) -> bool:
    """Queues ``item`` unless stopped; returns False once stopped."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _worker(self, step: int) -> None:
    try:
      while not self._stop.is_set():
        if not self._put(self.batch_at(step)):
          return
        step += 1
    except BaseException as e:  # Handed to the consumer.
      self._put(_Failure(e))

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
