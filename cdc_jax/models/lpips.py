"""LPIPS v0.1 (Zhang et al. 2018) with a VGG16 or AlexNet trunk, in Flax.

The perceptual distance of the ``lpips`` package (0.1.4, ``version='0.1'``,
``lpips=True``, ``spatial=False``), NHWC, for inputs in [-1, 1]::

  x, y [B, H, W, 3] in [-1, 1]
    -> scaling_layer: (v - shift) / scale                  (ImageNet stats)
    -> trunk: torchvision ``features`` convs (+ReLU), max pools; the output
       of each of 5 slices is tapped (VGG16: relu1_2 ... relu5_3,
       AlexNet: relu1 ... relu5)
    -> per tap l: unit-normalise over channels, f / (||f||_2 + 1e-10),
       d_l = (f_x - f_y)^2                                 [B, h, w, C_l]
    -> Dropout(0.5) (training only) -> lin_l, a bias-free 1x1 conv to 1
    -> spatial mean, sum over the 5 taps                    -> [B]

Parameter names (the ``lpips_vgg.npz`` that ``python -m cdc_jax.convert
checkpoint`` writes for rho > 0 checkpoints loads as is, see
``convert.tables.lpips_table``)::

  scaling_layer/{shift,scale}   (3,)             lpips ScalingLayer buffers
  features_{k}/{kernel,bias}    (kh, kw, I, O)   torchvision features[k]
  lin_{i}/kernel                (1, 1, C_i, 1)   lpips lin{i}.model.1

The CDC training loss (docs/model.md §7.4) runs LPIPS-VGG with its dropout
active; ``deterministic=False`` draws the masks from the ``'dropout'`` rng
stream, ``dropout_masks`` injects them (parity tests, a deterministic
variant).

``load(path)`` reads those params from an ``.npz`` (no torch); a missing or
wrong file raises ``LPIPSWeightsError``, one line naming the file and how
to get it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from cdc_jax.errors import UserError
from cdc_jax.models import weights
from cdc_jax.models.layers import Conv

# lpips v0.1 ScalingLayer: ImageNet mean/std expressed for [-1, 1] inputs.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# lpips NetLinLayer(use_dropout=True): nn.Dropout() has p = 0.5.
DROPOUT_RATE = 0.5
EPS = 1e-10  # lpips.normalize_tensor


class ConvSpec(NamedTuple):
  """A conv + ReLU of torchvision's ``features`` (index ``index``)."""

  index: int
  cin: int
  cout: int
  kernel: int = 3
  stride: int = 1
  pad: int = 1


class PoolSpec(NamedTuple):
  """``nn.MaxPool2d(window, stride)``, no padding, floor mode."""

  window: int
  stride: int


def _vgg16():
  c, p = ConvSpec, PoolSpec(2, 2)
  return (
    (c(0, 3, 64), c(2, 64, 64)),
    (p, c(5, 64, 128), c(7, 128, 128)),
    (p, c(10, 128, 256), c(12, 256, 256), c(14, 256, 256)),
    (p, c(17, 256, 512), c(19, 512, 512), c(21, 512, 512)),
    (p, c(24, 512, 512), c(26, 512, 512), c(28, 512, 512)),
  )


def _alexnet():
  c, p = ConvSpec, PoolSpec(3, 2)
  return (
    (c(0, 3, 64, kernel=11, stride=4, pad=2),),
    (p, c(3, 64, 192, kernel=5, pad=2)),
    (p, c(6, 192, 384)),
    (c(8, 384, 256),),
    (c(10, 256, 256),),
  )


# net -> 5 slices (lpips ``net.slice1..5``), each a sequence of layers whose
# output is tapped. "vgg" is torchvision vgg16, "alex" alexnet.
TRUNKS = {"vgg": _vgg16(), "alex": _alexnet()}
NETS = tuple(TRUNKS)


def trunk_convs(net: str) -> list[ConvSpec]:
  """The convs of ``net`` in torchvision order."""
  return [op for sl in _trunk(net) for op in sl if isinstance(op, ConvSpec)]


def widths(net: str) -> tuple[int, ...]:
  """Channels of the 5 tapped features (lpips ``chns``)."""
  return tuple(
    [op for op in sl if isinstance(op, ConvSpec)][-1].cout for sl in _trunk(net)
  )


