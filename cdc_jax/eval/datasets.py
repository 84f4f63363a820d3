"""Evaluation sets from local folders, with the paper's preprocessing.

Each set is a folder of images the user has (nothing is downloaded) and a
named preprocessing step:

========  =========================================================
kodak     24 images 768x512 or 512x768, used as they are
tecnick   resized to 512x512 (the originals are 600x600)
div2k     shorter side resized to 768, centre crop 768x768
coco      only images whose sides both exceed 512, resized to 384x384
clic      used as they are (CLIC2020 professional/mobile)
folder    any images, used as they are
========  =========================================================

Resizing is Pillow's Lanczos filter on uint8 RGB (antialiased when
shrinking). Images are read with ``cdc_jax.imageio.load_image`` (any mode
-> uint8 RGB) in sorted file-name order.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from cdc_jax.data.sources import (
  HELD_OUT,
  ImageFolderSource,
  embedded_images,
  find_images,
)
from cdc_jax.errors import SettingError, UserError
from cdc_jax.imageio import load_image


class DatasetError(UserError, ValueError):
  """A dataset folder that is missing or does not hold the expected set."""


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [height, width, 3] with Lanczos."""
  if img.shape[:2] == (height, width):
    return img
  out = Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS)
  return np.asarray(out)


def center_crop(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """The central ``height`` x ``width`` window of ``img``."""
  h, w = img.shape[:2]
  if h < height or w < width:
    raise ValueError(f"cannot crop {width}x{height} from {w}x{h}")
  top, left = (h - height) // 2, (w - width) // 2
  return img[top : top + height, left : left + width]


def shorter_side_then_center_crop(img: np.ndarray, side: int) -> np.ndarray:
  """Resizes so the shorter side is ``side`` (aspect kept, the longer side
  rounded), then crops the central ``side`` x ``side`` square (DIV2K)."""
  h, w = img.shape[:2]
  scale = side / min(h, w)
  nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
  return center_crop(resize(img, nh, nw), side, side)


def identity(img: np.ndarray) -> np.ndarray:
  return img


def larger_than(side: int) -> Callable[[np.ndarray], bool]:
  """A filter: both sides strictly larger than ``side`` (COCO's > 512)."""

  def keep(img: np.ndarray) -> bool:
    return min(img.shape[:2]) > side

  return keep


def _always(img: np.ndarray) -> bool:
  return True


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A named evaluation set: which images to keep and how to prepare them."""

  name: str
  description: str
  preprocess: Callable[[np.ndarray], np.ndarray] = identity
  keep: Callable[[np.ndarray], bool] = _always
  expected: int | None = None  # number of images of the full set


DATASETS = {
  d.name: d
  for d in (
    Dataset("kodak", "Kodak PhotoCD, 24 images 768x512", expected=24),
    Dataset(
      "tecnick",
      "Tecnick SAMPLING 1200 RGB, resized to 512x512",
      lambda img: resize(img, 512, 512),
      expected=100,
    ),
    Dataset(
      "div2k",
      "DIV2K validation, shorter side 768, centre crop 768x768",
      lambda img: shorter_side_then_center_crop(img, 768),
      expected=100,
    ),
    Dataset(
      "coco",
      "COCO2017 test, images larger than 512x512 resized to 384x384",
      lambda img: resize(img, 384, 384),
      larger_than(512),
      expected=2695,
    ),
    Dataset("clic", "CLIC2020 professional/mobile, full size"),
    Dataset("folder", "any folder of images, full size"),
  )
}


def get(name: str) -> Dataset:
  if name not in DATASETS:
    raise DatasetError(
      f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}"
    )
  return DATASETS[name]


def check_folder(name: str, path: str) -> Dataset:
  """The dataset ``name``, once ``path`` is a folder (checked up front)."""
  ds = get(name)
  if not path:
    raise DatasetError(
      f"the {name} dataset ({ds.description}) needs its folder: --data PATH"
    )
  if not os.path.isdir(path):
    raise DatasetError(
      f"{path}: no such folder (the {name} dataset: {ds.description}); "
      "name it with --data"
    )
  return ds


def images(
  name: str, path: str, limit: int | None = None, max_pixels=None
) -> Iterator[tuple[str, np.ndarray]]:
  """(file name, preprocessed uint8 image) of a dataset folder, sorted;
  images over ``max_pixels`` (default ``imageio.MAX_PIXELS``) are refused
  from their header, before decoding.

  Raises:
    DatasetError: the folder is missing or holds no image (the message
      says what the set should contain).
    cdc_jax.imageio.ImageError: an image cannot be read.
  """
  ds = check_folder(name, path)
  files = find_images(path)
  if not files:
    raise DatasetError(
      f"{path}: no images (.png, .jpg, ...) found for {name} "
      f"(expected: {ds.description})"
    )
  kept = 0
  for f in files:
    img = load_image(f, max_pixels)
    if not ds.keep(img):
      continue
    yield os.path.relpath(f, path), ds.preprocess(img)
    kept += 1
    if limit is not None and kept >= limit:
      return
  if kept == 0:
    raise DatasetError(
      f"{path}: none of the {len(files)} images qualifies for {name} "
      f"({ds.description})"
    )


def held_out_image() -> np.ndarray:
  """The embedded held-out photo (``data.sources.HELD_OUT``, never in the
  embedded training set), whole, uint8 [H, W, 3]."""
  return dict(embedded_images())[HELD_OUT]


def held_out() -> list[tuple[str, np.ndarray]]:
  """The held-out set of the main job's report and of ``evaluate
  --dataset held_out``: that one photo."""
  return [(f"{HELD_OUT} (held out)", held_out_image())]


def eval_images(data: str = "", max_images: int = 4):
  """The set measured during training, as (name, uint8 [H, W, 3]):
  ``data`` empty -> the held-out photo alone; else the first
  ``max_images`` images (sorted by path) of the folder ``data``.

  Raises:
    DataError: not a folder, or no images; SettingError:
      ``max_images`` < 1.
    cdc_jax.imageio.ImageError: an image cannot be read.
  """
  if not data:
    return [(HELD_OUT, held_out_image())]
  if max_images < 1:
    raise SettingError(f"eval.max_images={max_images} must be >= 1")
  files = ImageFolderSource(data).files[:max_images]
  return [(os.path.relpath(f, data), load_image(f)) for f in files]


def crop_set(images, size: int, factor: int) -> np.ndarray:
  """Central squares of one side for all ``images`` (one shape: one
  compile): ``min(size, every image's shorter side)`` rounded down to a
  multiple of ``factor``; uint8 [N, s, s, 3]."""
  side = min([size] + [min(img.shape[:2]) for img in images])
  side = side // factor * factor
  if side <= 0:
    raise SettingError(
      f"eval crops: the smallest image side or eval.size ({size}) is under "
      f"the model's downsampling factor {factor}"
    )
  return np.stack([center_crop(img, side, side) for img in images])
