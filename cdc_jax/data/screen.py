"""Which items of a training source are usable, and why the others are not.

An item is skipped for one of two reasons: it does not decode (the source
raises ``ImageError``: missing, empty, not an image, truncated, corrupt)
or it is smaller than the crop on either side. Such images are skipped,
not padded or upscaled: padding would teach the model borders and
upscaling blur that real photos don't have.

``Screen`` decides once per item and remembers the verdict (and, for small
sources, the pixels), warns once per skipped item by name, and logs a
one-line summary once every item of the shard has been checked.
``Skipped`` is the public record of the verdicts (``Loader.skipped``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from cdc_jax.data.sources import DataError
from cdc_jax.imageio import ImageError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Skipped:
  """The items skipped so far, and how far the check has got.

  ``str()`` gives the summary line, e.g. "skipped 3 of 9 files: 2
  unreadable, 1 smaller than the 64x64 crop" (or "all 9 files usable
  with the 64x64 crop").

  Attributes:
    unreadable: item name -> problem, for items that failed to decode.
    too_small: item name -> (width, height), for images smaller than the
      crop on either side.
    checked: items whose verdict is known (usable or skipped).
    total: items in the shard.
    crop_size: the crop side images were checked against.
  """

  unreadable: Mapping[str, str]
  too_small: Mapping[str, tuple[int, int]]
  checked: int
  total: int
  crop_size: int

  @property
  def count(self) -> int:
    """Number of items skipped (so far)."""
    return len(self.unreadable) + len(self.too_small)

  @property
  def complete(self) -> bool:
    """Whether every item of the shard has been checked."""
    return self.checked == self.total

  def __str__(self) -> str:
    c = self.crop_size
    if self.complete and not self.count:
      return f"all {self.total} files usable with the {c}x{c} crop"
    line = (
      f"skipped {self.count} of {self.total} files: "
      f"{len(self.unreadable)} unreadable, {len(self.too_small)} smaller "
      f"than the {c}x{c} crop"
    )
    if not self.complete:
      line += f" ({self.checked} of {self.total} checked so far)"
    return line


class Screen:
  """Thread-safe, once-per-item verdicts on the items of one shard.

  A verdict depends only on the item itself, never on the order in which
  items were checked, so whatever draws from a ``Screen`` sees the same
  usable set whatever ran before (a file is assumed not to change during
  a run).
  """

  def __init__(
    self,
    source,
    indices: Sequence[int],
    crop_size: int,
    cache: bool,
    where: str,
  ):
    """Starts with no verdicts.

    Args:
      source: the images (``cdc_jax.data.sources.Source``).
      indices: the shard: source indices this screen covers.
      crop_size: images smaller than this on either side are skipped.
      cache: keep the pixels of usable items in memory.
      where: the shard as messages name it (e.g. the source's repr).
    """
    self.source = source
    self.indices = list(indices)
    self.crop_size = crop_size
    self.where = where
    self._cache: dict[int, np.ndarray] | None = {} if cache else None
    self._usable: set[int] = set()
    self._unreadable: dict[int, str] = {}
    self._too_small: dict[int, tuple[int, int]] = {}
    self._lock = threading.Lock()
    self._survey_pos = 0  # position in indices of the next item to survey

  def _skipped(self, i: int) -> bool:
    return i in self._unreadable or i in self._too_small

  def _checked(self) -> int:
    return len(self._usable) + len(self._unreadable) + len(self._too_small)

  def get(self, i: int) -> np.ndarray | None:
    """Item ``i``'s pixels, or None if it is skipped (decided once).

    Raises:
      Whatever the source raises other than ``ImageError``.
    """
    with self._lock:
      if self._skipped(i):
        return None
      if self._cache is not None and i in self._cache:
        return self._cache[i]
    try:
      img = self.source[i]
    except ImageError as e:
      self._record(i, problem=e.problem)
      return None
    h, w = img.shape[:2]
    if h < self.crop_size or w < self.crop_size:
      self._record(i, size=(w, h))
      return None
    self._record(i, img=img)
    return img

  def _record(self, i, img=None, problem=None, size=None) -> None:
    """Stores the verdict on ``i``; warns and summarises outside the lock."""
    with self._lock:
      if i in self._usable or self._skipped(i):
        return  # another thread got there first (and warned)
      if problem is not None:
        self._unreadable[i] = problem
      elif size is not None:
        self._too_small[i] = size
      else:
        self._usable.add(i)
        if self._cache is not None:
          self._cache[i] = img
      finished = self._checked() == len(self.indices)
    c = self.crop_size
    if problem is not None:
      logger.warning("skipping %s: %s", self.source.name(i), problem)
    elif size is not None:
      logger.warning(
        "skipping %s: image is %dx%d (WxH), smaller than the %dx%d crop",
        self.source.name(i),
        *size,
        c,
        c,
      )
    if finished:  # exactly one call sees the last verdict land
      report = self.report()
      level = logging.WARNING if report.count else logging.INFO
      logger.log(level, "%s: %s", self.where, report)

  @property
  def pending(self) -> bool:
    """Whether some item of the shard has no verdict yet."""
    with self._lock:
      return self._checked() < len(self.indices)

  @property
  def any_usable(self) -> bool:
    """Whether some item is known to be usable."""
    with self._lock:
      return bool(self._usable)

  def survey_step(self) -> bool:
    """Checks the next unchecked item in shard order; False if none."""
    with self._lock:
      n = len(self.indices)
      while self._survey_pos < n:
        i = self.indices[self._survey_pos]
        if i not in self._usable and not self._skipped(i):
          break
        self._survey_pos += 1
      else:
        return False
    self.get(i)
    return True

  def report(self) -> Skipped:
    """A snapshot of the verdicts so far."""
    name = self.source.name
    with self._lock:
      return Skipped(
        unreadable={name(i): p for i, p in self._unreadable.items()},
        too_small={name(i): s for i, s in self._too_small.items()},
        checked=self._checked(),
        total=len(self.indices),
        crop_size=self.crop_size,
      )

  def raise_if_none_usable(self) -> None:
    """Raises once every item is known to be skipped.

    Raises:
      DataError: naming the shard, the counts by reason and, if some
        images were too small, the largest crop they all fit.
    """
    with self._lock:
      if self._usable or self._checked() < len(self.indices):
        return
      sizes = list(self._too_small.values())
    c = self.crop_size
    msg = (
      f"no usable images in {self.where}: all {len(self.indices)} files "
      f"were skipped ({len(self.indices) - len(sizes)} unreadable, "
      f"{len(sizes)} smaller than the {c}x{c} crop); see the warnings above"
    )
    if sizes:
      w, h = max(sizes, key=min)
      msg += (
        f". The largest of the small ones is {w}x{h}: use bigger images, "
        f"or a --config.data.crop_size of at most {min(w, h)} that is a "
        "multiple of the model's downsampling factor"
      )
    raise DataError(msg)