def _trunk(net: str):
  if net not in TRUNKS:
    raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
  return TRUNKS[net]


def feature_shapes(net: str, height: int, width: int) -> list[tuple]:
  """(h, w, C) of the 5 tapped features for an H x W input.

  These are the shapes (after a batch axis) of ``LPIPS``'s dropout masks.
  """
  out, h, w = [], height, width
  for sl in _trunk(net):
    for op in sl:
      if isinstance(op, PoolSpec):
        h = (h - op.window) // op.stride + 1
        w = (w - op.window) // op.stride + 1
      else:
        h = (h + 2 * op.pad - op.kernel) // op.stride + 1
        w = (w + 2 * op.pad - op.kernel) // op.stride + 1
    out.append((h, w, [o for o in sl if isinstance(o, ConvSpec)][-1].cout))
  return out


def unit_normalize(f, eps: float = EPS):
  """``f / (||f||_2 + eps)`` over channels, as ``lpips.normalize_tensor``.

  The norm's gradient is taken as 0 where all channels are 0 (torch gives
  NaN there, which its ReLU backward then masks); values are identical.
  """
  s = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  pos = s > 0
  norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)
  return f / (norm + eps)


class ScalingLayer(nn.Module):
  """lpips ScalingLayer; its buffers are params here (frozen in training)."""

  @nn.compact
  def __call__(self, x):  # [B, H, W, 3]
    const = lambda v: lambda key: jnp.asarray(v, jnp.float32)
    shift = self.param("shift", const(SHIFT))
    scale = self.param("scale", const(SCALE))
    return (x - shift) / scale


class LPIPS(nn.Module):
  """LPIPS v0.1 distance between image batches in [-1, 1], NHWC -> [B].

  ``__call__(x, y, deterministic=True, dropout_masks=None)``: with
  ``deterministic=False`` the lpips dropout (p = ``dropout_rate``) before
  each lin layer is active and needs the ``'dropout'`` rng; with
  ``dropout_masks`` (5 keep-masks broadcastable to ``feature_shapes`` with
  a batch axis, 1 = keep) those masks are used instead, scaled by
  1 / (1 - p) like ``torch.nn.Dropout``.
  """

  net: str = "vgg"
  dropout_rate: float = DROPOUT_RATE
  eps: float = EPS

  def _features(self, v) -> list[jax.Array]:
    taps = []
    for sl in _trunk(self.net):
      for op in sl:
        if isinstance(op, PoolSpec):
          win, st = (op.window,) * 2, (op.stride,) * 2
          v = nn.max_pool(v, win, strides=st, padding="VALID")
        else:
          conv = Conv(
            op.cout, op.kernel, op.stride, op.pad, name=f"features_{op.index}"
          )
          v = jax.nn.relu(conv(v))
      taps.append(v)
    return taps

  @nn.compact
  def __call__(
    self,
    x,
    y,
    deterministic: bool = True,
    dropout_masks: Sequence | None = None,
  ):  # [B, H, W, 3] x2 -> [B]
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(
        "LPIPS expects two [B, H, W, 3] batches of the same shape, got "
        f"{x.shape} and {y.shape}"
      )
    if dropout_masks is not None and len(dropout_masks) != 5:
      raise ValueError(f"need 5 dropout masks, got {len(dropout_masks)}")
    b = x.shape[0]
    v = ScalingLayer(name="scaling_layer")(jnp.concatenate([x, y], axis=0))
    total = jnp.zeros((b,), v.dtype)
    for i, f in enumerate(self._features(v)):  # one trunk pass for x and y
      f = unit_normalize(f, self.eps)
      d = jnp.square(f[:b] - f[b:])  # [B, h, w, C_i]
      if dropout_masks is not None:
        keep = jnp.asarray(dropout_masks[i], d.dtype)
        d = d * keep * (1.0 / (1.0 - self.dropout_rate))
      else:
        d = nn.Dropout(self.dropout_rate)(d, deterministic=deterministic)
      lin = Conv(1, 1, use_bias=False, name=f"lin_{i}")(d)  # [B, h, w, 1]
      total = total + jnp.mean(lin, axis=(1, 2, 3))
    return total


