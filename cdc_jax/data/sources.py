"""Training sources: where images come from.

A source is any object with ``__len__``, ``__getitem__(i) -> uint8
[H, W, 3]`` and ``name(i) -> str`` (a file name for messages):

* ``EmbeddedSource``: colour photos shipped inside scikit-image (no
  download), minus one held-out photo (``HELD_OUT``).
* ``ImageFolderSource``: every image under a directory tree.
* ``VimeoSeptupletSource``: the Vimeo-90k septuplet set, every frame an item.

``make_source(config.data)`` picks one; ``cdc_jax.data.loader`` turns it
into batches.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from cdc_jax.errors import UserError
from cdc_jax.imageio import load_image

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


class DataError(UserError, ValueError):
  """Training data that cannot be used: a missing folder or list, no
  usable image, an unknown source; the message names it and the fix."""


# Chosen because it is the smallest embedded photo (300x451), so the
# final reconstruction is cheap.
HELD_OUT = "chelsea"


class Source(Protocol):
  """What ``Loader`` needs from a source of images."""

  def __len__(self) -> int: ...

  def __getitem__(self, i: int) -> np.ndarray: ...

  def name(self, i: int) -> str: ...


def _walk_files(root: str) -> list[str]:
  """Non-hidden files under ``root``, relative to it, in walk order.

  Symlinked folders are followed, each real folder once (so a link loop
  or two links to one folder neither hangs nor double counts), in sorted
  order so the name a folder is reached by is the same on every machine.
  Subfolders that cannot be listed are skipped with a warning.
  """

  def key(path: str | None) -> tuple[int, int] | None:
    """Identifies a folder whatever the path (or link) it is reached by."""
    if path is None:
      return None
    try:
      st = os.stat(path)
    except OSError:
      return None
    return st.st_dev, st.st_ino

  def unlistable(e: OSError) -> None:
    if key(e.filename) == key(root):
      raise DataError(f"image folder {root!r} cannot be listed ({e.strerror})")
    logger.warning("skipping folder %s: cannot list it (%s)", e.filename, e)

  seen = {key(root)}
  rel_paths = []
  for dirpath, dirnames, filenames in os.walk(
    root, onerror=unlistable, followlinks=True
  ):
    kept = []
    for d in sorted(dirnames):
      k = key(os.path.join(dirpath, d))
      if d.startswith(".") or k is None or k in seen:
        continue
      seen.add(k)
      kept.append(d)
    dirnames[:] = kept
    rel_dir = os.path.relpath(dirpath, root)
    for f in filenames:
      if not f.startswith("."):
        rel_paths.append(f if rel_dir == "." else os.path.join(rel_dir, f))
  return rel_paths


def find_images(root: str | os.PathLike) -> list[str]:
  """Lists image files under ``root``, recursively.

  Matches the extensions in ``IMAGE_EXTENSIONS`` in any letter case.
  Hidden files and directories (name starting with '.', e.g. macOS
  '._x.png' resource forks) are skipped. Symlinked folders are followed,
  each real folder once (link loops are harmless); subfolders that cannot
  be listed are skipped with a warning naming them. Files are not opened:
  a broken link or a non-image named '.png' is listed (``Loader`` skips
  it when it fails to decode).

  Args:
    root: a directory.

  Returns:
    Paths (``root`` joined with the relative path), sorted by their
    path relative to ``root`` so the order is the same on every machine.

  Raises:
    DataError: ``root`` is not a directory or cannot be listed.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DataError(
      f"image folder {root!r} does not exist or is not a directory"
    )
  rel_paths = [
    p for p in _walk_files(root) if p.lower().endswith(IMAGE_EXTENSIONS)
  ]
  # Sort on '/'-separated components so the order doesn't depend on the
  # OS separator or on os.walk's directory order.
  rel_paths.sort(key=lambda p: p.replace(os.sep, "/").split("/"))
  return [os.path.join(root, p) for p in rel_paths]


