"""The optimizer and the schedules of training: learning rate and λ.

* ``lr_schedule``: the paper's staircase (default) or the released code's
  effective schedule (docs/model.md §8.2).
* ``lambda_schedule``: the rate weight λ with its warm-up inside one run
  (the original needs two runs, docs/model.md §8.3).
* ``make_optimizer``: [global-norm clipping] + Adam with PyTorch defaults.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(tc: ml_collections.ConfigDict) -> optax.Schedule:
  """The paper's staircase, or the released code's effective schedule."""
  lr, decay, every, floor = tc.lr, tc.lr_decay, tc.lr_decay_every, tc.lr_min

  if tc.lr_schedule == "paper":

    def sched(step):
      k = jnp.floor_divide(step, every)
      return jnp.maximum(lr * decay ** k.astype(jnp.float32), floor)

  elif tc.lr_schedule == "released":

    def sched(step):
      e = jnp.maximum(step - every + 1, 0).astype(jnp.float32)
      return jnp.maximum(lr * decay**e, floor)

  else:
    raise ValueError(
      f"train.lr_schedule must be 'paper' or 'released', got {tc.lr_schedule!r}"
    )
  return sched


def lambda_schedule(tc: ml_collections.ConfigDict) -> optax.Schedule:
  """Rate weight: ``warmup_lambda`` for ``warmup_steps``, then ``lam``."""
  return optax.join_schedules(
    [
      optax.constant_schedule(tc.warmup_lambda),
      optax.constant_schedule(tc.lam),
    ],
    [tc.warmup_steps],
  )


def make_optimizer(tc: ml_collections.ConfigDict):
  parts = []
  if tc.grad_clip:
    parts.append(optax.clip_by_global_norm(tc.grad_clip))
  parts.append(optax.adam(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps))
  return optax.chain(*parts)
