"""Learning-rate and rate-weight schedules (docs/model.md §8), optimizer."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cdc_jax import optim
from configs import common


def _tc(**kw) -> ml_collections.ConfigDict:
  tc = common.base_config().train
  tc.update(kw)
  return tc


def test_lr_paper_staircase():
  sched = optim.lr_schedule(
    _tc(lr_schedule="paper", lr=5e-5, lr_decay=0.8, lr_min=2e-5)
  )
  steps = [0, 99_999, 100_000, 199_999, 250_000, 10**6]
  want = [5e-5, 5e-5, 4e-5, 4e-5, 5e-5 * 0.8**2, 2e-5]
  got = [float(sched(jnp.int32(s))) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_lr_released_eps_numbers():
  sched = optim.lr_schedule(
    _tc(lr_schedule="released", lr=4e-5, lr_decay=0.9, lr_min=2e-5)
  )
  lr = lambda s: float(sched(jnp.int32(s)))
  np.testing.assert_allclose(lr(0), 4e-5, rtol=1e-6)
  np.testing.assert_allclose(lr(99_999), 4e-5, rtol=1e-6)
  np.testing.assert_allclose(lr(100_000), 4e-5 * 0.9, rtol=1e-6)
  np.testing.assert_allclose(lr(100_001), 4e-5 * 0.81, rtol=1e-6)
  # Still above the floor at 100005, at it from 100006 on (docs/model.md §8.2).
  np.testing.assert_allclose(lr(100_005), 4e-5 * 0.9**6, rtol=1e-6)
  assert lr(100_005) > 2e-5
  for s in (100_006, 100_007, 500_000, 10**6):
    np.testing.assert_allclose(lr(s), 2e-5, rtol=1e-6)


def test_lr_released_x_numbers():
  sched = optim.lr_schedule(
    _tc(lr_schedule="released", lr=5e-5, lr_decay=0.8, lr_min=1e-5)
  )
  assert float(sched(jnp.int32(100_006))) > 1e-5 * 1.01
  np.testing.assert_allclose(float(sched(jnp.int32(100_007))), 1e-5, rtol=1e-6)


def test_lr_schedule_unknown_name():
  with pytest.raises(ValueError, match="lr_schedule"):
    optim.lr_schedule(_tc(lr_schedule="cosine"))


def test_lambda_schedule():
  sched = optim.lambda_schedule(_tc(lam=0.0032, warmup_steps=700_000))
  lam = lambda s: float(sched(jnp.int32(s)))
  np.testing.assert_allclose([lam(0), lam(699_999)], 1e-6, rtol=1e-6)
  np.testing.assert_allclose([lam(700_000), lam(10**6)], 0.0032, rtol=1e-6)


def test_optimizer_clips_by_global_norm_only_when_asked():
  # Adam's first moment after one update is (1 - b1) * g, with g clipped
  # to global norm grad_clip first where clipping is on.
  g = {"w": jnp.full((4,), 10.0)}  # global norm 20
  p = {"w": jnp.zeros((4,))}
  for clip, g_seen in ((1.0, 0.5), (0.0, 10.0)):
    tx = optim.make_optimizer(_tc(grad_clip=clip))
    _, state = tx.update(g, tx.init(p), p)
    adam = state[-1][0]
    np.testing.assert_allclose(adam.mu["w"], 0.1 * g_seen, rtol=1e-6)
