"""The context model ("context_fn"): g_a, h_a, h_s, entropy models, g_s.

Data flow (docs/model.md §3.3; eps shown, x differs in the context width)::

  x [B,H,W,3] --g_a--> y [B,H/16,W/16,256] --h_a--> z [B,H/64,W/64,256]
  z_hat = round(z - medians) + medians               (factorized prior)
  (mu, sigma_raw) = h_s(z_hat); sigma = max(sigma_raw, 0.1)
  y_hat = round(y - sg(mu)) + sg(mu)                 (conditional Gaussian)
  context = g_s(y_hat) = [c0 @ H, c1 @ H/2, c2 @ H/4, c3 @ H/8]

The original calls it a "compressor"; it is the part of CDC that produces
the bits and the U-Net's conditioning. ``ContextModel`` covers both
released classes: ``BigCompressor`` (eps; its
torch ModuleLists hold an Identity "VBR slot" at index 1, so Down/Upsample
sit at index 2) and ``ResnetCompressor`` (x; ``reverse_dim_mults`` given,
Down/Upsample at index 1). Submodule names mirror the torch keys with "."
replaced by "_" (``enc.0.2.conv`` -> ``enc_0_2/conv``).

Precision: ``dtype`` is the compute dtype of g_a and g_s only. The
hyperprior transforms h_a and h_s, the entropy models, the likelihoods and
the rate always run in float32 (they are cheap, at 1/16 and 1/64 of the
resolution), so the coded symbols and the coding tables' scale indices do
not depend on the precision the decoder runs in; y leaves g_a as float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax.models import layers
from cdc_jax.models.entropy import (
  FactorizedPrior,
  gaussian_likelihood,
  quantize,
)

SCALE_MIN = 0.1  # the original clamps the Gaussian scale at 0.1
# h_s: transposed convs (kernel, stride, padding, output padding) up to
# y's resolution, then one conv (kernel, stride, padding) to (mu, sigma).
H_S_UP = (5, 2, 2, 1)
H_S_OUT = (3, 1, 1)


def h_s_layers(context_params) -> list[tuple]:
  """h_s's layers as ``(kernel, bias, input dilation, (pad lo, pad hi))``:
  each is ``lax.conv_general_dilated`` of the input dilated and padded so
  (``layers.ConvTranspose``'s form; stride-1 convs have dilation 1). The
  leaky ReLU(0.2) follows every layer but the last, whose output channels
  are mu, then sigma_raw. For exact re-implementations of h_s
  (``cdc_jax.coding.scale_index``)."""
  n = len([k for k in context_params if k.startswith("hyper_dec_")])
  out = []
  for i in range(n):
    p = context_params[f"hyper_dec_{i}_0"]
    if i == n - 1:
      k, _, pad = H_S_OUT
      geometry = (1, (pad, pad))
    else:
      k, s, pad, op = H_S_UP
      geometry = (s, (k - 1 - pad, k - 1 - pad + op))
    out.append((np.asarray(p["kernel"]), np.asarray(p["bias"]), *geometry))
  return out


class ContextModel(nn.Module):
  """Analysis transform, hyperprior and context decoder of CDC."""

  dim: int = 64
  dim_mults: Sequence[int] = (1, 2, 3, 4)
  hyper_dims_mults: Sequence[int] = (4, 4, 4)
  reverse_dim_mults: Sequence[int] | None = None  # x family: (4, 3, 2, 1)
  channels: int = 3
  out_channels: int = 3
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    d, dt, f32 = self.dim, self.dtype, jnp.float32
    dims = [self.channels, *(d * m for m in self.dim_mults)]
    # eps (BigCompressor) keeps an Identity at index 1 of each ModuleList.
    slot = "2" if self.reverse_dim_mults is None else "1"
    if self.reverse_dim_mults is None:
      rdims = list(reversed([self.out_channels, *dims[1:]]))
    else:
      rdims = [*(d * m for m in self.reverse_dim_mults), self.out_channels]
      if rdims[0] != dims[-1]:
        raise ValueError(
          f"reverse_dim_mults must start at the latent width {dims[-1]}, "
          f"got {rdims[0]}"
        )
    hdims = [dims[-1], *(d * m for m in self.hyper_dims_mults)]
    rhdims = list(reversed([2 * dims[-1], *hdims[1:]]))

    enc = []
    for i, (_, dout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
      enc.append(
        {
          "0": layers.ResnetBlock(dout, large=i == 0, dtype=dt),
          slot: layers.Downsample(dout, dtype=dt),
        }
      )
    self.enc = enc

    dec = []
    n = len(rdims) - 1
    for i, (din, dout) in enumerate(zip(rdims[:-1], rdims[1:], strict=True)):
      last = i == n - 1
      dec.append(
        {
          "0": layers.ResnetBlock(din if last else dout, dtype=dt),
          slot: layers.Upsample(dout, dtype=dt),
        }
      )
    self.dec = dec

    hyper_enc = []
    for i, dout in enumerate(hdims[1:]):
      k, s, p = (3, 1, 1) if i == 0 else (5, 2, 2)
      hyper_enc.append({"0": layers.Conv(dout, k, s, p, dtype=f32)})
    self.hyper_enc = hyper_enc

    hyper_dec = []
    for i, dout in enumerate(rhdims[1:]):
      if i == len(rhdims) - 2:
        mod = layers.Conv(dout, *H_S_OUT, dtype=f32)
      else:
        k, s, p, op = H_S_UP
        mod = layers.ConvTranspose(dout, k, s, p, output_padding=op, dtype=f32)
      hyper_dec.append({"0": mod})
    self.hyper_dec = hyper_dec

    self.prior = FactorizedPrior(hdims[-1])
    self._slot = slot

  # -- transforms ------------------------------------------------------------

  def g_a(self, x):  # [B, H, W, 3] -> y [B, H/16, W/16, C]
    for stage in self.enc:
      x = stage[self._slot](stage["0"](x))
    return x.astype(jnp.float32)

  def h_a(self, y):  # y -> z [B, H/64, W/64, C]
    for i, stage in enumerate(self.hyper_enc):
      y = stage["0"](y)
      if i < len(self.hyper_enc) - 1:
        y = nn.leaky_relu(y, 0.2)
    return y.astype(jnp.float32)

  def h_s(self, z_hat):  # z_hat -> (mu, sigma), sigma >= 0.1
    h = z_hat
    for i, stage in enumerate(self.hyper_dec):
      h = stage["0"](h)
      if i < len(self.hyper_dec) - 1:
        h = nn.leaky_relu(h, 0.2)
    mean, scale = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.maximum(scale, SCALE_MIN)

  def g_s(self, y_hat):
    """Context decoder: [c0 @ H, c1 @ H/2, c2 @ H/4, c3 @ H/8]."""
    out = []
    h = y_hat
    for stage in self.dec:
      h = stage[self._slot](stage["0"](h))
      out.append(h)
    return out[::-1]

  def medians(self):
    return jax.lax.stop_gradient(self.prior.medians)

  def z_likelihood(self, z_tilde):
    return self.prior(z_tilde)

  def extra_loss(self):
    return self.prior.extra_loss()

  def z_logits_cdf(self, u):
    """Per-channel CDF logits of the hyperprior at u [..., C] (for tables)."""
    return self.prior.logits_cdf(u, params_stop_gradient=True)

  # -- the original's forward ------------------------------------------------

  def __call__(self, x, train: bool = False, rng=None, rate_noise=None):
    """Returns dict(context, bpp [B], y_hat, z_hat, likelihoods).

    ``context`` is the list of context maps (``g_s``), ``likelihoods``
    ``{"y": [B,h,w,C], "z": [B,h',w',C']}`` the bin probabilities the rate
    is computed from. In training mode (``train=True``) the rate term uses
    additive uniform noise U(-0.5, 0.5): ``rate_noise=(u_z, u_y)`` if given
    (parity tests), else drawn from ``rng`` (first for z, then for y, as
    the original). The decoders always see the rounded values.
    """
    b, h, w, _ = x.shape
    y = self.g_a(x)
    z = self.h_a(y)
    z_hat = quantize(z, "dequantize", self.medians())
    mean, scale = self.h_s(z_hat)
    y_hat = quantize(y, "dequantize", jax.lax.stop_gradient(mean))
    if train:
      if rate_noise is None:
        if rng is None:
          raise ValueError("train=True needs an rng (or rate_noise)")
        kz, ky = jax.random.split(rng)
        rate_noise = (
          jax.random.uniform(kz, z.shape, z.dtype, -0.5, 0.5),
          jax.random.uniform(ky, y.shape, y.dtype, -0.5, 0.5),
        )
      z_tilde = quantize(z, "noise", noise=rate_noise[0])
      y_tilde = quantize(y, "noise", noise=rate_noise[1])
    else:
      z_tilde, y_tilde = z_hat, y_hat
    z_likelihoods = self.z_likelihood(z_tilde)
    y_likelihoods = gaussian_likelihood(y_tilde, mean, scale)
    bits = jnp.sum(-jnp.log2(z_likelihoods), axis=(1, 2, 3)) + jnp.sum(
      -jnp.log2(y_likelihoods), axis=(1, 2, 3)
    )
    return {
      "context": self.g_s(y_hat),
      "bpp": bits / (h * w),
      "y_hat": y_hat,
      "z_hat": z_hat,
      "likelihoods": {"y": y_likelihoods, "z": z_likelihoods},
    }
