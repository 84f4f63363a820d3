"""TFDS sources read without TensorFlow: a tiny dataset is prepared here
as array_record (through the TFDS builder API), then read back as a
training source, through make_source and the loader, and as evaluation
images; errors name what is missing and what to run."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys

import ml_collections
import numpy as np
import pytest

from cdc_jax import evaluate
from cdc_jax.data import sources, tfds_source
from cdc_jax.data.loader import Loader
from cdc_jax.eval.datasets import DatasetError

NAME = "cdc_test_photos"
SIZES = [(40, 56), (48, 48), (36, 60)]


def _images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip(
    "tensorflow_datasets", reason="tensorflow-datasets is not installed"
  )


def _builder_class(tfds):
  """A dataset with an RGB and a grayscale image feature and a text one."""
  from PIL import Image

  class CdcTestPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "mask": tfds.features.Image(shape=(None, None, 1)),
            "caption": tfds.features.Text(),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {
        "train": self._generate_examples(3),
        "test": self._generate_examples(1),
      }

    def _generate_examples(self, n):
      for i, img in enumerate(_images()[:n]):
        yield (
          str(i),
          {
            "image": Image.fromarray(img),
            "mask": Image.fromarray(img[..., 0]).convert("L"),
            "caption": f"photo {i}",
          },
        )

  return CdcTestPhotos


@pytest.fixture(scope="module")
def data_dir(tfds, tmp_path_factory):
  """The dataset prepared as array_record; its builder is not registered,
  so reading goes through the files only, as in a fresh process."""
  root = str(tmp_path_factory.mktemp("tfds"))
  with tfds.core.registered.skip_registration():
    builder_cls = _builder_class(tfds)
  builder = builder_cls(data_dir=root, file_format="array_record")
  builder.download_and_prepare()
  return root


def test_reads_the_prepared_split(data_dir):
  src = tfds_source.TFDSSource(NAME, "train", data_dir)
  assert len(src) == 3
  for i, want in enumerate(_images()):
    got = src[i]
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)  # PNG inside: lossless
  assert src.name(2) == f"tfds:{NAME}/train[2]"
  gray = tfds_source.TFDSSource(NAME, "train", data_dir, image_key="mask")
  img = gray[1]
  assert img.shape == (48, 48, 3)
  np.testing.assert_array_equal(img[..., 2], _images()[1][..., 0])


def test_make_source_and_loader(data_dir):
  cfg = ml_collections.ConfigDict(
    dict(name=f"tfds:{NAME}", path=data_dir, split="train", crop_size=32)
  )
  src = sources.make_source(cfg)
  assert isinstance(src, tfds_source.TFDSSource) and len(src) == 3
  loader = Loader(src, 4, 32, seed=0)
  try:
    loader.require_usable()
    batch = loader.batch_at(0)
  finally:
    loader.close()
  assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8
  # Picklable, for the grain path's spawned workers.
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(src))[2], src[2])


def test_evaluate_reads_tfds(data_dir):
  def load(*extra):
    args = evaluate.parser().parse_args(
      ["--model", "m", "--out", "o", "--dataset", f"tfds:{NAME}"]
      + ["--data", data_dir, "--split", "train", *extra]
    )
    return evaluate.load_images(args)

  got = load("--limit", "2")
  assert [n for n, _ in got] == ["train-00000", "train-00001"]
  np.testing.assert_array_equal(got[1][1], _images()[1])
  resized = load("--preprocess", "tecnick", "--limit", "1")
  assert resized[0][1].shape == (512, 512, 3)
  with pytest.raises(DatasetError, match="qualifies for --preprocess coco"):
    load("--preprocess", "coco")  # none is larger than 512x512


def test_errors_name_the_fix(tfds, data_dir, tmp_path):
  err = tfds_source.TFDSError
  with pytest.raises(err, match="no image feature 'hr'.*'image', 'mask'"):
    tfds_source.TFDSSource(NAME, "train", data_dir, image_key="hr")
  with pytest.raises(err, match="Unknown split 'validation'"):
    tfds_source.TFDSSource(NAME, "validation", data_dir)
  with pytest.raises(err, match=f"TFDS dataset '{NAME}' in {data_dir}"):
    tfds_source.TFDSSource(NAME, "train[3:]", data_dir)  # selects nothing
  empty = str(tmp_path)
  with pytest.raises(err, match="no such builder") as e:
    tfds_source.TFDSSource("cdc_no_such_photos", "train", empty)
  want = "tfds build cdc_no_such_photos --file_format=array_record --data_"
  assert want + f"dir={empty}" in str(e.value)

  class CdcUnpreparedPhotos(tfds.core.GeneratorBasedBuilder):
    """Registered (as the TFDS catalog's builders are), never prepared."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = {"image": tfds.features.Image(shape=(None, None, 3))}
      return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(features)
      )

    def _split_generators(self, dl_manager):
      return {}

    def _generate_examples(self):
      return iter(())

  with pytest.raises(err, match="is not prepared in .*never downloads") as e:
    tfds_source.TFDSSource("cdc_unprepared_photos", "train", empty)
  assert f"--data_dir={empty}" in str(e.value)


def test_tfrecord_files_need_a_rebuild(data_dir, tmp_path):
  """A set prepared as tfrecord (TFDS's old default; writing it needs
  TensorFlow, so the prepared files' metadata is edited here)."""
  root = str(tmp_path / "rec")
  shutil.copytree(data_dir, root)
  info = os.path.join(root, NAME, "1.0.0", "dataset_info.json")
  with open(info) as f:
    meta = json.load(f)
  meta["fileFormat"] = "tfrecord"
  with open(info, "w") as f:
    json.dump(meta, f)
  with pytest.raises(tfds_source.TFDSError, match="stored as tfrecord") as e:
    tfds_source.TFDSSource(NAME, "train", root)
  assert "--file_format=array_record" in str(e.value)


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(tfds_source.TFDSError, match="pip install tensorflow-"):
    tfds_source.TFDSSource(NAME)
