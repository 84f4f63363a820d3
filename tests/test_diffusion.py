"""Tests of cdc_jax.diffusion: schedules, parameterisations, DDIM, losses.

Expected numbers are the original's (spec §6.1, §6.3), not this port's.
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


# -- schedules (spec §6.1) ----------------------------------------------------


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


# -- sampling indices and DDIM tables (spec §6.3) ------------------------------


@pytest.mark.parametrize("steps", [2, 3, 5, 17, 65])
@pytest.mark.parametrize("family,timesteps", [("eps", T_EPS), ("x", T_X)])
def test_sample_indices(family, timesteps, steps):
  idx = diffusion.sample_indices(timesteps, steps, family)
  want = np.floor(np.linspace(0, timesteps - 1, steps, dtype=np.float64))
  np.testing.assert_array_equal(idx, want.astype(np.int64))
  assert idx[0] == 0 and idx[-1] == timesteps - 1


def test_sample_indices_exact_values():
  # T = 8193: S = 2^k + 1 gives integer strides (65 -> 128, 17 -> 512).
  np.testing.assert_array_equal(
    diffusion.sample_indices(T_X, 65, "x"), 128 * np.arange(65)
  )
  np.testing.assert_array_equal(
    diffusion.sample_indices(T_X, 17, "x"), 512 * np.arange(17)
  )
  np.testing.assert_array_equal(
    diffusion.sample_indices(T_EPS, 5, "eps"), [0, 4999, 9999, 14999, 19999]
  )
  # S = 1: x jumps to the last index, eps has no special case.
  np.testing.assert_array_equal(
    diffusion.sample_indices(T_X, 1, "x"), [T_X - 1]
  )
  np.testing.assert_array_equal(diffusion.sample_indices(T_EPS, 1, "eps"), [0])
  with pytest.raises(ValueError):
    diffusion.sample_indices(T_X, 0, "x")


def test_ddim_tables_eps_time_is_index_over_steps(linear):
  s = 200
  t = diffusion.ddim_tables(linear, s, "eps")
  idx = diffusion.sample_indices(T_EPS, s, "eps")
  np.testing.assert_array_equal(t.abar, linear.alphas_cumprod[idx])
  assert t.abar_prev[0] == 1.0
  np.testing.assert_array_equal(t.abar_prev[1:], t.abar[:-1])
  np.testing.assert_array_equal(t.time, np.arange(s, dtype=np.float32) / s)
  # Spec example: i = 100 gives 0.5, not idx/T = 10049 / 20000.
  assert t.time[100] == 0.5 and idx[100] == 10049
  assert t.time.dtype == t.abar.dtype == t.abar_prev.dtype == np.float32


def test_ddim_tables_x_time_is_index_over_T(cosine):
  s = 65
  t = diffusion.ddim_tables(cosine, s, "x")
  idx = 128 * np.arange(s)
  np.testing.assert_array_equal(t.abar, cosine.alphas_cumprod[idx])
  np.testing.assert_array_equal(
    t.time, idx.astype(np.float32) / np.float32(T_X)
  )
  one = diffusion.ddim_tables(cosine, 1, "x")
  np.testing.assert_array_equal(one.abar, cosine.alphas_cumprod[-1:])
  np.testing.assert_array_equal(one.abar_prev, [1.0])
  np.testing.assert_allclose(one.time, [(T_X - 1) / T_X], rtol=1e-7)


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


# -- DDIM step ----------------------------------------------------------------


def test_ddim_last_step_recovers_x0_eps(linear):
  x0 = np.tanh(_rand((2, 8, 8, 3), 4))
  eps = _rand((2, 8, 8, 3), 5)
  abar = linear.alphas_cumprod[[100, 3000]]
  x_t = diffusion.q_sample(x0, np.sqrt(abar), np.sqrt(1 - abar), eps)
  out = diffusion.ddim_step(
    x_t, eps, jnp.asarray(abar)[:, None, None, None], 1.0, "eps"
  )
  np.testing.assert_allclose(out, x0, atol=1e-5)


def test_ddim_step_true_eps_lands_on_q_sample(linear):
  """Deterministic DDIM with the true noise moves along x_t(eps)."""
  x0 = np.tanh(_rand((1, 8, 8, 3), 6))
  eps = _rand((1, 8, 8, 3), 7)
  a, a_prev = linear.alphas_cumprod[5000], linear.alphas_cumprod[2000]
  x_t = diffusion.q_sample(x0, np.sqrt(a)[None], np.sqrt(1 - a)[None], eps)
  out = diffusion.ddim_step(x_t, eps, a, a_prev, "eps")
  want = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_ddim_x_family_clips_x0(cosine):
  x0 = np.tanh(_rand((1, 8, 8, 3), 8))
  eps = _rand((1, 8, 8, 3), 9)
  a = cosine.alphas_cumprod[1000]
  x_t = diffusion.q_sample(x0, np.sqrt(a)[None], np.sqrt(1 - a)[None], eps)
  # True x0 in [-1, 1], last step: output is x0.
  out = diffusion.ddim_step(x_t, x0, a, 1.0, "x")
  np.testing.assert_allclose(out, x0, atol=1e-6)
  # An out-of-range prediction is clipped before use.
  wild = 3.0 * np.sign(x0) + x0
  out = diffusion.ddim_step(x_t, wild, a, 1.0, "x")
  np.testing.assert_allclose(out, np.sign(x0), atol=1e-6)
  # Intermediate step: eps is re-derived from the clipped x0.
  a_prev = cosine.alphas_cumprod[500]
  out = diffusion.ddim_step(x_t, wild, a, a_prev, "x")
  c = np.clip(wild, -1, 1)
  e = (np.sqrt(1 / a) * x_t - c) / np.sqrt(1 / a - 1)
  want = np.sqrt(a_prev) * c + np.sqrt(1 - a_prev) * e
  np.testing.assert_allclose(out, want, atol=1e-5)
  # The eps family does not clip.
  out = diffusion.ddim_step(
    x_t, diffusion.eps_from_x0(x_t, a, wild), a, 1.0, "eps"
  )
  assert np.abs(out).max() > 2.0


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
