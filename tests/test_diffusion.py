"""Tests of cdc_jax.diffusion: schedules, parameterisations, losses (the
samplers' tests are in test_samplers.py).

Expected numbers are the original's (docs/model.md §6, §9), not this port's.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import diffusion

T_EPS, T_X = 20000, 8193


@pytest.fixture(scope="module")
def linear():
  return diffusion.make_schedule("linear", T_EPS)


@pytest.fixture(scope="module")
def cosine():
  return diffusion.make_schedule("cosine", T_X)


# -- schedules (docs/model.md §6) ----------------------------------------------


def test_linear_schedule_values(linear):
  abar = linear.alphas_cumprod
  assert abar.dtype == np.float32 and abar.shape == (T_EPS,)
  assert abar[0] == np.float32(0.999995)
  np.testing.assert_allclose(abar[-1], 4.30412e-05, rtol=1e-5)
  # sqrt(1/abar - 1) at the last step (spec: 152.42).
  np.testing.assert_allclose(np.sqrt(1 / abar[-1] - 1), 152.42, rtol=1e-4)
  np.testing.assert_allclose(linear.betas[[0, -1]], [5e-6, 1e-3], rtol=1e-6)
  assert np.all(np.diff(abar) < 0)


def test_cosine_schedule_values(cosine):
  abar, betas = cosine.alphas_cumprod, cosine.betas
  assert abar.dtype == np.float32 and abar.shape == (T_X,)
  np.testing.assert_allclose(abar[-1], 3.618264e-11, rtol=1e-5)
  np.testing.assert_allclose(abar[-2], 3.61826e-08, rtol=1e-5)
  np.testing.assert_allclose(abar[T_X // 2], 0.49375, rtol=1e-4)
  # Only the last beta is clipped.
  assert betas[-1] == np.float32(0.999)
  np.testing.assert_allclose(betas[-2], 0.75, rtol=1e-5)
  assert np.all(betas[:-1] < 0.999)
  # SNR = abar / (1 - abar): SNR_0 = 209257, <= 5 from t = 2146, <= 1
  # from t = 4064.
  np.testing.assert_allclose(cosine.snr[0], 209257, rtol=1e-5)
  assert np.argmax(cosine.snr <= 5) == 2146
  assert np.argmax(cosine.snr <= 1) == 4064


def test_schedule_buffers_consistent(linear, cosine):
  # float64 math, then float32 (as the original's buffers).
  a64 = np.cumprod(1.0 - np.linspace(5e-6, 1e-3, T_EPS))
  np.testing.assert_allclose(linear.alphas_cumprod, a64, rtol=1e-6)
  np.testing.assert_allclose(
    linear.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - a64), rtol=1e-6
  )
  np.testing.assert_allclose(linear.snr, a64 / (1 - a64), rtol=1e-5)
  for s in (linear, cosine):
    a = s.alphas_cumprod.astype(np.float64)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod, np.sqrt(a), rtol=1e-6)
    np.testing.assert_allclose(
      s.sqrt_alphas_cumprod.astype(np.float64) ** 2
      + s.sqrt_one_minus_alphas_cumprod.astype(np.float64) ** 2,
      1.0,
      atol=1e-6,
    )
  with pytest.raises(ValueError, match="unknown schedule"):
    diffusion.make_schedule("quadratic", 10)


# -- forward process and parameterisations ------------------------------------


def _rand(shape, seed=0, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * (
    scale
  )


def test_q_sample_matches_formula():
  x0 = np.tanh(_rand((3, 4, 4, 3), 0))
  eps = _rand((3, 4, 4, 3), 1)
  abar = np.array([0.9, 0.5, 0.01], np.float32)
  x_t = diffusion.q_sample(x0, np.sqrt(abar), np.sqrt(1 - abar), eps)
  want = (
    np.sqrt(abar)[:, None, None, None] * x0
    + np.sqrt(1 - abar)[:, None, None, None] * eps
  )
  np.testing.assert_allclose(x_t, want, rtol=1e-6, atol=1e-7)


def test_x0_eps_round_trip(cosine):
  x0 = np.tanh(_rand((4, 8, 8, 3), 2))
  eps = _rand((4, 8, 8, 3), 3)
  t = np.array([0, 500, 4096, 8000])
  abar = cosine.alphas_cumprod[t]
  x_t = diffusion.q_sample(x0, np.sqrt(abar), np.sqrt(1 - abar), eps)
  x0_back = diffusion.x0_from_eps(x_t, jnp.asarray(abar), eps)
  eps_back = diffusion.eps_from_x0(x_t, jnp.asarray(abar), x0)
  # Error scales with sqrt(1/abar) (float32 cancellation, benign).
  np.testing.assert_allclose(x0_back, x0, atol=2e-4)
  np.testing.assert_allclose(eps_back, eps, atol=1e-3)
  # Low noise: tight.
  np.testing.assert_allclose(x0_back[:2], x0[:2], atol=1e-5)
  np.testing.assert_allclose(eps_back[2:], eps[2:], atol=1e-5)


# -- losses -------------------------------------------------------------------


def test_loss_weight_is_min_snr_5(cosine):
  snr = jnp.asarray([0.01, 1.0, 4.999, 5.0, 7.0, 209257.0])
  np.testing.assert_allclose(
    diffusion.loss_weight(snr), [0.01, 1.0, 4.999, 5.0, 5.0, 5.0], rtol=1e-6
  )
  w = np.asarray(diffusion.loss_weight(cosine.snr))
  assert np.all(w[:2146] == 5.0) and np.all(w[2146:] < 5.0)


def test_loss_weight_floor_raises_only_low_snr_weights(cosine):
  snr = jnp.asarray([0.0, 0.01, 1.0, 4.999, 7.0])
  np.testing.assert_allclose(
    diffusion.loss_weight(snr, floor=1.0), [1.0, 1.0, 1.0, 4.999, 5.0]
  )
  w = np.asarray(diffusion.loss_weight(cosine.snr, floor=0.0))
  np.testing.assert_array_equal(w, diffusion.loss_weight(cosine.snr))


def test_losses_match_numpy():
  x0, out = _rand((3, 4, 4, 3), 10), _rand((3, 4, 4, 3), 11)
  w = np.array([5.0, 0.5, 0.0], np.float32)
  want = np.mean(w * np.mean((x0 - out) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(
    diffusion.x0_weighted_l2_loss(x0, out, w), want, rtol=1e-6
  )
  np.testing.assert_allclose(
    diffusion.eps_l1_loss(x0, out), np.mean(np.abs(x0 - out)), rtol=1e-6
  )
