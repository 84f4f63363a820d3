"""The grain data path: ``Loader``'s batches, built by grain worker processes.

``GrainLoader`` is a drop-in for ``cdc_jax.data.loader.Loader``: batch k
is the array ``Loader.batch_at(k)`` builds from the same source, seed and
process, so a run can switch paths, or resume on the other one, and train
on the same data. Only who builds the batches differs::

  MapDataset.range(start, end)      # step numbers k, k+1, ...
    .map(_BatchMaker)               # k -> (batch k, new file verdicts)
    .to_iter_dataset(ReadOptions)   # one prefetch thread per process
    .mp_prefetch(num_workers=W)     # W spawned processes, round robin

A grain element is a whole batch, not an image: a batch's image indices
and crop offsets come from one generator seeded by (seed, process, k)
whose later draws depend on which earlier ones hit unusable files, so its
images cannot be built independently without changing the batches.
Workers split the steps instead (worker w builds k = start + w, start + w
+ W, ...) and grain hands them back in step order, so the batches do not
depend on W. Resuming at step k starts the range at k: nothing else is
needed (no grain iterator state), as the trainer keeps only the step.

Sharding is ``Loader``'s: process p of n reads the source items i with
i % n == p (all items, with a warning, if that leaves none). Grain's
``ShardByJaxProcess`` is not used: it shards grain's record index, which
here is the step, and every process needs every step.

Unusable items (``cdc_jax.data.screen``: not decodable, or smaller than
the crop) are skipped the same way. Each worker keeps its own verdicts and
every batch carries the verdicts its worker made for it; the main process
replays them into a ``Screen``, which warns once per file and logs the
summary with ``Loader``'s messages. A file is decoded once per worker
before that worker knows its verdict. Unlike ``Loader`` there is no idle
survey: the summary comes once random draws (or ``survey()``) have
checked every item.

Worker processes are spawned: the source must be picklable (the sources
of ``cdc_jax.data.sources`` and grain/TFDS array-record sources are).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import grain
import numpy as np
from absl import flags

from cdc_jax.data import shard
from cdc_jax.data.loader import random_crop
from cdc_jax.data.screen import Screen, Skipped
from cdc_jax.data.sources import Source
from cdc_jax.imageio import ImageError

# Last step number of the (endless in practice) step range.
_END = 2**62


class Verdict(NamedTuple):
  """What one decode of a source item showed.

  Attributes:
    index: the source item.
    problem: why it does not decode (``ImageError.problem``), else None.
    size: (width, height) of a decoded image, else None.
  """

  index: int
  problem: str | None
  size: tuple[int, int] | None


def _item_name(source, i: int) -> str:
  """The source's name for item i (sources without ``name``: 'item i')."""
  name = getattr(source, "name", None)
  return name(i) if name is not None else f"item {i}"


class _BatchMaker:
  """step -> (batch, verdicts): ``Loader.batch_at`` in any process.

  Picklable (grain sends it to its worker processes). Remembers its own
  verdicts, and with ``cache`` the pixels of usable items, so a known bad
  file is not decoded again in this process.
  """

  def __init__(
    self, source, indices, batch_size, crop_size, seed, process, cache
  ):
    self.source = source
    self.indices = list(indices)
    self.batch_size = batch_size
    self.crop_size = crop_size
    self.seed = seed
    self.process = process
    self._pixels: dict[int, np.ndarray] | None = {} if cache else None
    self._verdicts: dict[int, Verdict] = {}
    self._usable = 0

  def _ok(self, v: Verdict) -> bool:
    return v.problem is None and min(v.size) >= self.crop_size

  def _get(self, i: int, new: list[Verdict]) -> np.ndarray | None:
    """Item i's pixels, None if unusable; appends a first verdict."""
    known = self._verdicts.get(i)
    if known is not None and not self._ok(known):
      return None
    if self._pixels is not None and i in self._pixels:
      return self._pixels[i]
    try:
      img = self.source[i]
      v = Verdict(i, None, (img.shape[1], img.shape[0]))
    except ImageError as e:
      img, v = None, Verdict(i, e.problem, None)
    if known is None:
      self._verdicts[i] = v
      self._usable += self._ok(v)
      new.append(v)
    if not self._ok(v):
      return None
    if self._pixels is not None:
      self._pixels[i] = img
    return img

  def __call__(self, step: int) -> tuple[np.ndarray, tuple[Verdict, ...]]:
    """Batch ``step`` and the verdicts first made while building it.

    If every item of the shard is unusable, returns an empty batch and
    all verdicts (the main process raises, with ``Screen``'s message).
    """
    # The same draws, in the same order, as Loader.batch_at.
    rng = np.random.default_rng([self.seed, self.process, step])
    size, n = self.crop_size, len(self.indices)
    batch = np.empty((self.batch_size, size, size, 3), np.uint8)
    new: list[Verdict] = []
    for b in range(self.batch_size):
      while True:
        i = self.indices[int(rng.integers(n))]
        img = self._get(i, new)
        if img is not None:
          break
        if len(self._verdicts) == n and not self._usable:
          return batch[:0], tuple(self._verdicts.values())
      batch[b] = random_crop(img, size, rng, _item_name(self.source, i))
    return batch, tuple(new)


