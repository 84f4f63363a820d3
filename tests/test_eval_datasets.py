"""Evaluation sets: each preprocessing step, filters, folder errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cdc_jax.eval import datasets


def _img(h, w, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_resize_and_crops():
  img = _img(600, 600)
  assert datasets.resize(img, 512, 512).shape == (512, 512, 3)
  assert datasets.resize(img, 600, 600) is img  # no-op keeps the pixels
  out = datasets.shorter_side_then_center_crop(_img(1356, 2040), 768)
  assert out.shape == (768, 768, 3)
  out = datasets.shorter_side_then_center_crop(_img(2040, 1356), 768)
  assert out.shape == (768, 768, 3)
  with pytest.raises(ValueError, match="cannot crop"):
    datasets.center_crop(_img(10, 10), 11, 5)


def test_center_crop_is_central():
  img = np.zeros((7, 9, 3), np.uint8)
  img[2:5, 3:6] = 255
  np.testing.assert_array_equal(datasets.center_crop(img, 3, 3), 255)


def test_shorter_side_resize_keeps_the_content_centred():
  # A white centre square stays in the centre after resize + crop.
  img = np.zeros((800, 1200, 3), np.uint8)
  img[350:450, 550:650] = 255
  out = datasets.shorter_side_then_center_crop(img, 768)
  assert out[384, 384].min() > 200 and out[0, 0].max() < 20


def test_coco_keeps_only_images_larger_than_512(tmp_path):
  for i, (h, w) in enumerate([(640, 480), (600, 540), (513, 513), (512, 700)]):
    Image.fromarray(_img(h, w, i)).save(tmp_path / f"{i}.png")
  got = list(datasets.images("coco", str(tmp_path)))
  assert [n for n, _ in got] == ["1.png", "2.png"]
  assert all(img.shape == (384, 384, 3) for _, img in got)


def test_images_sorted_limited_and_preprocessed(tmp_path):
  for name in ("b.png", "a.png", "c.jpg"):
    Image.fromarray(_img(600, 600)).save(tmp_path / name)
  got = list(datasets.images("tecnick", str(tmp_path), limit=2))
  assert [n for n, _ in got] == ["a.png", "b.png"]
  assert got[0][1].shape == (512, 512, 3) and got[0][1].dtype == np.uint8


@pytest.mark.parametrize("setup", ["missing", "empty", "none_qualify"])
def test_bad_folders_name_the_problem(setup, tmp_path):
  path = tmp_path / "coco"
  if setup != "missing":
    path.mkdir()
  if setup == "none_qualify":
    Image.fromarray(_img(100, 100)).save(path / "small.png")
  with pytest.raises(datasets.DatasetError) as e:
    list(datasets.images("coco", str(path)))
  msg = str(e.value)
  assert str(path) in msg and "384x384" in msg


def test_unknown_dataset():
  with pytest.raises(datasets.DatasetError, match="known: clic, coco"):
    datasets.get("imagenet")
