"""Diffusion math of CDC as pure functions (docs/model.md §6, §7).

Schedules are computed in float64 NumPy and stored as float32, exactly as
the original registers its ``train_*`` buffers. The decode samplers (DDIM
and an ODE solver) are in ``cdc_jax.samplers``, the jitted loops that
drive them in ``cdc_jax.sample``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

LOSS_WEIGHT_MAX_SNR = 5.0  # x family: weight min(SNR, 5)


def linear_betas(timesteps: int) -> np.ndarray:
  """The eps family's schedule: linspace(s*1e-4, s*0.02, T), s = 1000/T."""
  s = 1000.0 / timesteps
  return np.linspace(s * 1e-4, s * 0.02, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008) -> np.ndarray:
  """The x family's cosine schedule (Nichol & Dhariwal), betas clipped 0.999.

  The grid is written as the original writes it (linspace(0, T+1, T+1) /
  (T+1), i.e. k/T) so the float64 values agree bit for bit.
  """
  n = timesteps + 1
  k = np.linspace(0, n, n, dtype=np.float64)
  f = np.cos(((k / n) + s) / (1 + s) * np.pi * 0.5) ** 2
  abar = f / f[0]
  betas = 1 - (abar[1:] / abar[:-1])
  return np.clip(betas, 0, 0.999)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Float32 schedule arrays of length T, each computed in float64 first
  (the original's ``train_*`` buffers)."""

  betas: np.ndarray
  alphas_cumprod: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  snr: np.ndarray

  @property
  def timesteps(self) -> int:
    return len(self.betas)


def _betas(kind: str, timesteps: int) -> np.ndarray:
  if kind == "linear":
    return linear_betas(timesteps)
  if kind == "cosine":
    return cosine_betas(timesteps)
  raise ValueError(f"unknown schedule {kind!r}; use 'linear' or 'cosine'")


def make_schedule(kind: str, timesteps: int) -> Schedule:
  """``kind`` in {"linear", "cosine"}; float64 math, float32 result."""
  betas = _betas(kind, timesteps)
  abar = np.cumprod(1.0 - betas)
  f32 = lambda a: np.asarray(a, np.float32)
  return Schedule(
    f32(betas),
    f32(abar),
    f32(np.sqrt(abar)),
    f32(np.sqrt(1.0 - abar)),
    f32(abar / (1.0 - abar)),
  )


def reference_buffers(kind: str, timesteps: int) -> dict[str, np.ndarray]:
  """The original's registered ``train_*`` buffers (float64 math -> f32)."""
  betas = _betas(kind, timesteps)
  abar = np.cumprod(1.0 - betas)
  out = {
    "train_betas": betas,
    "train_alphas_cumprod": abar,
    "train_sqrt_alphas_cumprod": np.sqrt(abar),
    "train_sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
    "train_sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
    "train_sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
  }
  if kind == "cosine":
    out["train_snr"] = abar / (1 - abar)
  return {k: v.astype(np.float32) for k, v in out.items()}


# -- forward process and parameterisations ------------------------------------


def _bcast(a, x):
  return jnp.reshape(a, (-1,) + (1,) * (x.ndim - 1))


def q_sample(x0, sqrt_abar_t, sqrt_one_minus_abar_t, noise):
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; coefficients [B]."""
  return (
    _bcast(sqrt_abar_t, x0) * x0 + _bcast(sqrt_one_minus_abar_t, x0) * noise
  )


def x0_from_eps(x_t, abar, eps):
  """sqrt(1/abar) x_t - sqrt(1/abar - 1) eps."""
  return (
    _bcast(jnp.sqrt(1.0 / abar), x_t) * x_t
    - _bcast(jnp.sqrt(1.0 / abar - 1.0), x_t) * eps
  )


def eps_from_x0(x_t, abar, x0):
  """(sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1)."""
  return (_bcast(jnp.sqrt(1.0 / abar), x_t) * x_t - x0) / _bcast(
    jnp.sqrt(1.0 / abar - 1.0), x_t
  )


def loss_weight(snr, min_snr: float = LOSS_WEIGHT_MAX_SNR, floor: float = 0.0):
  """The x family's per-sample weight: min(SNR, 5) (the original), raised
  to at least ``floor`` (a deviation, 0 = off: the original's weight is
  ~0 at high noise, where only the context can tell x0)."""
  w = jnp.minimum(snr, min_snr)
  return jnp.maximum(w, floor) if floor else w


def eps_l1_loss(eps, eps_hat):
  """The eps family's loss: mean |eps - eps_hat| over all elements."""
  return jnp.mean(jnp.abs(eps - eps_hat))


def eps_loss_weight(snr, floor: float):
  """The eps family's per-sample weight under ``floor`` (a deviation):
  max(1, floor / sqrt(SNR)).

  An eps error d is an x0 error d / sqrt(SNR), so the original's L1 on
  eps weighs x0 errors by sqrt(SNR), ~0 at high noise (the x family's
  problem too); this raises that x0-space weight to at least ``floor``.
  """
  return jnp.maximum(1.0, floor / jnp.sqrt(snr))


def eps_weighted_l1_loss(eps, eps_hat, weight):
  """mean_b w_b * mean_chw |eps - eps_hat| (``eps_l1_loss`` at w = 1)."""
  per = jnp.mean(jnp.abs(eps - eps_hat), axis=tuple(range(1, eps.ndim)))
  return jnp.mean(weight * per)


def x0_weighted_l2_loss(x0, x0_hat, weight):
  """The x family's loss: mean_b w_b * mean_chw (x0 - x0_hat)^2."""
  per = jnp.mean(jnp.square(x0 - x0_hat), axis=tuple(range(1, x0.ndim)))
  return jnp.mean(weight * per)
