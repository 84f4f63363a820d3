"""The train state: EMA (ema_pytorch 0.2.3 semantics, docs/model.md §8.4),
init."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import optim, train_state
from cdc_jax.models.cdc import CDC
from configs import common


def test_ema_decay_values():
  ec = common.base_config().train.ema
  d = lambda s: float(train_state.ema_decay(jnp.int32(s), ec))
  assert d(0) == 0.0 and d(100) == 0.0
  np.testing.assert_allclose(d(110), 1 - 11**-0.75, rtol=1e-6)
  np.testing.assert_allclose(d(110), 0.8344, atol=1e-4)
  np.testing.assert_allclose(d(200), 1 - 101**-0.75, rtol=1e-6)
  np.testing.assert_allclose(d(10**6), 0.999, rtol=1e-7)  # capped at beta


def test_ema_update_copies_skips_and_lerps():
  ec = common.base_config().train.ema  # every 10, after step 100
  ema = {"w": jnp.zeros(3), "b": {"c": jnp.full(2, 4.0)}}
  params = {"w": jnp.ones(3), "b": {"c": jnp.full(2, 2.0)}}

  def upd(step):
    return jax.tree.map(
      np.asarray, train_state.ema_update(ema, params, jnp.int32(step), ec)
    )

  for step in (0, 50, 100):  # copies up to update_after_step
    out = upd(step)
    np.testing.assert_array_equal(out["w"], 1.0)
    np.testing.assert_array_equal(out["b"]["c"], 2.0)
  for step in (55, 105, 111):  # not a multiple of update_every
    out = upd(step)
    np.testing.assert_array_equal(out["w"], 0.0)
    np.testing.assert_array_equal(out["b"]["c"], 4.0)
  out = upd(110)  # first lerp: ema + (1 - d)(p - ema), 1 - d = 11^-0.75
  np.testing.assert_allclose(out["w"], 11**-0.75, rtol=1e-6)
  np.testing.assert_allclose(out["b"]["c"], 4.0 - 2.0 * 11**-0.75, rtol=1e-6)


def test_init_state_ema_is_a_distinct_copy():
  model = CDC(family="eps", dim=4)
  tc = common.base_config().train
  tx = optim.make_optimizer(tc)
  st = train_state.init_state(model, tx, jax.random.key(0), ema=True)
  assert int(st.step) == 0
  leaves = jax.tree.leaves(st.params)
  ema = jax.tree.leaves(st.ema_params)
  assert len(leaves) == len(ema) > 10
  for a, b in zip(leaves, ema, strict=True):
    np.testing.assert_array_equal(a, b)
    # Distinct buffers: the jitted step donates the state.
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
  assert train_state.decoding_params(st) is st.ema_params
  off = train_state.init_state(model, tx, jax.random.key(0), ema=False)
  assert off.ema_params is None
  assert train_state.decoding_params(off) is off.params
