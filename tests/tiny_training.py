"""The tiny training setup shared by the train-step and train-loop tests:
a config, its initial state, the 8-device step, and two batches."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from cdc_jax import sharding
from cdc_jax.data.loader import Loader
from cdc_jax.data.sources import EmbeddedSource, embedded_images
from cdc_jax.models.cdc import from_config
from cdc_jax.optim import make_optimizer
from cdc_jax.train_state import init_state
from cdc_jax.train_step import make_train_step
from configs import x_cosine

# The shared tiny training config (x family: EMA and clipping on). The lr
# steps down and lambda switches at step 5, so a resumed run's schedules
# are visible in its metrics. Adam's eps is 1e-5, not 1e-8: with 1e-8,
# elements whose gradient nearly cancels (|g| ~ 1e-9) get +-lr updates
# decided by rounding noise, and 1- and 8-device runs (different reduction
# orders) then differ by up to ~0.3 lr after two steps.
TRAIN = dict(
  batch_size=8,
  lr=2e-3,
  eps=1e-5,
  lr_schedule="paper",
  lr_decay_every=5,
  lr_decay=0.8,
  lr_min=1.6e-3,
  warmup_steps=5,
  seed=0,
)


def config(**train_overrides) -> ml_collections.ConfigDict:
  c = x_cosine.get_config("tiny")
  c.unlock()
  # The original's loss and EMA, not the demo's shortcuts.
  c.diffusion.train_t_min = 0.0
  c.diffusion.loss_weight_floor = 0.0
  c.train.ema.enabled = True
  c.train.update({**TRAIN, **train_overrides})
  c.log.progress = False
  c.log.every = 1
  c.eval.every = 10**6
  return c


def build():
  """The shared config, a host copy of its initial state, the 8-device
  step, and two batches: 8 different crops, and one crop 8 times."""
  c = config()
  model = from_config(c.model)
  tx = make_optimizer(c.train)
  ema = c.train.ema.enabled
  state = init_state(model, tx, jax.random.key(0), ema)
  host = jax.device_get(state)
  mesh = sharding.make_mesh()
  step, batch_sharding = make_train_step(
    c, model, tx, mesh, sharding.replicated(mesh, host)
  )
  loader = Loader(EmbeddedSource(), 8, 64, seed=0)
  crops = loader.batch_at(0)
  img = dict(embedded_images())["astronaut"]
  one = np.repeat(img[None, 200:264, 200:264], 8, axis=0)
  return dict(
    config=c,
    model=model,
    tx=tx,
    host=host,
    mesh=mesh,
    step=step,
    batch_sharding=batch_sharding,
    crops=crops,
    one=one,
  )


def run(step, batch_sharding, mesh, host_state, batch, n):
  """n steps from a fresh device copy of host_state (the step donates)."""
  state = jax.device_put(host_state, sharding.replicated(mesh, host_state))
  batch = jax.device_put(batch, batch_sharding)
  metrics = []
  for _ in range(n):
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics
