"""Image loading, training sources and the batch loader.

Training reads random square crops of RGB images as uint8 arrays; the
trainer converts them to [-1, 1]. Three sources are supported:

* ``embedded``: colour photos shipped inside scikit-image (no download),
  minus one held-out photo (``HELD_OUT``) for a final reconstruction.
* ``folder``: every image under a directory tree.
* ``vimeo``: the Vimeo-90k septuplet set, every frame an item.

A source is any object with ``__len__``, ``__getitem__(i) -> uint8
[H, W, 3]`` and ``name(i) -> str`` (a file name for messages).
``Loader`` turns a source into an endless stream of per-process batches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
  ".png",
  ".jpg",
  ".jpeg",
  ".bmp",
  ".webp",
  ".tif",
  ".tiff",
)

# Chosen because it is the smallest embedded photo (300x451), so the
# final reconstruction is cheap.
HELD_OUT = "chelsea"

# Sources with at most this many items are decoded once and kept in
# memory by ``Loader``.
CACHE_MAX_ITEMS = 64


class ImageError(ValueError):
  """An image file is missing, unreadable or unusable.

  Attributes:
    path: the offending file (or source item name).
  """

  def __init__(self, path: str, problem: str):
    self.path = str(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}")


class Source(Protocol):
  """What ``Loader`` needs from a source of images."""

  def __len__(self) -> int: ...

  def __getitem__(self, i: int) -> np.ndarray: ...

  def name(self, i: int) -> str: ...


# ---------------------------------------------------------------------------
# Decoding.


def _to_uint8_gray(a: np.ndarray, mode: str) -> np.ndarray:
  """Maps a single-channel array of a wide Pillow mode to uint8."""
  if mode.startswith("I;16"):
    # Full 16-bit range: 65535 -> 255. 257 = 65535 / 255; rounding
    # gives the nearest 8-bit level, where >> 8 would truncate.
    return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
  if mode == "I":
    # 32-bit integer images have no declared range. Values within
    # [0, 255] are taken as 8-bit; anything larger as 16-bit data (how
    # most such files arise), clipped to [0, 65535].
    a = a.astype(np.float64)
    if a.size and a.max() > 255:
      a = np.clip(a, 0, 65535) / 257.0
    return np.round(np.clip(a, 0, 255)).astype(np.uint8)
  if mode == "F":
    # Float images: [0, 1] data is scaled by 255, anything else is
    # taken to be on the [0, 255] scale already.
    a = np.nan_to_num(a.astype(np.float64))
    if a.size and a.min() >= 0.0 and a.max() <= 1.0:
      a = a * 255.0
    return np.round(np.clip(a, 0, 255)).astype(np.uint8)
  raise AssertionError(f"unexpected mode {mode}")


def _to_rgb(img: Image.Image) -> np.ndarray:
  """Converts a decoded Pillow image of any supported mode to uint8 RGB."""
  mode = img.mode
  if mode == "RGB":
    rgb = np.asarray(img, dtype=np.uint8)
  elif mode.startswith("I;16") or mode in ("I", "F"):
    gray = _to_uint8_gray(np.asarray(img), mode)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
  elif mode in ("L", "LA", "1"):
    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
  elif mode in ("P", "PA"):
    # Going through RGBA keeps Pillow quiet about palette transparency;
    # the alpha is dropped below like any other.
    rgb = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., :3]
  elif mode in ("RGBA", "RGBa", "RGBX"):
    rgb = np.asarray(img, dtype=np.uint8)[..., :3]
  else:
    # CMYK, YCbCr, LAB, HSV, ...
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
  return np.ascontiguousarray(rgb)


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file into uint8 RGB.

  The EXIF orientation tag is applied. Grayscale (1, L, I;16, I, F),
  palette, CMYK and other modes are converted to RGB; 16-bit data is
  rescaled (65535 -> 255), not clipped. Alpha channels are dropped, not
  composited: the colour values are kept as stored.

  Args:
    path: the image file.

  Returns:
    A uint8 array of shape [H, W, 3].

  Raises:
    ImageError: the file is missing, empty, not an image, truncated or
      corrupt, or decodes to a zero-size image. The message names the
      file and the problem.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ImageError(path, "file not found")
  if not os.path.isfile(path):
    raise ImageError(path, "not a regular file")
  if os.path.getsize(path) == 0:
    raise ImageError(path, "file is empty (0 bytes)")
  try:
    with Image.open(path) as img:
      img.load()
      try:
        img = ImageOps.exif_transpose(img)
      except Exception as e:
        # A malformed EXIF block shouldn't cost the pixels.
        logger.debug("%s: ignoring EXIF orientation (%s)", path, e)
      if img.width == 0 or img.height == 0:
        raise ImageError(path, f"zero-size image ({img.width}x{img.height})")
      rgb = _to_rgb(img)
  except ImageError:
    raise
  except Image.UnidentifiedImageError as e:
    raise ImageError(path, "not a recognised image format") from e
  except Exception as e:
    # Corrupt data surfaces from Pillow's decoders as OSError,
    # SyntaxError, ValueError, struct.error, ... depending on the format.
    raise ImageError(path, f"cannot decode image ({e})") from e
  return rgb


def find_images(root: str | os.PathLike) -> list[str]:
  """Lists image files under ``root``, recursively.

  Matches the extensions in ``IMAGE_EXTENSIONS`` in any letter case.
  Hidden files and directories (name starting with '.', e.g. macOS
  '._x.png' resource forks) are skipped.

  Args:
    root: a directory.

  Returns:
    Paths (``root`` joined with the relative path), sorted by their
    path relative to ``root`` so the order is the same on every machine.

  Raises:
    ValueError: ``root`` is not a directory.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise ValueError(
      f"image folder {root!r} does not exist or is not a directory"
    )
  rel_paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    rel_dir = os.path.relpath(dirpath, root)
    for f in filenames:
      if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS):
        continue
      rel = f if rel_dir == "." else os.path.join(rel_dir, f)
      rel_paths.append(rel)
  # Sort on '/'-separated components so the order doesn't depend on the
  # OS separator or on os.walk's directory order.
  rel_paths.sort(key=lambda p: p.replace(os.sep, "/").split("/"))
  return [os.path.join(root, p) for p in rel_paths]


