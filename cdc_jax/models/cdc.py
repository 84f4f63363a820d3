"""CDC: a compressor ("context_fn") conditioning a U-Net ("denoise_fn").

::

  image x0 --context_fn--> (bpp, y_hat, z_hat, context maps c0..c3)
  x_t, t, context --denoise_fn--> eps-hat (family "eps") / x0-hat ("x")

Two released families (spec §0): ``eps`` (BigCompressor, 3-channel context,
linear T=20000, L1 on eps) and ``x`` (ResnetCompressor, 64-channel context,
cosine T=8193, min(SNR,5)-weighted L2 on x0). The param tree is
``{"context_fn": ..., "denoise_fn": ...}``, mirroring the torch state_dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cdc_jax.models.analysis import Compressor
from cdc_jax.models.unet import Unet

FAMILIES = ("eps", "x")


class CDC(nn.Module):
  """Both released model families; defaults are the eps release (spec §0)."""

  family: str = "eps"
  dim: int = 64
  dim_mults: Sequence[int] = (1, 2, 3, 4, 5, 6)
  context_dim_mults: Sequence[int] = (1, 2, 3, 4)
  # x family only: the context decoder's widths, e.g. (4, 3, 2, 1).
  reverse_context_dim_mults: Sequence[int] | None = None
  hyper_dims_mults: Sequence[int] = (4, 4, 4)
  context_channels: int = 3
  channels: int = 3
  dtype: str = "float32"

  def setup(self):
    if self.family not in FAMILIES:
      raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
    dt = jnp.dtype(self.dtype)
    if self.family == "x":
      if self.reverse_context_dim_mults is None:
        raise ValueError("the x family needs reverse_context_dim_mults")
      rev = tuple(self.reverse_context_dim_mults)
      unet_ctx = tuple(reversed(rev))
    else:
      rev = None
      unet_ctx = tuple(self.context_dim_mults)
    self.context_fn = Compressor(
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
    )

  def __call__(self, x0, time, train: bool = False, rng=None):
    """Context of x0 and one U-Net evaluation at x0 (used to init params)."""
    ctx = self.context_fn(x0, train=train, rng=rng)
    return self.denoise_fn(x0, time, ctx["output"]), ctx

  def compress_context(self, x, train: bool = False, rng=None, rate_noise=None):
    return self.context_fn(x, train=train, rng=rng, rate_noise=rate_noise)

  def denoise(self, x_t, time, context):
    return self.denoise_fn(x_t, time, context)

  def extra_loss(self):
    return self.context_fn.extra_loss()

  # Pieces of the compressor that the codec calls one at a time.
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

  def z_logits_cdf(self, u):
    return self.context_fn.z_logits_cdf(u)


def from_config(config: Mapping) -> CDC:
  """CDC from a config section or a model.json dict (lists -> tuples, so
  the module stays hashable for jit)."""
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
  return CDC(**kw)
