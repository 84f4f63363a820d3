"""The training state: params, EMA params, optimizer state, step, λ.

One pytree (``TrainState``) is jitted, donated, sharded and checkpointed
as a whole. EMA follows ema_pytorch 0.2.3 (docs/model.md §8.4): every
``update_every`` steps, a copy until ``update_after_step``, then a lerp
with decay ``1 - (s - 99)^-power`` capped at ``beta``. Decoding and
evaluation read ``decoding_params`` (the EMA copy where the run keeps one).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from cdc_jax.models.cdc import CDC, init_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off
  lam: jax.Array  # lambda(step) of the last step, for logs and checkpoints


def init_state(model: CDC, tx, rng, ema: bool) -> TrainState:
  """A fresh state; one jitted init (eager init of 50M params dispatches
  thousands of small ops, minutes on a GPU)."""

  @jax.jit
  def init(rng):
    params = init_params(model, rng)
    return params, tx.init(params)

  params, opt_state = init(rng)
  return from_params(params, opt_state, ema)


def from_params(params, opt_state, ema: bool, step=0) -> TrainState:
  """A state at ``step`` around given params (e.g. ``train.init_from``)."""
  # A copy, not the same arrays: the jitted step donates the state, and
  # donating one buffer twice crashes the runtime.
  ema_params = jax.tree.map(jnp.copy, params) if ema else None
  return TrainState(
    jnp.asarray(step, jnp.int32),
    params,
    opt_state,
    ema_params,
    jnp.zeros((), jnp.float32),
  )


def decoding_params(state: TrainState):
  """Params for decoding and evaluation: the EMA copy where present."""
  return state.ema_params if state.ema_params is not None else state.params


def ema_decay(step, ec: ml_collections.ConfigDict):
  """ema_pytorch 0.2.3's decay at update counter ``step``
  (docs/model.md §8.4)."""
  n = step + 1
  e = jnp.maximum(n - ec.update_after_step - 1, 0).astype(jnp.float32)
  d = 1.0 - (1.0 + e) ** (-ec.power)
  return jnp.clip(d, 0.0, ec.beta)


def ema_update(ema, params, step, ec: ml_collections.ConfigDict):
  """Every ``update_every`` steps: copy until ``update_after_step``, lerp."""
  d = ema_decay(step, ec)
  copy = step <= ec.update_after_step
  active = (step % ec.update_every) == 0

  def upd(e, p):
    lerp = e + (1.0 - d) * (p - e)
    new = jnp.where(copy, p, lerp)
    return jnp.where(active, new, e)

  return jax.tree.map(upd, ema, params)
