"""The training step: a pure function, jitted data-parallel over a mesh.

``train_step(state, batch, lpips_params) -> (state, metrics)`` on a uint8
global batch [B, H, W, 3]. Randomness is ``fold_in(seed, step)``, split
into the training indices t, the rate noise of z and y, and the diffusion
noise, so a resumed run needs no stored RNG and a step gives the same
result on 1 or 8 devices. With a perceptual weight rho =
``diffusion.aux_weight`` > 0 the LPIPS dropout key is a separate stream,
``fold_in(fold_in(seed, step), LPIPS_STREAM)``, so those draws are the
same as with rho = 0. ``make_train_step`` jits it with the state
replicated and donated, the batch split over the mesh and the frozen
LPIPS-VGG params a replicated argument (never optimised, not in the
state), and returns ``step(state, batch)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from cdc_jax import diffusion, sharding
from cdc_jax.losses import loss_fn, schedule_arrays
from cdc_jax.optim import lambda_schedule, lr_schedule
from cdc_jax.train_state import TrainState, ema_update

LPIPS_STREAM = 0x1F1C5  # fold_in id of the LPIPS dropout key of a step


def lpips_kwargs(config, lpips_params, rng, step) -> dict:
  """``loss_fn``'s perceptual-term arguments for ``config.diffusion``.

  Empty for rho = 0; otherwise rho, the params and, when
  ``diffusion.lpips_dropout`` (the original's behaviour), the step's
  dropout key.
  """
  dc = config.diffusion
  rho = float(dc.aux_weight)
  if not rho:
    return {}
  kw = {"rho": rho, "lpips_params": lpips_params}
  if dc.lpips_dropout:
    step_key = jax.random.fold_in(rng, step)
    kw["dropout_rng"] = jax.random.fold_in(step_key, LPIPS_STREAM)
  return kw


def first_t(config, timesteps: int) -> int:
  """Lowest training index: ``floor(diffusion.train_t_min * T)``; the
  original draws t from all of [0, T) (``train_t_min`` = 0)."""
  return int(config.diffusion.train_t_min * timesteps)


def train_step(
  state: TrainState,
  batch,
  lpips_params=None,
  *,
  model,
  tx,
  config,
  sched_arrays,
  rng,
):
  """One optimisation step on a uint8 batch [B,H,W,3] (global)."""
  tc = config.train
  x0 = batch.astype(jnp.float32) / 255.0 * 2.0 - 1.0
  b, h, w, _ = x0.shape
  timesteps = sched_arrays.abar.shape[0]
  kt, kz, ky, kn = jax.random.split(jax.random.fold_in(rng, state.step), 4)
  t = jax.random.randint(kt, (b,), first_t(config, timesteps), timesteps)
  shapes = model.latent_shapes(b, h, w)
  rate_noise = (
    jax.random.uniform(kz, shapes["z"], jnp.float32, -0.5, 0.5),
    jax.random.uniform(ky, shapes["y"], jnp.float32, -0.5, 0.5),
  )
  noise = jax.random.normal(kn, x0.shape, jnp.float32)
  lam = jnp.asarray(lambda_schedule(tc)(state.step), jnp.float32)

  grad_fn = jax.value_and_grad(
    functools.partial(
      loss_fn,
      weight_floor=config.diffusion.loss_weight_floor,
      **lpips_kwargs(config, lpips_params, rng, state.step),
    ),
    has_aux=True,
  )
  (_, metrics), grads = grad_fn(
    state.params, model, sched_arrays, x0, t, noise, rate_noise, lam
  )
  new = apply_gradients(state, grads, tx, tc.ema, state.step, lam=lam)
  metrics = dict(metrics)
  metrics["lam"] = lam
  metrics["lr"] = lr_schedule(tc)(state.step)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return new, metrics


def apply_gradients(state, grads, tx, ema_config, ema_step, **fields):
  """The update every job's step ends with (training, distillation): the
  optimizer on ``state.params``, the EMA at counter ``ema_step``, the
  step + 1, ``fields`` replaced; dtypes kept. ``state``: a struct with
  step, params, opt_state and ema_params (None: no EMA)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = ema_update(ema, params, ema_step, ema_config)
  new = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    ema_params=ema,
    **fields,
  )
  return jax.tree.map(_keep_dtype, new, state)


def _keep_dtype(new, old):
  # Keeps the step signature fixed (no weak types), so jit compiles once.
  return jnp.asarray(new, old.dtype)


def make_train_step(config, model, tx, mesh, state_sharding, lpips_params=None):
  """The jitted, data-parallel ``step(state, batch)`` and the batch's
  sharding.

  ``lpips_params`` (LPIPS-VGG, ``cdc_jax.models.lpips.load``) are
  needed when ``config.diffusion.aux_weight`` > 0 and ignored otherwise;
  they are put on the mesh once, replicated, and passed to the jitted
  step as an argument (not baked into the program as constants).
  """
  dc = config.diffusion
  if not dc.aux_weight:
    lpips_params = None
  elif lpips_params is None:
    raise ValueError(
      "make_train_step: diffusion.aux_weight > 0 needs lpips_params "
      "(cdc_jax.models.lpips.load)"
    )
  sched = diffusion.make_schedule(dc.schedule, dc.timesteps)
  step = functools.partial(
    train_step,
    model=model,
    tx=tx,
    config=config,
    sched_arrays=schedule_arrays(sched),
    rng=jax.random.key(config.train.seed),
  )
  batch_sharding = sharding.batch_sharding(mesh)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(
    step,
    in_shardings=(state_sharding, batch_sharding, repl),
    out_shardings=(state_sharding, repl),
    donate_argnums=0,
  )
  if lpips_params is not None:
    lpips_params = jax.device_put(
      lpips_params, sharding.replicated(mesh, lpips_params)
    )

  def run(state, batch):
    return jitted(state, batch, lpips_params)

  return run, batch_sharding