def _describe_other_files(root: str) -> str:
  """'found 3 other files (.txt: 2, .heic: 1)' for the error message."""
  exts = collections.Counter(
    os.path.splitext(p)[1].lower() or "no extension" for p in _walk_files(root)
  )
  if not exts:
    return "found no files at all"
  n = sum(exts.values())
  top = ", ".join(f"{e}: {k}" for e, k in exts.most_common(5))
  more = ", ..." if len(exts) > 5 else ""
  return f"found {n} other file{'s' * (n != 1)} ({top}{more})"


class ImageFolderSource:
  """All images under a directory tree, decoded on demand.

  Files are not checked up front (that would mean decoding them all);
  ``Loader`` skips files that fail to decode or are smaller than the
  crop, with a warning naming each.
  """

  def __init__(self, root: str | os.PathLike):
    """Lists the images under ``root``.

    Raises:
      DataError: ``root`` is not a directory or holds no image files.
    """
    self.root = os.fspath(root)
    self.files = find_images(self.root)
    if not self.files:
      raise DataError(
        f"image folder {self.root!r} contains no images (looked for "
        f"{', '.join(IMAGE_EXTENSIONS)} in all subfolders; "
        f"{_describe_other_files(self.root)})"
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
      DataError: unknown split, or the layout above is not found.
    """
    self.root = os.fspath(root)
    self.split = split
    if split not in self._LIST_FILES:
      raise DataError(
        f"Vimeo split must be one of {sorted(self._LIST_FILES)}, got {split!r}"
      )
    layout = (
      "expected the Vimeo-90k septuplet layout: "
      f"{self._LIST_FILES[split]} and sequences/<a>/<b>/im1.png..im7.png "
      f"directly under {self.root!r}"
    )
    list_file = os.path.join(self.root, self._LIST_FILES[split])
    if not os.path.isfile(list_file):
      raise DataError(f"{list_file} not found; {layout}")
    with open(list_file) as f:
      self.sequences = [ln.strip() for ln in f if ln.strip()]
    if not self.sequences:
      raise DataError(f"{list_file} lists no sequences; {layout}")
    # Checking every frame would mean ~450k stats on the full set; one
    # is enough to catch a wrong root.
    first = self._frame_path(0, 1)
    if not os.path.isfile(first):
      raise DataError(f"{first} not found; {layout}")

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
      DataError: ``exclude`` names an unknown photo, or excludes all.
    """
    images = embedded_images()
    known = [n for n, _ in images]
    unknown = sorted(set(exclude) - set(known))
    if unknown:
      raise DataError(f"unknown embedded images {unknown}; known: {known}")
    self.exclude = tuple(exclude)
    self.images = [(n, a) for n, a in images if n not in self.exclude]
    if not self.images:
      raise DataError("all embedded images are excluded")

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
      .ConfigDict``) with ``name`` in {'embedded', 'folder', 'vimeo',
      'tfds:<builder>'}, ``path`` (needed by 'folder' and 'vimeo'; the
      TFDS data_dir, empty for TFDS's default), optionally ``split``
      ('train' or 'test' for Vimeo; any TFDS split) and ``image_key``
      (TFDS only, default 'image').

  Raises:
    DataError: unknown name, missing path, or a TFDS dataset that cannot
      be read (``tfds_source.TFDSError``).
  """
  name = getattr(config_data, "name", "embedded")
  path = getattr(config_data, "path", "") or ""
  if name == "embedded":
    return EmbeddedSource()
  if name.startswith("tfds:"):
    from cdc_jax.data.tfds_source import TFDSSource

    return TFDSSource(
      name.removeprefix("tfds:"),
      getattr(config_data, "split", "train"),
      path,
      getattr(config_data, "image_key", "image"),
    )
  if name in ("folder", "vimeo") and not path:
    example = (
      "/path/to/vimeo_septuplet" if name == "vimeo" else "/path/to/images"
    )
    raise DataError(
      f"data source {name!r} needs a path, e.g. --config.data.path={example}"
    )
  if name == "folder":
    return ImageFolderSource(path)
  if name == "vimeo":
    return VimeoSeptupletSource(path, getattr(config_data, "split", "train"))
  raise DataError(
    f"unknown data source {name!r}; expected one of embedded, folder, "
    "vimeo, tfds:<builder>"
  )
