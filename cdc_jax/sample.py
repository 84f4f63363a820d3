"""Jitted DDIM decode loops (eta = 0), one compile per (shape, steps).

The loop runs the S sampling steps from i = S-1 down to 0 (spec §6.3) as
a ``lax.fori_loop`` over a window [start, stop) of the (reversed) per-step
tables: the U-Net is traced once, whatever S is. Decoding always uses eval
semantics (rounded latents) and an explicit initial noise x_T, which the
codec draws as ``gamma * N(0, I)`` from the seed stored in the file.

Progress: without a ``progress`` function a decode is one call of the
loop over all S steps. With one, the host runs the same compiled loop
window by window (``start`` and ``stop`` are arguments, so nothing
recompiles and the floats are the same) and reports after each window.
Each window costs a host round trip and a fresh working memory (~4 % of a
step for the full models on CPU), so windows last about
``REPORT_EVERY_S``: the first is one step (it may include the compile),
the next one step (to time it), then as many steps as fit, timed anew by
each window and remembered per (shape, S) for the next decode.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import diffusion
from cdc_jax.models.cdc import CDC

Progress = Callable[[int, int], object]  # progress(done, total)
REPORT_EVERY_S = 10.0  # a progress window's target duration (seconds)


class Sampler:
  """Decode loops bound to one model; jitted functions are cached by jax.

  ``family`` and the schedule come from the model; ``steps`` changes the
  shapes of the per-step tables, so each S compiles once. The decode
  methods take ``progress``: called on the host as ``progress(done,
  total)`` after each window of steps (the last call is ``(total,
  total)``); an exception it raises stops the decode and propagates.
  """

  def __init__(self, model: CDC, schedule: diffusion.Schedule):
    self.model = model
    self.schedule = schedule
    self.family = model.family
    self._steps = jax.jit(self._steps_impl)
    self._step_s: dict = {}  # (x shape, S) -> seconds per step, measured
    self._g_s = jax.jit(self._g_s_impl)
    self._from_image = jax.jit(self._from_image_impl)

  def tables(self, steps: int):
    t = diffusion.ddim_tables(self.schedule, steps, self.family)
    # Reverse once on the host: the loop then runs i = S-1 .. 0.
    return tuple(
      jnp.asarray(a[::-1].copy()) for a in (t.abar, t.abar_prev, t.time)
    )

  def _steps_impl(self, params, context, x, abar, abar_prev, time, start, stop):
    """Steps ``start`` .. ``stop - 1`` of the reversed tables from x."""
    model, family = self.model, self.family
    b = x.shape[0]

    def step(i, x):
      out = model.apply(
        {"params": params},
        x,
        jnp.full((b, 1), time[i], jnp.float32),
        context,
        method=CDC.denoise,
      )
      return diffusion.ddim_step(x, out, abar[i], abar_prev[i], family)

    return jax.lax.fori_loop(start, stop, step, x)

  def _g_s_impl(self, params, y_hat):
    return self.model.apply({"params": params}, y_hat, method=CDC.g_s)

  def _from_image_impl(self, params, x, x_init, abar, abar_prev, time):
    ctx = self.model.apply({"params": params}, x, method=CDC.context_model)
    s = abar.shape[0]
    args = (params, ctx["context"], x_init, abar, abar_prev, time)
    return self._steps_impl(*args, 0, s), ctx["bpp"]

  def _loop(self, params, context, x, steps: int, progress):
    """All S steps from x_T: one call, or windows that report progress."""
    tables = self.tables(steps)
    run = self._steps
    if progress is None:
      return run(params, context, x, *tables, np.int32(0), np.int32(steps))
    key = (x.shape, steps)
    done, window = 0, self._window(key)
    while done < steps:
      stop = min(steps, done + window)
      t = time.perf_counter()
      x = run(params, context, x, *tables, np.int32(done), np.int32(stop))
      x = jax.block_until_ready(x)
      if done or key in self._step_s:  # not a first call with a compile
        self._step_s[key] = (time.perf_counter() - t) / (stop - done)
      done = stop
      progress(done, steps)
      window = self._window(key)
    return x

  def _window(self, key) -> int:
    """Steps in the next progress window (one while untimed)."""
    per_step = self._step_s.get(key)
    if per_step is None:
      return 1
    return max(1, int(REPORT_EVERY_S / max(per_step, 1e-6)))

  def decode_context(self, params, context, x_init, steps: int, progress=None):
    """DDIM from given context maps; returns x_0 in (about) [-1, 1]."""
    return self._loop(params, context, x_init, steps, progress)

  def decode_latent(self, params, y_hat, x_init, steps: int, progress=None):
    """Context decoder g_s on the quantised latent, then DDIM."""
    context = self._g_s(params, y_hat)
    return self._loop(params, context, x_init, steps, progress)

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
