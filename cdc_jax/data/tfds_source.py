"""Images from a TFDS dataset that is already prepared on local disk,
read without TensorFlow.

``tfds.data_source`` / ``builder.as_data_source`` (tensorflow-datasets
>= 4.9) give random access to datasets prepared in the ``array_record``
file format, decoding images with PIL; TensorFlow is not needed. Nothing
is downloaded here: a dataset that is not prepared is an error naming its
folder and the ``tfds build`` command that prepares it (which downloads).

Training: ``--config.data.name=tfds:<builder>`` (e.g. ``tfds:div2k/
bicubic_x2``) with ``--config.data.path=<data_dir>`` (empty: TFDS's
default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) and
``--config.data.split``. Evaluation: ``python -m cdc_jax.evaluate
--dataset tfds:<builder> --data <data_dir> --split test``.

Datasets prepared as ``tfrecord`` (TFDS's default before array_record)
need TensorFlow to read; rebuild them with ``--file_format=array_record``.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from cdc_jax.errors import UserError
from cdc_jax.imageio import ImageError

PREFIX = "tfds:"
DEFAULT_IMAGE_KEY = "image"


class TFDSError(UserError, ValueError):
  """tensorflow-datasets is missing, or the dataset cannot be read."""


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise TFDSError(
      "TFDS sources need the tensorflow-datasets package (TensorFlow is "
      "not needed): pip install tensorflow-datasets"
    ) from None
  return tfds


def default_data_dir() -> str:
  """Where TFDS looks when no data_dir is given."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
    os.path.join("~", "tensorflow_datasets")
  )


def build_command(name: str, data_dir: str) -> str:
  """The command that prepares ``name`` in ``data_dir`` (it downloads)."""
  return (
    f"tfds build {name} --file_format=array_record "
    f"--data_dir={data_dir or default_data_dir()}"
  )


def _builder(tfds, name: str, data_dir: str):
  """The prepared array_record builder of ``name`` in ``data_dir``."""
  root = data_dir or default_data_dir()
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise TFDSError(
      f"TFDS dataset {name!r}: no such builder and nothing prepared under "
      f"{root}; prepare it with `{build_command(name, data_dir)}` (or "
      "point data_dir at the folder that holds it)"
    ) from None
  if not builder.is_prepared():
    raise TFDSError(
      f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; "
      f"cdc_jax never downloads: run `{build_command(name, data_dir)}` "
      "first"
    )
  fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
  if fmt != "array_record":
    raise TFDSError(
      f"TFDS dataset {name!r} in {builder.data_dir} is stored as {fmt}, "
      "which needs TensorFlow to read; rebuild it as array_record: "
      f"`{build_command(name, data_dir)}`"
    )
  return builder


class TFDSSource:
  """One split of a prepared TFDS dataset; items are uint8 RGB [H, W, 3].

  The ``image_key`` feature must be a ``tfds.features.Image``; the other
  features are not decoded. Grayscale images are repeated to RGB, an alpha
  channel is dropped, 16-bit images are rescaled to 8 bits.

  Raises (at construction):
    TFDSError: tensorflow-datasets missing, unknown or unprepared dataset,
      tfrecord files, unknown split, or no such image feature.
  """

  def __init__(
    self,
    name: str,
    split: str = "train",
    data_dir: str = "",
    image_key: str = DEFAULT_IMAGE_KEY,
  ):
    if not name:
      raise TFDSError("empty TFDS dataset name; use tfds:<builder>")
    tfds = _tfds()
    self.dataset, self.split, self.image_key = name, split, image_key
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    # TFDS warns about an unprepared folder before we say what to do.
    absl_log.setLevel(logging.ERROR)
    try:
      builder = _builder(tfds, name, data_dir)
    finally:
      absl_log.setLevel(level)
    self.data_dir = str(builder.data_dir)
    features = builder.info.features
    images = sorted(
      k for k, f in features.items() if isinstance(f, tfds.features.Image)
    )
    if image_key not in images:
      raise TFDSError(
        f"TFDS dataset {name!r} has no image feature {image_key!r}; its "
        f"image features: {images or 'none'} (choose one with the image "
        "key setting)"
      )
    skip = {k: tfds.decode.SkipDecoding() for k in features if k != image_key}
    try:
      self._ds = builder.as_data_source(split=split, decoders=skip)
    except ValueError as e:
      raise TFDSError(
        f"TFDS dataset {name!r} in {self.data_dir}: {e}".splitlines()[0]
      ) from None

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> np.ndarray:
    try:
      img = np.asarray(self._ds[i][self.image_key])
    except IndexError:
      raise
    except Exception as e:  # a corrupt record names its item
      raise ImageError(self.name(i), f"cannot decode ({e})") from None
    return to_rgb_u8(img, self.name(i))

  def name(self, i: int) -> str:
    return f"{PREFIX}{self.dataset}/{self.split}[{i}]"

  def __repr__(self) -> str:
    return f"TFDSSource({self.dataset!r}, split={self.split!r})"


def to_rgb_u8(img: np.ndarray, name: str) -> np.ndarray:
  """A decoded TFDS image -> uint8 [H, W, 3] (see ``TFDSSource``)."""
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3 or img.shape[-1] not in (1, 3, 4) or 0 in img.shape:
    raise ImageError(name, f"not an image array (shape {img.shape})")
  if img.dtype == np.uint16:
    img = (img.astype(np.uint32) * 255 + 32767) // 65535
  elif img.dtype != np.uint8:
    raise ImageError(name, f"unsupported image dtype {img.dtype}")
  img = img[..., :3] if img.shape[-1] == 4 else img
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  return np.ascontiguousarray(img, dtype=np.uint8)


def images(name, split, data_dir="", image_key=DEFAULT_IMAGE_KEY, limit=None):
  """(name, uint8 image) of the split in order, the first ``limit``."""
  source = TFDSSource(name, split, data_dir, image_key)
  n = len(source) if limit is None else min(limit, len(source))
  for i in range(n):
    yield f"{split}-{i:05d}", source[i]
