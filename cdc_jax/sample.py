"""Jitted decode loops, one compile per (shape, steps, sampler).

The loop runs the S steps of a sampler (``cdc_jax.samplers``: DDIM, the
original's, from i = S-1 down to 0 as docs/model.md §9.1, or
DPM-Solver++(2M)) as a ``lax.fori_loop`` over a window [start, stop) of
its per-step tables, first step first, carrying the sampler's state (x_t,
and the solver's previous x0 prediction): the U-Net is traced once,
whatever S is.
Decoding always uses eval semantics (rounded latents) and an explicit
initial noise x_T, which the codec draws as ``gamma * N(0, I)`` from the
seed stored in the file.

Progress: without a ``progress`` function a decode is one call of the
loop over all S steps. With one, the host runs the same compiled loop
window by window (``start`` and ``stop`` are arguments, so nothing
recompiles and the floats are the same) and reports after each window.
Each window costs a host round trip and a fresh working memory (~4 % of a
step for the full models on CPU), so windows last about
``REPORT_EVERY_S``: the first is one step (it may include the compile),
the next one step (to time it), then as many steps as fit, timed anew by
each window and remembered per (shape, S, sampler) for the next decode.
The window boundaries only split the fori_loop: the state carries all a
sampler needs across them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import diffusion, samplers
from cdc_jax.models.cdc import CDC

Progress = Callable[[int, int], object]  # progress(done, total)
REPORT_EVERY_S = 10.0  # a progress window's target duration (seconds)


class Sampler:
  """Decode loops bound to one model; jitted functions are cached by jax.

  ``family`` and the schedule come from the model; ``steps`` changes the
  shapes of the per-step tables, so each (S, sampler) compiles once. The
  decode methods take ``sampler`` (a name in ``samplers.SAMPLERS``,
  default DDIM) and ``progress``: called on the host as ``progress(done,
  total)`` after each window of steps (the last call is ``(total,
  total)``); an exception it raises stops the decode and propagates.
  ``student`` (a ``samplers.Student``): the params are a distilled
  student's, whose sampler is ``self.student_sampler`` at its own S.
  """

  def __init__(
    self,
    model: CDC,
    schedule: diffusion.Schedule,
    student: samplers.Student | None = None,
  ):
    self.model = model
    self.schedule = schedule
    self.family = model.family
    self.student = student
    self._steps = jax.jit(self._steps_impl, static_argnames="sampler")
    self._step_s: dict = {}  # (x shape, S, sampler) -> seconds per step
    self._g_s = jax.jit(self._g_s_impl)
    self._from_image = jax.jit(self._from_image_impl, static_argnames="sampler")

  def tables(self, steps: int, sampler: str = samplers.DEFAULT_SAMPLER):
    """``sampler``'s per-step tables (``samplers.tables``) on the device,
    first step first; for DDIM the NamedTuple (abar, abar_prev, time)."""
    t = samplers.tables(
      self.schedule, steps, self.family, sampler, student=self.student
    )
    return type(t)(*(jnp.asarray(a) for a in t))

  @property
  def student_sampler(self) -> str | None:
    """The student's sampler name (None for a model that is not one)."""
    if self.student is None:
      return None
    return samplers.student_sampler(self.student.parameterisation)

  def _steps_impl(self, params, context, state, tables, start, stop, sampler):
    """Steps ``start`` .. ``stop - 1`` of ``tables`` from ``state``."""
    model, family = self.model, self.family
    b = state[0].shape[0]

    def step(i, state):
      row = jax.tree.map(lambda a: a[i], tables)
      out = model.apply(
        {"params": params},
        state[0],
        jnp.full((b, 1), row.time, jnp.float32),
        context,
        method=CDC.denoise,
      )
      return samplers.step(sampler, family, state, out, row)

    return jax.lax.fori_loop(start, stop, step, state)

  def _g_s_impl(self, params, y_hat):
    return self.model.apply({"params": params}, y_hat, method=CDC.g_s)

  def _from_image_impl(self, params, x, x_init, tables, sampler):
    ctx = self.model.apply({"params": params}, x, method=CDC.context_model)
    s = tables.time.shape[0]
    state = samplers.init_state(sampler, x_init)
    args = (params, ctx["context"], state, tables, 0, s, sampler)
    return self._steps_impl(*args)[0], ctx["bpp"]

  def _loop(self, params, context, x, steps: int, progress, sampler: str):
    """All S steps from x_T: one call, or windows that report progress."""
    tables = self.tables(steps, sampler)
    state = samplers.init_state(sampler, x)

    def run(state, start, stop):
      args = (params, context, state, tables, np.int32(start), np.int32(stop))
      return self._steps(*args, sampler=sampler)

    if progress is None:
      return run(state, 0, steps)[0]
    key = (x.shape, steps, sampler)
    done, window = 0, self._window(key)
    while done < steps:
      stop = min(steps, done + window)
      t = time.perf_counter()
      state = jax.block_until_ready(run(state, done, stop))
      if done or key in self._step_s:  # not a first call with a compile
        self._step_s[key] = (time.perf_counter() - t) / (stop - done)
      done = stop
      progress(done, steps)
      window = self._window(key)
    return state[0]

  def _window(self, key) -> int:
    """Steps in the next progress window (one while untimed)."""
    per_step = self._step_s.get(key)
    if per_step is None:
      return 1
    return max(1, int(REPORT_EVERY_S / max(per_step, 1e-6)))

  def decode_context(
    self, params, context, x_init, steps: int, progress=None, *, sampler="ddim"
  ):
    """The sampler from given context maps; x_0 in (about) [-1, 1]."""
    return self._loop(params, context, x_init, steps, progress, sampler)

  def decode_latent(
    self, params, y_hat, x_init, steps: int, progress=None, *, sampler="ddim"
  ):
    """Context decoder g_s on the quantised latent, then the sampler."""
    context = self._g_s(params, y_hat)
    return self._loop(params, context, x_init, steps, progress, sampler)

  def reconstruct(self, params, x, x_init, steps: int, *, sampler="ddim"):
    """Image [-1,1] -> (reconstruction, estimated bpp [B]), eval mode."""
    tables = self.tables(steps, sampler)
    return self._from_image(params, x, x_init, tables, sampler=sampler)


def initial_noise(seed: int, shape, gamma: float):
  """x_T = gamma * N(0, I) from a 64-bit seed (stored in the bitstream).

  The low 32 bits make the key, the high 32 bits are folded in, so every
  64-bit seed gives its own noise.
  """
  seed = int(seed)
  key = jax.random.key(np.uint32(seed & 0xFFFFFFFF))
  key = jax.random.fold_in(key, np.uint32((seed >> 32) & 0xFFFFFFFF))
  return gamma * jax.random.normal(key, shape, jnp.float32)