# ---------------------------------------------------------------------------
# Sources.


class ImageFolderSource:
  """All images under a directory tree, decoded on demand.

  Files are not checked up front (that would mean decoding them all);
  ``Loader`` skips files that fail to decode, with a warning.
  """

  def __init__(self, root: str | os.PathLike):
    """Lists the images under ``root``.

    Raises:
      ValueError: ``root`` is not a directory or holds no image files.
    """
    self.root = os.fspath(root)
    self.files = find_images(self.root)
    if not self.files:
      raise ValueError(
        f"image folder {self.root!r} contains no images (looked for "
        f"{', '.join(IMAGE_EXTENSIONS)} in all subfolders)"
      )

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> np.ndarray:
    return load_image(self.files[i])

  def name(self, i: int) -> str:
    return self.files[i]

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.root!r})"


class VimeoSeptupletSource:
  """Frames of the Vimeo-90k septuplet data set.

  Expected layout::

    root/sep_trainlist.txt      (split='train')
    root/sep_testlist.txt       (split='test')
    root/sequences/00001/0001/im1.png ... im7.png

  Each list line names one septuplet ('00001/0001'). Every frame is an
  item: item ``i`` is frame ``i % 7 + 1`` of septuplet ``i // 7``, so a
  uniformly random item is a random frame of a random septuplet.
  """

  FRAMES = 7
  _LIST_FILES = {"train": "sep_trainlist.txt", "test": "sep_testlist.txt"}

  def __init__(self, root: str | os.PathLike, split: str = "train"):
    """Reads the septuplet list of ``split``.

    Raises:
      ValueError: unknown split, or the layout above is not found.
    """
    self.root = os.fspath(root)
    self.split = split
    if split not in self._LIST_FILES:
      raise ValueError(
        f"Vimeo split must be one of {sorted(self._LIST_FILES)}, got {split!r}"
      )
    layout = (
      "expected the Vimeo-90k septuplet layout: "
      f"{self._LIST_FILES[split]} and sequences/<a>/<b>/im1.png..im7.png "
      f"directly under {self.root!r}"
    )
    list_file = os.path.join(self.root, self._LIST_FILES[split])
    if not os.path.isfile(list_file):
      raise ValueError(f"{list_file} not found; {layout}")
    with open(list_file) as f:
      self.sequences = [ln.strip() for ln in f if ln.strip()]
    if not self.sequences:
      raise ValueError(f"{list_file} lists no sequences; {layout}")
    # Checking every frame would mean ~450k stats on the full set; one
    # is enough to catch a wrong root.
    first = self._frame_path(0, 1)
    if not os.path.isfile(first):
      raise ValueError(f"{first} not found; {layout}")

  def _frame_path(self, seq: int, frame: int) -> str:
    return os.path.join(
      self.root, "sequences", *self.sequences[seq].split("/"), f"im{frame}.png"
    )

  def __len__(self) -> int:
    return len(self.sequences) * self.FRAMES

  def __getitem__(self, i: int) -> np.ndarray:
    return load_image(self.name(i))

  def name(self, i: int) -> str:
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self._frame_path(i // self.FRAMES, i % self.FRAMES + 1)

  def __repr__(self) -> str:
    return f"VimeoSeptupletSource({self.root!r}, split={self.split!r})"


def embedded_images() -> list[tuple[str, np.ndarray]]:
  """The colour photos shipped inside scikit-image, as (name, uint8 RGB).

  Names: astronaut, chelsea, coffee, motorcycle_left, motorcycle_right.
  All are stored as PNG in the scikit-image wheel; nothing is downloaded.
  """
  # Imported here: scikit-image is slow to import and only this needs it.
  import skimage.data

  left, right, _ = skimage.data.stereo_motorcycle()
  images = [
    ("astronaut", skimage.data.astronaut()),
    ("chelsea", skimage.data.chelsea()),
    ("coffee", skimage.data.coffee()),
    ("motorcycle_left", left),
    ("motorcycle_right", right),
  ]
  return [(n, np.ascontiguousarray(a, dtype=np.uint8)) for n, a in images]


class EmbeddedSource:
  """The embedded scikit-image photos, minus ``exclude``.

  By default the held-out photo ``HELD_OUT`` is excluded so it can be
  used to test reconstruction after training.
  """

  def __init__(self, exclude: Sequence[str] = (HELD_OUT,)):
    """Loads the photos (all in memory; a few MB).

    Raises:
      ValueError: ``exclude`` names an unknown photo, or excludes all.
    """
    images = embedded_images()
    known = [n for n, _ in images]
    unknown = sorted(set(exclude) - set(known))
    if unknown:
      raise ValueError(f"unknown embedded images {unknown}; known: {known}")
    self.exclude = tuple(exclude)
    self.images = [(n, a) for n, a in images if n not in self.exclude]
    if not self.images:
      raise ValueError("all embedded images are excluded")

  @property
  def names(self) -> list[str]:
    return [n for n, _ in self.images]

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> np.ndarray:
    return self.images[i][1]

  def name(self, i: int) -> str:
    return f"embedded:{self.images[i][0]}"

  def __repr__(self) -> str:
    return f"EmbeddedSource(exclude={self.exclude!r})"


def make_source(config_data: Any) -> Source:
  """Builds the source described by a data config.

  Args:
    config_data: attribute-access config (e.g. ``ml_collections
      .ConfigDict``) with ``name`` in {'embedded', 'folder', 'vimeo'},
      ``path`` (needed by 'folder' and 'vimeo') and optionally ``split``
      ('train' or 'test', Vimeo only).

  Raises:
    ValueError: unknown name or missing path.
  """
  name = getattr(config_data, "name", "embedded")
  path = getattr(config_data, "path", "") or ""
  if name == "embedded":
    return EmbeddedSource()
  if name in ("folder", "vimeo") and not path:
    example = (
      "/path/to/vimeo_septuplet" if name == "vimeo" else "/path/to/images"
    )
    raise ValueError(
      f"data source {name!r} needs a path, e.g. --config.data.path={example}"
    )
  if name == "folder":
    return ImageFolderSource(path)
  if name == "vimeo":
    return VimeoSeptupletSource(path, getattr(config_data, "split", "train"))
  raise ValueError(
    f"unknown data source {name!r}; expected one of embedded, folder, vimeo"
  )


# ---------------------------------------------------------------------------
# Cropping and batching.


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