class _Replay:
  """The source as the main process's ``Screen`` sees it: verdicts that
  workers reported are replayed (no decode), other items are read."""

  def __init__(self, source):
    self.source = source
    self.verdicts: dict[int, Verdict] = {}

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> np.ndarray:
    v = self.verdicts.get(i)
    if v is None:
      return self.source[i]
    if v.problem is not None:
      raise ImageError(self.name(i), v.problem)
    w, h = v.size
    return np.broadcast_to(np.zeros((), np.uint8), (h, w, 3))  # no memory

  def name(self, i: int) -> str:
    return _item_name(self.source, i)


def _allow_workers() -> None:
  """Grain's worker processes read absl flags; outside an absl app (tests,
  notebooks) mark the defaults as parsed so they can."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class GrainLoader(Iterator[np.ndarray]):
  """``Loader``'s batches from a grain pipeline (see the module doc).

  Yields uint8 arrays [batch_size, crop_size, crop_size, 3], batch k equal
  to ``Loader(...).batch_at(k)`` with the same arguments. Same interface
  as ``Loader``: ``next()``, ``step`` (settable before the first batch or
  between batches, to resume), ``skipped``, ``survey()``,
  ``require_usable()``, ``batch_at(k)``, ``close()`` and ``with``.
  Errors in the workers (other than unusable files, which are skipped) are
  re-raised by ``next()``, as is ``ValueError`` when no item of the shard
  is usable.

  Attributes:
    indices: the source indices of this process's shard.
    worker_count: grain worker processes; 0 builds batches in a thread of
      this process.
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
    worker_count: int = 0,
    prefetch: int = 2,
    cache: bool | None = None,
  ):
    """Sets up the shard; the pipeline starts on the first ``next()``.

    Args: as ``Loader``'s, plus
      worker_count: grain worker processes (0: none, a thread here).
      prefetch: batches each worker (or the thread) prepares ahead.
    """
    if worker_count < 0:
      raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    self.indices, where, cache = shard.open_shard(
      source, batch_size, crop_size, process_index, process_count, cache
    )
    self.source = source
    args = (source, self.indices, batch_size, crop_size, seed, process_index)
    self._args = (*args, cache)
    self._maker = _BatchMaker(*self._args)  # batch_at, in this thread
    self._replay = _Replay(source)
    self._screen = Screen(self._replay, self.indices, crop_size, False, where)
    self.worker_count = worker_count
    self._prefetch = max(1, prefetch)
    self._step = start_step
    self._it = None
    self._closed = False
    self._failure: BaseException | None = None

  @property
  def step(self) -> int:
    """Index of the batch the next ``next()`` returns."""
    return self._step

  @step.setter
  def step(self, step: int) -> None:
    if step != self._step:
      self._stop_pipeline()  # restarted at the new step by next()
    self._step = step

  @property
  def skipped(self) -> Skipped:
    """The items of this shard skipped so far (as ``Loader.skipped``);
    the workers' verdicts count once their batches are taken."""
    return self._screen.report()

  def survey(self) -> Skipped:
    """Checks every not yet checked item of the shard now, here.

    Raises:
      ValueError: no item of the shard is usable.
    """
    while self._screen.survey_step():
      pass
    self._screen.raise_if_none_usable()
    return self.skipped

  def require_usable(self) -> None:
    """Fails now if nothing is usable (as ``Loader.require_usable``).

    Raises:
      ValueError: no item of the shard is usable.
    """
    while not self._screen.any_usable and self._screen.survey_step():
      pass
    self._screen.raise_if_none_usable()

  def _take(self, record) -> np.ndarray:
    """Notes a record's verdicts; its batch, as a plain array."""
    batch, verdicts = record
    for v in verdicts:
      if v.index not in self._replay.verdicts:
        self._replay.verdicts[v.index] = v
        self._screen.get(v.index)  # warns, counts, summarises
    if not len(batch):
      self._screen.raise_if_none_usable()
      raise RuntimeError("a worker found no usable item; the screen disagrees")
    # Worker batches arrive in grain's shared memory: copy them out so the
    # block is freed now, not when the trainer drops the array.
    return batch if type(batch) is np.ndarray else np.array(batch)

  def batch_at(self, step: int) -> np.ndarray:
    """Builds batch ``step`` here, directly (no grain, no prefetching).

    Raises:
      ValueError: no item of the shard is usable.
    """
    return self._take(self._maker(step))

  def _start(self) -> None:
    if self.worker_count:
      _allow_workers()
    ds = grain.MapDataset.range(self._step, _END).map(_BatchMaker(*self._args))
    ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=self._prefetch)
    )
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=self.worker_count, per_worker_buffer_size=self._prefetch
      )
    )
    self._it = iter(ds)

  def _stop_pipeline(self) -> None:
    it, self._it = self._it, None
    if it is not None:
      it.close()

  def __iter__(self) -> GrainLoader:
    return self

  def __next__(self) -> np.ndarray:
    if self._failure is not None:
      raise self._failure
    if self._closed:
      raise RuntimeError("GrainLoader is closed")
    if self._it is None:
      self._start()
    try:
      batch = self._take(next(self._it))
    except Exception as e:
      self._failure = e
      self._stop_pipeline()
      raise
    self._step += 1
    return batch

  def close(self) -> None:
    """Stops the pipeline and its worker processes (no-op if not started)."""
    self._closed = True
    self._stop_pipeline()

  def __enter__(self) -> GrainLoader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
