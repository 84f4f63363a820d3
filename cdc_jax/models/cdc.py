"""CDC: a context model ("context_fn") conditioning a U-Net ("denoise_fn").

::

  x0 --g_a--> y --h_a--> z --Q--> z_hat --h_s--> (mu, sigma)
                                                     |
  y --Q(mu)--> y_hat --g_s--> context maps c0..c3    |  rate: -log2 p(y_hat),
                                                     |        -log2 p(z_hat)
  x_t, t, context --denoise_fn--> eps-hat (family "eps") / x0-hat ("x")

Two released families (docs/model.md §1): ``eps`` (BigCompressor, 3-channel
context, linear T=20000, L1 on eps) and ``x`` (ResnetCompressor, 64-channel
context, cosine T=8193, min(SNR,5)-weighted L2 on x0). The param tree is
``{"context_fn": ..., "denoise_fn": ...}``, mirroring the torch state_dict.

``from_config`` / ``to_config`` are the one (de)serialiser of the model's
settings (config sections and ``model.json`` hold lists, the module
tuples). The geometry (``downsampling_factor``, ``latent_shapes``) is the
model's, so callers never hard-code 16 or 64.

Precision and memory (compute settings, not part of the model: params are
float32 and identical whatever they are): ``dtype`` "bfloat16" runs g_a,
g_s and the U-Net in bf16 (mixed precision; the hyperprior, entropy models
and rate stay float32, see ``context_model``); ``with_dtype`` makes the
decoding model of another precision. bf16 decoding is close to, not
bit-identical with, float32 decoding. ``remat`` recomputes the U-Net
blocks' activations in the backward pass; ``to_config`` leaves it out of
``model.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cdc_jax.models.context_model import ContextModel
from cdc_jax.models.unet import Unet

FAMILIES = ("eps", "x")
DTYPES = ("float32", "bfloat16")  # compute dtypes; params are float32
# Training-only settings that model.json does not record.
_COMPUTE_ONLY = ("remat",)


class CDC(nn.Module):
  """Both released model families; defaults are the eps release
  (docs/model.md §1)."""

  family: str = "eps"
  dim: int = 64
  dim_mults: Sequence[int] = (1, 2, 3, 4, 5, 6)
  context_dim_mults: Sequence[int] = (1, 2, 3, 4)
  # x family only: the context decoder's widths, e.g. (4, 3, 2, 1).
  reverse_context_dim_mults: Sequence[int] | None = None
  hyper_dims_mults: Sequence[int] = (4, 4, 4)
  context_channels: int = 3
  channels: int = 3
  dtype: str = "float32"  # compute dtype, one of DTYPES
  remat: bool = False  # rematerialise the U-Net blocks (training memory)

  def setup(self):
    if self.family not in FAMILIES:
      raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
    dt = _compute_dtype(self.dtype)
    if self.family == "x":
      if self.reverse_context_dim_mults is None:
        raise ValueError("the x family needs reverse_context_dim_mults")
      rev = tuple(self.reverse_context_dim_mults)
      unet_ctx = tuple(reversed(rev))
    else:
      rev = None
      unet_ctx = tuple(self.context_dim_mults)
    self.context_fn = ContextModel(
      dim=self.dim,
      dim_mults=tuple(self.context_dim_mults),
      hyper_dims_mults=tuple(self.hyper_dims_mults),
      reverse_dim_mults=rev,
      channels=self.channels,
      out_channels=self.context_channels,
      dtype=dt,
    )
    self.denoise_fn = Unet(
      dim=self.dim,
      dim_mults=tuple(self.dim_mults),
      context_dim_mults=unet_ctx,
      channels=self.channels,
      context_channels=self.context_channels,
      dtype=dt,
      remat=bool(self.remat),
    )

  # -- geometry (plain attributes: usable on an unbound module) --------------

  @property
  def y_factor(self) -> int:
    """g_a's downsampling: one stride-2 stage per context level (16)."""
    return 2 ** len(self.context_dim_mults)

  @property
  def z_factor(self) -> int:
    """y_factor times h_a's (its first conv keeps the size): 64."""
    return self.y_factor * 2 ** (len(self.hyper_dims_mults) - 1)

  @property
  def downsampling_factor(self) -> int:
    """Image sides must be multiples of this (the codec pads to it)."""
    unet = 2 ** (len(self.dim_mults) - 1)
    return max(self.z_factor, unet)

  @nn.nowrap
  def latent_shapes(self, batch: int, height: int, width: int):
    """Shapes of y and z for [batch, height, width, 3] inputs."""
    for side in (height, width):
      if side % self.downsampling_factor:
        raise ValueError(
          f"image side {side} is not a multiple of "
          f"{self.downsampling_factor}; pad it first"
        )
    cy = self.dim * self.context_dim_mults[-1]
    cz = self.dim * self.hyper_dims_mults[-1]
    fy, fz = self.y_factor, self.z_factor
    return {
      "y": (batch, height // fy, width // fy, cy),
      "z": (batch, height // fz, width // fz, cz),
    }

  # -- methods the trainer, the sampler and the codec apply ------------------

  def __call__(self, x0, time, train: bool = False, rng=None):
    """Context of x0 and one U-Net evaluation at x0 (used to init params)."""
    out = self.context_fn(x0, train=train, rng=rng)
    return self.denoise_fn(x0, time, out["context"]), out

  def context_model(self, x, train: bool = False, rng=None, rate_noise=None):
    """The context model's forward: context maps, bpp, y_hat, z_hat."""
    return self.context_fn(x, train=train, rng=rng, rate_noise=rate_noise)

  def denoise(self, x_t, time, context):
    return self.denoise_fn(x_t, time, context)

  def extra_loss(self):
    return self.context_fn.extra_loss()

  def g_a(self, x):
    return self.context_fn.g_a(x)

  def h_a(self, y):
    return self.context_fn.h_a(y)

  def h_s(self, z_hat):
    return self.context_fn.h_s(z_hat)

  def g_s(self, y_hat):
    return self.context_fn.g_s(y_hat)

  def medians(self):
    return self.context_fn.medians()

  def z_likelihood(self, z_hat):
    return self.context_fn.z_likelihood(z_hat)

  def z_logits_cdf(self, u):
    return self.context_fn.z_logits_cdf(u)


def _compute_dtype(name) -> jnp.dtype:
  try:
    dt = jnp.dtype(name)
  except TypeError:
    dt = None
  if dt is None or dt.name not in DTYPES:
    raise ValueError(f"model dtype must be one of {DTYPES}, got {name!r}")
  return dt


def with_dtype(model: CDC, dtype: str) -> CDC:
  """``model`` computing in ``dtype`` ("float32" or "bfloat16").

  Same params (always float32), e.g. a bf16 decoding model::

    half = with_dtype(model, "bfloat16")
    half.apply({"params": params}, x_t, t, context, method=CDC.denoise)
  """
  return model.clone(dtype=_compute_dtype(dtype).name)


def init_params(model: CDC, rng):
  """Fresh params of ``model`` (jit it, or ``jax.eval_shape`` for shapes)."""
  side = model.downsampling_factor
  x = jnp.zeros((1, side, side, model.channels), jnp.float32)
  t = jnp.zeros((1, 1), jnp.float32)
  return model.init(rng, x, t)["params"]


def from_config(config: Mapping) -> CDC:
  """CDC from a config section or a model.json dict (lists -> tuples, so
  the module stays hashable for jit)."""
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
  return CDC(**kw)


def to_config(config: Mapping) -> dict:
  """A model config (section, dict or ``CDC``) as plain JSON values.

  Training-only compute settings (``remat``) are left out: they change
  neither the params nor the outputs.
  """
  if isinstance(config, CDC):
    names = [f for f in CDC.__dataclass_fields__ if f not in ("parent", "name")]
    config = {k: getattr(config, k) for k in names}
  return {
    k: list(v) if isinstance(v, tuple) else v
    for k, v in config.items()
    if k not in _COMPUTE_ONLY
  }
