"""Building blocks shared by the compressor and the U-Net (docs/model.md §2).

Everything is NHWC. Convolutions use explicit, symmetric PyTorch-style
padding (never Flax ``SAME``, which pads stride-2 convs asymmetrically), and
transposed convolutions reproduce ``torch.nn.ConvTranspose2d`` exactly, so
released PyTorch weights drop in through one mechanical table
(``cdc_jax.convert``).

Parameters are float32 whatever the compute dtype. ``dtype`` is the
compute dtype of convolutions, dense layers and the attention matmuls
(``jnp.bfloat16`` for mixed precision on accelerators): inputs and kernels
are cast to it, and activations between layers are stored in it. The
LayerNorm statistics, the attention softmax and its context sum (the
reduction over all positions) are computed in float32. With float32 every
cast is a no-op, so float32 results do not depend on this plumbing.

Initialisers follow PyTorch's defaults (uniform in +-1/sqrt(fan_in) for
weights and biases), which only matter when training from scratch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_DIMS = ("NHWC", "HWIO", "NHWC")


def _torch_uniform(fan_in: int):
  """PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv(nn.Module):
  """``nn.Conv2d(k, stride, padding)`` with symmetric zero padding.

  Param ``kernel`` is HWIO (torch OIHW transposed (2, 3, 1, 0)).
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, Cin] -> [B, H', W', features]
    k, cin = self.kernel_size, x.shape[-1]
    init = _torch_uniform(cin * k * k)
    kernel = self.param("kernel", init, (k, k, cin, self.features))
    p = self.padding
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      window_strides=(self.stride, self.stride),
      padding=((p, p), (p, p)),
      dimension_numbers=_DIMS,
    )
    if self.use_bias:
      bias = self.param("bias", init, (self.features,))
      y = y + bias.astype(self.dtype)
    return y


class ConvTranspose(nn.Module):
  """``nn.ConvTranspose2d(k, stride, padding, output_padding)``, exactly.

  Implemented as a stride-1 convolution of the input dilated by ``stride``
  with padding ``(k-1-p, k-1-p+output_padding)`` per side. Param ``kernel``
  is HWIO and holds the *spatially flipped* torch weight:
  ``w.transpose(2, 3, 0, 1)[::-1, ::-1]`` for torch's (in, out, kh, kw).
  """

  features: int
  kernel_size: int
  stride: int
  padding: int
  output_padding: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, Cin] -> [B, s*H, s*W, features]
    k, cin = self.kernel_size, x.shape[-1]
    # torch computes fan_in of a transposed conv from weight.size(1) (= out).
    init = _torch_uniform(self.features * k * k)
    kernel = self.param("kernel", init, (k, k, cin, self.features))
    lo = k - 1 - self.padding
    hi = lo + self.output_padding
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      window_strides=(1, 1),
      padding=((lo, hi), (lo, hi)),
      lhs_dilation=(self.stride, self.stride),
      dimension_numbers=_DIMS,
    )
    bias = self.param("bias", init, (self.features,))
    return y + bias.astype(self.dtype)


class Dense(nn.Module):
  """``nn.Linear``; param ``kernel`` is (in, out) = torch weight transposed."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = _torch_uniform(x.shape[-1])
    kernel = self.param("kernel", init, (x.shape[-1], self.features))
    bias = self.param("bias", init, (self.features,))
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class LayerNorm(nn.Module):
  """Channel LayerNorm of the original (docs/model.md §2.3): biased variance,
  eps 1e-5.

  Computed in float32 as mean((x - mean)^2), not E[x^2] - E[x]^2.
  """

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(x.dtype)


class Block(nn.Module):
  """Conv (7x7 if ``large`` else 3x3) -> LayerNorm -> ReLU
  (docs/model.md §2.4)."""

  features: int
  large: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = 7 if self.large else 3
    x = Conv(self.features, k, padding=k // 2, dtype=self.dtype, name="conv")(x)
    x = LayerNorm(name="norm")(x)
    return nn.relu(x)


class ResnetBlock(nn.Module):
  """Two Blocks, optional time conditioning, 1x1 residual (docs/model.md §2.4).

  Submodule names mirror torch: ``mlp_1`` (Linear after LeakyReLU(0.2)),
  ``block1``, ``block2``, ``res_conv`` (only when in != out).
  """

  features: int
  large: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    h = Block(self.features, self.large, self.dtype, name="block1")(x)
    if temb is not None:
      t = Dense(self.features, self.dtype, name="mlp_1")(
        nn.leaky_relu(temb, 0.2)
      )
      h = h + t[:, None, None, :].astype(h.dtype)
    h = Block(self.features, False, self.dtype, name="block2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, 1, dtype=self.dtype, name="res_conv")(x)
    return h + x.astype(h.dtype)


class LinearAttention(nn.Module):
  """``Residual(PreNorm(LinearAttention(dim)))`` of the original
  (docs/model.md §2.5).

  One head of width C; q scaled by C^-1/2 and *not* softmax-normalised; k
  softmax-normalised over the spatial positions. Returns x + attn(LN(x)).
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C]
    b, h, w, c = x.shape
    y = LayerNorm(name="norm")(x)
    qkv = Conv(3 * c, 1, use_bias=False, dtype=self.dtype, name="to_qkv")(y)
    qkv = qkv.reshape(b, h * w, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)  # [B, N, C] each
    q = q * (c**-0.5)
    k = jax.nn.softmax(k.astype(jnp.float32), axis=1).astype(self.dtype)
    # The sum over all N positions accumulates in float32.
    context = jnp.einsum(
      "bnd,bne->bde", k, v, preferred_element_type=jnp.float32
    ).astype(self.dtype)  # [B, C, C]
    out = jnp.einsum("bde,bnd->bne", context, q).reshape(b, h, w, c)
    out = Conv(c, 1, dtype=self.dtype, name="to_out")(out)
    return x + out.astype(x.dtype)


class Downsample(nn.Module):
  """3x3 stride-2 conv, padding 1: output ceil(H/2) (docs/model.md §2.2)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return Conv(self.features, 3, 2, 1, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """4x4 stride-2 transposed conv, padding 1: exactly doubles H, W."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return ConvTranspose(self.features, 4, 2, 1, dtype=self.dtype, name="conv")(
      x
    )
