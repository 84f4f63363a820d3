"""Jitted DDIM decode loops (eta = 0), one compile per (shape, steps).

The loop is a ``lax.scan`` over the S sampling steps from i = S-1 down to 0
(spec §6.3): the U-Net is traced once, whatever S is. Decoding always uses
eval semantics (rounded latents) and an explicit initial noise x_T, which
the codec draws as ``gamma * N(0, I)`` from the seed stored in the file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import diffusion
from cdc_jax.models.cdc import CDC


class Sampler:
  """Decode loops bound to one model; jitted functions are cached by jax.

  ``family`` and the schedule come from the model; ``steps`` changes the
  shapes of the per-step tables, so each S compiles once.
  """

  def __init__(self, model: CDC, schedule: diffusion.Schedule):
    self.model = model
    self.schedule = schedule
    self.family = model.family
    self._loop = jax.jit(self._loop_impl)
    self._from_latent = jax.jit(self._from_latent_impl)
    self._from_image = jax.jit(self._from_image_impl)

  def tables(self, steps: int):
    t = diffusion.ddim_tables(self.schedule, steps, self.family)
    # Reverse once on the host: the scan then runs i = S-1 .. 0.
    return tuple(
      jnp.asarray(a[::-1].copy()) for a in (t.abar, t.abar_prev, t.time)
    )

  def _loop_impl(self, params, context, x_init, abar, abar_prev, time):
    model, family = self.model, self.family
    b = x_init.shape[0]

    def step(x, per_step):
      a, a_prev, t = per_step
      out = model.apply(
        {"params": params},
        x,
        jnp.full((b, 1), t, jnp.float32),
        context,
        method=CDC.denoise,
      )
      return diffusion.ddim_step(x, out, a, a_prev, family), None

    x, _ = jax.lax.scan(step, x_init, (abar, abar_prev, time))
    return x

  def _from_latent_impl(self, params, y_hat, x_init, abar, abar_prev, time):
    context = self.model.apply({"params": params}, y_hat, method=CDC.g_s)
    return self._loop_impl(params, context, x_init, abar, abar_prev, time)

  def _from_image_impl(self, params, x, x_init, abar, abar_prev, time):
    ctx = self.model.apply({"params": params}, x, method=CDC.context_model)
    out = self._loop_impl(params, ctx["context"], x_init, abar, abar_prev, time)
    return out, ctx["bpp"]

  def decode_context(self, params, context, x_init, steps: int):
    """DDIM from given context maps; returns x_0 in (about) [-1, 1]."""
    return self._loop(params, context, x_init, *self.tables(steps))

  def decode_latent(self, params, y_hat, x_init, steps: int):
    """Context decoder g_s on the quantised latent, then DDIM."""
    return self._from_latent(params, y_hat, x_init, *self.tables(steps))

  def reconstruct(self, params, x, x_init, steps: int):
    """Image [-1,1] -> (reconstruction, estimated bpp [B]), eval mode."""
    return self._from_image(params, x, x_init, *self.tables(steps))


def initial_noise(seed: int, shape, gamma: float):
  """x_T = gamma * N(0, I) from a 64-bit seed (stored in the bitstream).

  The low 32 bits make the key, the high 32 bits are folded in, so every
  64-bit seed gives its own noise.
  """
  seed = int(seed)
  key = jax.random.key(np.uint32(seed & 0xFFFFFFFF))
  key = jax.random.fold_in(key, np.uint32((seed >> 32) & 0xFFFFFFFF))
  return gamma * jax.random.normal(key, shape, jnp.float32)
