"""The distillation target's defining property: one student DDIM step with
the computed x0 reproduces the teacher's two DDIM steps, for both
families (schedules, x0 conventions) and every output parameterisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import diffusion
from cdc_jax import distill_target as dt

SCHEDULES = {"eps": ("linear", 20000), "x": ("cosine", 8193)}
F32 = float(np.finfo(np.float32).eps)


def _teacher(family: str, key):
  """A nonlinear stand-in U-Net: x0 predictions (the x family's pushed
  past [-1, 1] so its clipping acts) that depend on x_t and the noise."""
  w = 0.5 * jax.random.normal(key, (3, 3))

  def x0_fn(x, abar):
    h = jnp.tanh(x @ w + jnp.log(abar))
    out = 1.6 * h if family == "x" else h + 0.3 * x  # x0-hat or eps-hat
    return dt.teacher_x0(out, x, abar, family)

  return x0_fn


def _triples(family: str, rng, n: int = 6):
  """(abar_t, abar_mid, abar_s) of random student steps: teacher indices
  t > mid > s on the family's schedule, the last triple ending at x_0
  (abar = 1, sigma = 0) as a decode's last step does."""
  kind, timesteps = SCHEDULES[family]
  abar = diffusion.make_schedule(kind, timesteps).alphas_cumprod
  out = []
  for i in range(n):
    t, mid, s = sorted(rng.choice(timesteps, 3, replace=False))[::-1]
    end = 1.0 if i == n - 1 else float(abar[s])
    out.append((float(abar[t]), float(abar[mid]), end))
  return out


@pytest.mark.parametrize("param", dt.PARAMETERISATIONS)
@pytest.mark.parametrize("family", ["eps", "x"])
def test_one_student_step_is_two_teacher_steps(family, param):
  rng = np.random.default_rng(0)
  x0_fn = _teacher(family, jax.random.key(1))
  for abar_t, abar_mid, abar_s in _triples(family, rng):
    x0 = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    a_t, s_t = np.sqrt(abar_t), np.sqrt(1 - abar_t)
    x_t = jnp.asarray(a_t * x0 + s_t * noise, jnp.float32)
    two = dt.teacher_two_steps(x0_fn, x_t, abar_t, abar_mid, abar_s)
    target = dt.distill_target(x0_fn, x_t, abar_t, abar_mid, abar_s)
    out = dt.to_output(x_t, target, abar_t, param)  # what the student learns
    x0_hat = dt.from_output(x_t, out, abar_t, param)
    one = dt.ddim_from_x0(x_t, x0_hat, abar_t, abar_s)
    # float32 rounding of the conversions, amplified by 1/alpha_t (eps, v
    # at high noise) and 1/sigma_t (the step's eps): a few ulps of the
    # largest term (measured: at most 1.02 of them; a wrong target is off
    # by O(1)).
    scale = float(jnp.max(jnp.abs(x_t))) / min(a_t, s_t)
    err = float(jnp.max(jnp.abs(one - two)))
    assert err <= 16 * F32 * scale, (family, param, abar_t, abar_s, err)


def test_target_at_the_end_point_is_where_the_teacher_lands():
  x0_fn = _teacher("x", jax.random.key(2))
  x_t = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 4, 3)))
  x_t = x_t.astype(jnp.float32)
  two = dt.teacher_two_steps(x0_fn, x_t, 0.3, 0.7, 1.0)
  target = dt.distill_target(x0_fn, x_t, 0.3, 0.7, 1.0)
  np.testing.assert_allclose(np.asarray(target), np.asarray(two), atol=1e-6)


def test_the_target_is_not_the_teachers_first_prediction():
  """Two steps of a teacher whose x0 moves with x_t are not one: the
  target differs from the teacher's x0 at x_t (a target that copied it
  would fail the defining property for any real teacher)."""
  x0_fn = _teacher("eps", jax.random.key(4))
  x_t = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 4, 3)))
  x_t = x_t.astype(jnp.float32)
  target = dt.distill_target(x0_fn, x_t, 0.2, 0.5, 0.8)
  first = x0_fn(x_t, 0.2)
  assert float(jnp.max(jnp.abs(target - first))) > 1e-2


def test_conversions_are_inverse_and_v_is_the_papers():
  rng = np.random.default_rng(6)
  x0 = jnp.asarray(rng.uniform(-1, 1, (16,)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal(16), jnp.float32)
  abar = 0.64
  x_t = 0.8 * x0 + 0.6 * eps
  v = dt.to_output(x_t, x0, abar, "v")
  np.testing.assert_allclose(v, 0.8 * eps - 0.6 * x0, atol=1e-6)
  np.testing.assert_allclose(dt.to_output(x_t, x0, abar, "eps"), eps, atol=1e-6)
  for p in dt.PARAMETERISATIONS:
    back = dt.from_output(x_t, dt.to_output(x_t, x0, abar, p), abar, p)
    np.testing.assert_allclose(back, x0, atol=1e-6)
  with pytest.raises(ValueError, match="unknown parameterisation"):
    dt.to_output(x_t, x0, abar, "score")


def test_truncated_snr_weight():
  np.testing.assert_allclose(
    dt.weight(jnp.array([0.2, 0.5, 0.8])), [1, 1, 4], rtol=1e-6
  )
