"""Entropy models of CDC (docs/model.md §4).

* ``FactorizedPrior``: the per-channel learned CDF of the hyper-latent z
  (Balle et al. 2018, appendix 6.1; "FlexiblePrior" in the original), with
  learned medians trained by an extra loss.
* ``gaussian_likelihood``: the conditional Gaussian of the latent y.
* ``quantize``: every rounding of CDC, in one function (CompressAI's
  modes): training noise, the decoders' rounded values, the coded symbols.
* ``ste_round`` and ``lower_bound``: the custom gradients of the original.

Likelihoods are probabilities of the unit-width bin around a value, floored
at 1e-9 by ``lower_bound`` as in the original.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LIKELIHOOD_BOUND = 1e-9


def ste_round(x):
  """Round half to even in the forward pass, identity gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


# Symbols are int32; float32 cannot hold 2**31 - 1 exactly.
_SYMBOL_LIMIT = 2.0**31 - 128


def quantize(x, mode: str, offset=None, noise=None):
  """Quantisation of a latent about ``offset`` (medians for z, mu for y).

  Modes:
    "noise": ``x + noise`` (the training rate term's U(-0.5, 0.5) proxy;
      ``offset`` unused).
    "dequantize": ``round(x - offset) + offset`` with an identity gradient
      (what the decoders see, in training and at test time).
    "symbols": ``round(x - offset)`` as int32, clipped to the int32 range
      (what the range coder codes; ``y_hat = symbols + offset``).
  Rounding is half to even, as the original's ``torch.round``.
  """
  if mode == "noise":
    return x + noise
  off = 0.0 if offset is None else offset
  if mode == "dequantize":
    return ste_round(x - off) + off
  if mode == "symbols":
    r = jnp.round(x - off)
    return jnp.clip(r, -_SYMBOL_LIMIT, _SYMBOL_LIMIT).astype(jnp.int32)
  raise ValueError(f"unknown quantize mode {mode!r}")


@jax.custom_vjp
def lower_bound(x, bound):
  """max(x, bound); the gradient passes where x >= bound or where it is < 0.

  Negative incoming gradients push x up towards the feasible region, so they
  are kept even below the bound (the original's ``LowerBound``).
  """
  return jnp.maximum(x, bound)


def _lower_bound_fwd(x, bound):
  return jnp.maximum(x, bound), (x, bound)


def _lower_bound_bwd(res, g):
  x, bound = res
  pass_through = (x >= bound) | (g < 0)
  return jnp.where(pass_through, g, 0.0).astype(x.dtype), jnp.zeros_like(bound)


lower_bound.defvjp(_lower_bound_fwd, _lower_bound_bwd)


def _std_normal_cdf(v):
  return 0.5 * jax.scipy.special.erfc(-v * (2.0**-0.5))


def gaussian_likelihood(y, mean, scale):
  """P(bin of width 1 around y) under N(mean, scale), floored at 1e-9."""
  v = jnp.abs(y - mean)
  p = _std_normal_cdf((0.5 - v) / scale) - _std_normal_cdf((-0.5 - v) / scale)
  return lower_bound(p, jnp.asarray(LIKELIHOOD_BOUND, p.dtype))


class FactorizedPrior(nn.Module):
  """Per-channel flexible density; params mirror the original's shapes.

  ``affine_{k}_weight`` (C, in, out), ``affine_{k}_bias`` (C, out) for the
  filter chain 1-3-3-3-1, ``a_{k}`` (C, 3) and ``medians`` (C,).
  """

  channels: int
  filters: Sequence[int] = (3, 3, 3)
  init_scale: float = 10.0

  def setup(self):
    chain = (1, *self.filters, 1)
    scale = self.init_scale ** (1.0 / (len(self.filters) + 1))
    c = self.channels
    weights, biases, factors = [], [], []
    for k in range(len(chain) - 1):
      fin, fout = chain[k], chain[k + 1]
      value = math.log(math.expm1(1.0 / scale / fout))
      weights.append(
        self.param(
          f"affine_{k}_weight", nn.initializers.constant(value), (c, fin, fout)
        )
      )
      biases.append(
        self.param(
          f"affine_{k}_bias",
          lambda key, shape: jax.random.uniform(
            key, shape, minval=-0.5, maxval=0.5
          ),
          (c, fout),
        )
      )
      if k < len(chain) - 2:
        factors.append(self.param(f"a_{k}", nn.initializers.zeros, (c, fout)))
    self.weights, self.biases, self.factors = weights, biases, factors
    self.medians = self.param("medians", nn.initializers.zeros, (c,))

  def logits_cdf(self, u, params_stop_gradient: bool = False):
    """CDF logits for values u [..., C] (elementwise per channel)."""
    ws, bs, fs = self.weights, self.biases, self.factors
    if params_stop_gradient:
      sg = jax.lax.stop_gradient
      ws, bs, fs = [sg(w) for w in ws], [sg(b) for b in bs], [sg(f) for f in fs]
    h = u[..., None]  # [..., C, 1]
    for k, (w, b) in enumerate(zip(ws, bs, strict=True)):
      h = jnp.einsum("...ci,cio->...co", h, jax.nn.softplus(w)) + b
      if k < len(fs):
        h = h + jnp.tanh(fs[k]) * jnp.tanh(h)
    return h[..., 0]

  def likelihood(self, z):
    """P(bin of width 1 around z), z [..., C], floored at 1e-9."""
    lower = self.logits_cdf(z - 0.5)
    upper = self.logits_cdf(z + 0.5)
    sign = -jax.lax.stop_gradient(jnp.sign(lower + upper))
    p = jnp.abs(jax.nn.sigmoid(sign * upper) - jax.nn.sigmoid(sign * lower))
    return lower_bound(p, jnp.asarray(LIKELIHOOD_BOUND, p.dtype))

  def extra_loss(self):
    """sum_c |logit_c(median_c)|, gradient to the medians only."""
    return jnp.sum(jnp.abs(self.logits_cdf(self.medians, True)))

  def __call__(self, z):
    return self.likelihood(z)