def net_of(params) -> str:
  """The trunk ('vgg' or 'alex') of an LPIPS params tree, from its names."""
  names = set(params)
  for net in NETS:
    if names == {f"features_{c.index}" for c in trunk_convs(net)} | {
      "scaling_layer",
      *(f"lin_{i}" for i in range(5)),
    }:
      return net
  raise ValueError(
    f"not an LPIPS params tree (top-level names: {sorted(names)[:8]})"
  )


def init_params(net: str = "vgg", rng=None):
  """Randomly initialised LPIPS params (trunk and lin layers)."""
  rng = jax.random.key(0) if rng is None else rng
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return jax.jit(LPIPS(net).init)(rng, x, x)["params"]


def param_shapes(net: str = "vgg") -> dict[str, tuple[int, ...]]:
  """Flax leaf path ("a/b") -> shape, without computing anything."""
  tree = jax.eval_shape(lambda: init_params(net))
  return {
    "/".join(str(k.key) for k in path): tuple(v.shape)
    for path, v in jax.tree.leaves_with_path(tree)
  }


def lpips_distance(
  params,
  x,
  y,
  *,
  train: bool = False,
  dropout_rng=None,
  dropout_masks: Sequence | None = None,
  net: str | None = None,
):  # [B, H, W, 3] x2 in [-1, 1] -> [B]
  """LPIPS between ``x`` and ``y`` with frozen ``params`` (jit/grad safe).

  ``train=True`` turns the lpips dropout on, as the original's training
  loss has it (docs/model.md §7.4): pass ``dropout_rng`` (a key) or
  ``dropout_masks`` (see ``LPIPS``). Gradients flow to ``x`` and ``y``,
  never to ``params`` (``stop_gradient``). ``net`` is read from the params
  when None.
  """
  net = net_of(params) if net is None else net
  params = jax.lax.stop_gradient(params)
  if dropout_masks is not None and not train:
    raise ValueError("lpips_distance: dropout_masks need train=True")
  rngs = {}
  if train and dropout_masks is None:
    if dropout_rng is None:
      raise ValueError("lpips_distance(train=True) needs dropout_rng")
    rngs["dropout"] = dropout_rng
  return LPIPS(net).apply(
    {"params": params},
    x,
    y,
    deterministic=not train,
    dropout_masks=dropout_masks,
    rngs=rngs,
  )


class LPIPSWeightsError(UserError, ValueError):
  """A weights file is missing or is not what LPIPS needs."""


def check_net(net: str) -> None:
  """Raises ``LPIPSWeightsError`` unless ``net`` is one of ``NETS``."""
  if net not in NETS:
    raise LPIPSWeightsError(f"LPIPS net must be one of {NETS}, got {net!r}")


def load(path: str, net: str | None = None):
  """LPIPS params from an ``.npz``: the ``lpips_vgg.npz`` of a converted
  rho > 0 checkpoint or what ``python -m cdc_jax.convert lpips`` writes.

  ``net`` ("vgg"/"alex") is read from the names when None; every key and
  shape is checked against ``param_shapes``. Raises ``LPIPSWeightsError``.
  """
  if not os.path.isfile(path):
    raise LPIPSWeightsError(
      f"LPIPS weights {path}: no such file; write one with python -m "
      "cdc_jax.convert lpips, or convert a rho > 0 CDC checkpoint "
      "(python -m cdc_jax.convert checkpoint, which writes lpips_vgg.npz)"
    )
  what = f"LPIPS weights {path}"
  found = weights.npz_shapes(path, what, LPIPSWeightsError)
  try:
    net = net_of({k.split("/")[0] for k in found}) if net is None else net
  except ValueError as e:
    raise LPIPSWeightsError(f"{what}: {e}") from None
  check_net(net)
  bad = weights.mismatches(found, param_shapes(net))
  if bad:
    raise LPIPSWeightsError(
      f"{what}: not LPIPS-{net} params (wrong or missing keys/shapes: "
      f"{weights.listing(bad)})"
    )
  flat = weights.read_npz(path, what, LPIPSWeightsError)
  return traverse_util.unflatten_dict(flat, sep="/")
