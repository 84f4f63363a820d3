"""The progressive-distillation target (Salimans & Ho, ICLR 2022).

A student decodes in half its teacher's steps: from x_t, one student DDIM
step to t'' must land where two teacher DDIM steps (t -> t' -> t'') land.
Write x_t = alpha_t x0 + sigma_t eps (alpha^2 = abar, sigma^2 = 1 - abar).
A DDIM step (eta = 0) with an x0 prediction x0_hat is

  x_s = alpha_s x0_hat + sigma_s (x_t - alpha_t x0_hat) / sigma_t,

linear in x0_hat, so the x0 that takes x_t to a given x_s in one step is

  x0_tilde = (x_s - r x_t) / (alpha_s - r alpha_t),  r = sigma_s / sigma_t

(x0_tilde = x_s when s is the end point, sigma_s = 0). The denominator is
positive whenever s is less noisy than t.

The student's output is one of ``PARAMETERISATIONS``, converted from and
to x0 at x_t: ``x0`` itself, ``eps = (x_t - alpha_t x0) / sigma_t``, or
``v = alpha_t eps - sigma_t x0``. Its loss is on x0 with the paper's
truncated-SNR weight ``max(SNR_t, 1)`` (``weight``).

A teacher's x0 prediction is the family's (``teacher_x0``): the x family's
U-Net output clipped to [-1, 1], the eps family's derived from eps
unclipped, as their DDIM decodes use them. The student's step uses its x0
unclipped, so the one step reproduces the two exactly, wherever the
teacher's steps went.

Everything here is pure ``jnp`` on arrays of any shape; ``abar`` values
are scalars or broadcast against them.
"""

from __future__ import annotations

import jax.numpy as jnp

from cdc_jax import diffusion

PARAMETERISATIONS = ("x0", "eps", "v")


def _alpha_sigma(abar):
  abar = jnp.asarray(abar, jnp.float32)
  return jnp.sqrt(abar), jnp.sqrt(jnp.maximum(1.0 - abar, 0.0))


def ddim_from_x0(x_t, x0, abar_t, abar_s):
  """One DDIM step (eta = 0) from t to s with the x0 prediction ``x0``,
  unclipped (``samplers.ddim_step`` clips the x family's)."""
  a_s, s_s = _alpha_sigma(abar_s)
  return a_s * x0 + s_s * diffusion.eps_from_x0(x_t, abar_t, x0)


def target_x0(x_t, x_s, abar_t, abar_s):
  """The x0 whose one DDIM step takes ``x_t`` (at t) to ``x_s`` (at s)."""
  a_t, s_t = _alpha_sigma(abar_t)
  a_s, s_s = _alpha_sigma(abar_s)
  ratio = s_s / s_t
  return (x_s - ratio * x_t) / (a_s - ratio * a_t)


def teacher_x0(model_out, x_t, abar_t, family: str):
  """The teacher's x0 prediction as its family's DDIM decode uses it."""
  if family == "x":
    return jnp.clip(model_out, -1.0, 1.0)
  if family == "eps":
    return diffusion.x0_from_eps(x_t, abar_t, model_out)
  raise ValueError(f"unknown family {family!r}")


def teacher_two_steps(x0_fn, x_t, abar_t, abar_mid, abar_s):
  """x at s after two teacher DDIM steps t -> mid -> s; ``x0_fn(x, abar)``
  is the teacher's x0 prediction at a grid point (``teacher_x0`` of its
  U-Net output there)."""
  x_mid = ddim_from_x0(x_t, x0_fn(x_t, abar_t), abar_t, abar_mid)
  return ddim_from_x0(x_mid, x0_fn(x_mid, abar_mid), abar_mid, abar_s)


def distill_target(x0_fn, x_t, abar_t, abar_mid, abar_s):
  """The student's x0 target at x_t: two teacher steps, solved for the
  one-step x0 (``target_x0``)."""
  x_s = teacher_two_steps(x0_fn, x_t, abar_t, abar_mid, abar_s)
  return target_x0(x_t, x_s, abar_t, abar_s)


def to_output(x_t, x0, abar_t, param: str):
  """The model output of parameterisation ``param`` that means ``x0``."""
  if param == "x0":
    return x0
  eps = diffusion.eps_from_x0(x_t, abar_t, x0)
  if param == "eps":
    return eps
  if param == "v":
    a_t, s_t = _alpha_sigma(abar_t)
    return a_t * eps - s_t * x0
  raise ValueError(f"unknown parameterisation {param!r}; {PARAMETERISATIONS}")


def from_output(x_t, out, abar_t, param: str):
  """The x0 that a model output of parameterisation ``param`` means."""
  if param == "x0":
    return out
  if param == "eps":
    return diffusion.x0_from_eps(x_t, abar_t, out)
  if param == "v":
    a_t, s_t = _alpha_sigma(abar_t)
    return a_t * x_t - s_t * out
  raise ValueError(f"unknown parameterisation {param!r}; {PARAMETERISATIONS}")


def weight(abar_t):
  """Truncated-SNR weight of the x0 loss: max(SNR_t, 1)."""
  abar_t = jnp.asarray(abar_t, jnp.float32)
  return jnp.maximum(abar_t / jnp.maximum(1.0 - abar_t, 1e-20), 1.0)
