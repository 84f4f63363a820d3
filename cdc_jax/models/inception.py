"""InceptionV3, the "FID" variant, in Flax: 2048-d pool3 features.

The network that FID and KID are defined on: the TensorFlow 2015 graph
(``pt_inception-2015-12-05`` weights), as torch-fidelity 0.4.0's
``inception-v3-compat`` feature extractor and pytorch-fid run it. NHWC::

  images [B, H, W, 3], uint8 (or floats in [0, 255])
    -> resize_tf1 to 299x299 (TF1 bilinear, align_corners=False:
       source coordinate i * in/out, no half-pixel offset)   float32
    -> (x - 128) / 128                                       [B, 299, 299, 3]
    -> stem: Conv2d_1a_3x3 /2, 2a_3x3, 2b_3x3 (pad 1), max 3/2,
             3b_1x1, 4a_3x3, max 3/2                        [B, 35, 35, 192]
    -> Mixed_5b, 5c, 5d   (InceptionA)                      [B, 35, 35, 288]
    -> Mixed_6a           (InceptionB, /2)                  [B, 17, 17, 768]
    -> Mixed_6b .. 6e     (InceptionC)                      [B, 17, 17, 768]
    -> Mixed_7a           (InceptionD, /2)                  [B, 8, 8, 1280]
    -> Mixed_7b, 7c       (InceptionE, avg / max pool branch) [B, 8, 8, 2048]
    -> spatial mean                                         [B, 2048] float32

Every conv is ``BasicConv2d``: conv without bias, BatchNorm (inference,
eps 1e-3), ReLU. Where the FID variant differs from torchvision's
ImageNet InceptionV3: the 3x3/1 average pools of the A, C and E blocks
leave the padding out of the count (TF's ``AVG`` pool), and the last block
(Mixed_7c) pools its fourth branch with a 3x3/1 *max* pool; the ``fc``
head (1008 classes) is not needed for FID/KID and is not built.

Variables (torch names with ``.`` -> ``/``, see ``convert.inception``)::

  params/<block>[/<branch>]/conv/kernel        (kh, kw, I, O)
  params/<block>[/<branch>]/bn/{scale,bias}    (O,)
  batch_stats/<block>[/<branch>]/bn/{mean,var} (O,)

``load_variables(path)`` reads them from the ``.npz`` that ``python -m
cdc_jax.convert inception`` writes (no torch); nothing is downloaded: a
missing or wrong file raises ``InceptionWeightsError``, one line naming
the file and where to get the weights (``WEIGHTS_URLS``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax.errors import UserError
from cdc_jax.models import weights

# The FID weights: torch-fidelity's and pytorch-fid's copies of one file.
WEIGHTS_URLS = (
  "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
  "weights-inception-2015-12-05-6726825d.pth",
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
  "pt_inception-2015-12-05-6726825d.pth",
)

INPUT_SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST
# (block, pool_features) of the InceptionA and (block, channels_7x7) of the
# InceptionC blocks.
_MIXED_A = (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64))
_MIXED_C = (
  ("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)
)  # fmt: skip


def _tf1_grid(n_in: int, n_out: int):
  """TF1 ``align_corners=False`` sample grid: (lo, hi, frac), float32.

  Source coordinate ``i * (n_in / n_out)`` computed in float32 (as
  torch-fidelity does), floor for ``lo``, ``hi = min(lo + 1, n_in - 1)``.
  """
  scale = np.float32(n_in / n_out)
  x = np.arange(n_out, dtype=np.float32) * scale
  lo = x.astype(np.int32)  # x >= 0: truncation is floor
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, (x - lo.astype(np.float32)).astype(np.float32)


def resize_tf1(x, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)):
  """Bilinear resize as TF1's ``resize_bilinear(align_corners=False)``.

  ``x`` [B, H, W, C] (cast to float32) -> [B, size[0], size[1], C]. Width
  is interpolated first, then height, each as ``a + (b - a) * frac``;
  ``jax.image.resize`` differs (half-pixel centres).
  """
  x = jnp.asarray(x).astype(jnp.float32)
  ylo, yhi, dy = _tf1_grid(x.shape[1], size[0])
  xlo, xhi, dx = _tf1_grid(x.shape[2], size[1])
  dx = jnp.asarray(dx)[None, None, :, None]
  dy = jnp.asarray(dy)[None, :, None, None]

  def along_w(rows):  # [B, h, W, C] -> [B, h, size[1], C]
    a, b = jnp.take(rows, xlo, axis=2), jnp.take(rows, xhi, axis=2)
    return a + (b - a) * dx

  top = along_w(jnp.take(x, ylo, axis=1))
  bottom = along_w(jnp.take(x, yhi, axis=1))
  return top + (bottom - top) * dy


def normalise(x):
  """[0, 255] -> [-1, 1) as the TF graph: (x - 128) / 128."""
  return (x - 128.0) / 128.0


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (running stats, eps 1e-3) -> ReLU."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: jax.lax.Precision | None = HIGHEST

  @nn.compact
  def __call__(self, x):
    (ph, pw), s = self.padding, self.stride
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=(s, s),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=self.precision,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  """3x3/1 average pool, pad 1, padding left out of the count (TF)."""
  return nn.avg_pool(
    x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
    count_include_pad=False,
  )  # fmt: skip


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  """Base of the mixed blocks: ``conv(name, features, ...)`` helper."""

  precision: jax.lax.Precision | None = HIGHEST

  def conv(self, name, features, kernel=(1, 1), stride=1, padding=(0, 0)):
    return BasicConv2d(
      features, kernel, stride, padding, self.precision, name=name
    )


class InceptionA(_Block):
  """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x):  # [B, 35, 35, C] -> [B, 35, 35, 224 + pool]
    c = self.conv
    b1 = c("branch1x1", 64)(x)
    b5 = c("branch5x5_1", 48)(x)
    b5 = c("branch5x5_2", 64, (5, 5), padding=(2, 2))(b5)
    b3 = c("branch3x3dbl_1", 64)(x)
    b3 = c("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = c("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = c("branch_pool", self.pool_features)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):  # [B, 35, 35, 288] -> [B, 17, 17, 768]
    c = self.conv
    b3 = c("branch3x3", 384, (3, 3), stride=2)(x)
    bd = c("branch3x3dbl_1", 64)(x)
    bd = c("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = c("branch3x3dbl_3", 96, (3, 3), stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b..e: factorised 7x7 convolutions, width ``channels_7x7``."""

  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):  # [B, 17, 17, 768] -> [B, 17, 17, 768]
    c, c7 = self.conv, self.channels_7x7
    row = {"kernel": (1, 7), "padding": (0, 3)}
    col = {"kernel": (7, 1), "padding": (3, 0)}
    b1 = c("branch1x1", 192)(x)
    b7 = c("branch7x7_1", c7)(x)
    b7 = c("branch7x7_2", c7, **row)(b7)
    b7 = c("branch7x7_3", 192, **col)(b7)
    bd = c("branch7x7dbl_1", c7)(x)
    bd = c("branch7x7dbl_2", c7, **col)(bd)
    bd = c("branch7x7dbl_3", c7, **row)(bd)
    bd = c("branch7x7dbl_4", c7, **col)(bd)
    bd = c("branch7x7dbl_5", 192, **row)(bd)
    bp = c("branch_pool", 192)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):  # [B, 17, 17, 768] -> [B, 8, 8, 1280]
    c = self.conv
    b3 = c("branch3x3_1", 192)(x)
    b3 = c("branch3x3_2", 320, (3, 3), stride=2)(b3)
    b7 = c("branch7x7x3_1", 192)(x)
    b7 = c("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = c("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = c("branch7x7x3_4", 192, (3, 3), stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b/c: expanded 1x3 / 3x1 branches.

  ``pool="avg"`` (Mixed_7b, TF average pool without padding in the count)
  or ``pool="max"`` (Mixed_7c: the 2015 graph max-pools here, 3x3/1 pad 1).
  """

  pool: str = "avg"

  def _split(self, name, x):
    """The 1x3 and 3x1 convs side by side: [.., 384] -> [.., 768]."""
    a = self.conv(f"{name}a", 384, (1, 3), padding=(0, 1))(x)
    b = self.conv(f"{name}b", 384, (3, 1), padding=(1, 0))(x)
    return jnp.concatenate([a, b], axis=-1)

  @nn.compact
  def __call__(self, x):  # [B, 8, 8, C] -> [B, 8, 8, 2048]
    c = self.conv
    b1 = c("branch1x1", 320)(x)
    b3 = self._split("branch3x3_2", c("branch3x3_1", 384)(x))
    bd = c("branch3x3dbl_1", 448)(x)
    bd = c("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bd = self._split("branch3x3dbl_3", bd)
    if self.pool == "avg":
      p = _avg_pool_3x3(x)
    elif self.pool == "max":
      p = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE pool must be 'avg' or 'max': {self.pool}")
    bp = c("branch_pool", 192)(p)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID InceptionV3: uint8 images [B, H, W, 3] -> [B, 2048] float32.

  ``precision`` is the convolutions' matmul precision. The default,
  HIGHEST, keeps float32 arithmetic where the backend's default would use
  bfloat16 (TPU) or TF32 (recent NVIDIA GPUs) passes; the parity with
  torch-fidelity (float32) is measured on CPU, where both are the same.
  """

  precision: jax.lax.Precision | None = HIGHEST

  def _stem(self, x):  # [B, 299, 299, 3] -> [B, 35, 35, 192]
    p = self.precision
    x = BasicConv2d(32, (3, 3), 2, precision=p, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(
      64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3"
    )(x)
    x = _max_pool_3x3_s2(x)  # [B, 73, 73, 64]
    x = BasicConv2d(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
    return _max_pool_3x3_s2(x)

  @nn.compact
  def __call__(self, images):
    p = self.precision
    x = normalise(resize_tf1(images))  # [B, 299, 299, 3]
    x = self._stem(x)
    for name, pool in _MIXED_A:
      x = InceptionA(p, pool, name=name)(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    for name, c7 in _MIXED_C:
      x = InceptionC(p, c7, name=name)(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE(p, "avg", name="Mixed_7b")(x)
    x = InceptionE(p, "max", name="Mixed_7c")(x)  # [B, 8, 8, 2048]
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


def variable_shapes(model: InceptionV3 | None = None) -> dict[str, tuple]:
  """``"params/..."`` / ``"batch_stats/..."`` -> shape, from ``eval_shape``.

  The input size does not matter (every input is resized to 299x299).
  """
  model = InceptionV3() if model is None else model
  tree = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3), jnp.uint8)
  )
  return dict(_flat_shapes(tree))


def _flat_shapes(tree, prefix: str = "") -> Sequence[tuple[str, tuple]]:
  out = []
  for k in sorted(tree):
    key = f"{prefix}/{k}" if prefix else str(k)
    v = tree[k]
    if hasattr(v, "items"):
      out.extend(_flat_shapes(v, key))
    else:
      out.append((key, tuple(v.shape)))
  return out


@functools.lru_cache(maxsize=1)
def _default_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
  return tuple(variable_shapes().items())  # one eval_shape a process


class InceptionWeightsError(UserError, ValueError):
  """An Inception weights file is missing or is not the FID weights."""


def fetch_hint() -> str:
  """Where the weights come from (text only; cdc_jax never downloads)."""
  return (
    f"download {WEIGHTS_URLS[0]} (or pytorch-fid's {WEIGHTS_URLS[1]}, the "
    "same weights) yourself and pass its path, or convert it once with "
    "python -m cdc_jax.convert inception SRC.pth OUT.npz"
  )


def check_finite(flat: Mapping[str, np.ndarray], what: str) -> None:
  """Raises ``InceptionWeightsError`` naming the non-finite variables."""
  bad = [k for k, v in flat.items() if not np.all(np.isfinite(v))]
  if bad:
    raise InceptionWeightsError(
      f"{what}: non-finite values in {weights.listing(bad)}"
    )


def load_variables(path: str) -> dict[str, np.ndarray]:
  """Flat variables (``"params/..."``, ``"batch_stats/..."``) from the
  ``.npz`` of ``python -m cdc_jax.convert inception``; every key and
  shape is checked against ``variable_shapes``. Raises
  ``InceptionWeightsError``."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InceptionWeightsError(
      f"InceptionV3 FID weights {path}: no such file; {fetch_hint()}"
    )
  what = f"InceptionV3 weights {path}"
  hint = fetch_hint()
  found = weights.npz_shapes(path, what, InceptionWeightsError, hint)
  bad = weights.mismatches(found, dict(_default_shapes()))
  if bad:
    raise InceptionWeightsError(
      f"{what}: not FID InceptionV3 variables (wrong or missing keys/"
      f"shapes: {weights.listing(bad)}); {hint}"
    )
  flat = weights.read_npz(path, what, InceptionWeightsError, hint)
  check_finite(flat, what)
  return flat
