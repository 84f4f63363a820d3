"""The training loss of CDC (docs/model.md §7).

``lam * mean(bpp) + diffusion_loss + extra_loss`` where the diffusion loss
is L1 on eps (family ``eps``) or the min(SNR, 5)-weighted L2 on x0 (family
``x``), and the extra loss trains the hyperprior's medians (its gradient
reaches only them). The gradient of the total equals the original's
``loss.backward(); extra_loss.backward()``.

With a perceptual weight ``rho > 0`` (the released ``aux0.9lpips``
models) the loss is ``lam * mean(bpp) + (1 - rho) * diffusion_loss +
rho * mean(LPIPS_vgg(x0, x0_hat))`` as the original computes it: the eps
family's x0_hat = clip(x0_from_eps(x_t, abar_t, eps_hat), -1, 1), the x
family's x0_hat is its prediction, not clipped; the LPIPS dropout is
active when a ``dropout_rng`` (or injected ``dropout_masks``) is given,
off otherwise (the deterministic variant). LPIPS params get no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cdc_jax import diffusion
from cdc_jax.models import lpips
from cdc_jax.models.cdc import CDC


def loss_fn(
  params,
  model: CDC,
  sched_arrays,
  x0,
  t,
  noise,
  rate_noise,
  lam,
  *,
  rho: float = 0.0,
  lpips_params=None,
  dropout_rng=None,
  dropout_masks: Sequence | None = None,
  weight_floor: float = 0.0,
):
  """Total loss and metrics for images x0 [B,H,W,3] in [-1, 1].

  ``sched_arrays`` = ``schedule_arrays(schedule)``, a ``ScheduleArrays``
  (abar is read only by the eps family with rho > 0); ``t`` [B] int
  training indices, ``noise`` like x0, ``rate_noise`` the (u_z, u_y)
  uniform noise of the rate term; all explicit so parity tests can
  inject the original's draws.

  ``rho`` (a Python number) weighs the LPIPS-VGG term; it needs
  ``lpips_params`` (``cdc_jax.models.lpips.load``). Its dropout is
  drawn from ``dropout_rng`` or taken from ``dropout_masks`` (5 keep-masks
  [B, h, w, C], see ``models.lpips.LPIPS``); with neither it is off. The
  metrics then carry ``aux_loss``, the batch mean LPIPS.

  ``weight_floor`` (config ``diffusion.loss_weight_floor``, 0 = the
  original) raises the loss's weight in x0 space to at least that: the x
  family's x0 weight is ``max(min(SNR, 5), weight_floor)``, the eps
  family's eps L1 is weighted by ``max(1, weight_floor / sqrt(SNR))``.
  """
  sqrt_abar, sqrt_1m_abar, snr = (
    sched_arrays.sqrt_abar,
    sched_arrays.sqrt_1m_abar,
    sched_arrays.snr,
  )
  variables = {"params": params}
  out = model.apply(
    variables, x0, train=True, rate_noise=rate_noise, method=CDC.context_model
  )
  x_t = diffusion.q_sample(x0, sqrt_abar[t], sqrt_1m_abar[t], noise)
  time = (t.astype(jnp.float32) / sqrt_abar.shape[0])[:, None]
  pred = model.apply(variables, x_t, time, out["context"], method=CDC.denoise)
  if model.family == "eps" and weight_floor:
    weight = diffusion.eps_loss_weight(snr[t], weight_floor)
    diff = diffusion.eps_weighted_l1_loss(noise, pred, weight)
  elif model.family == "eps":
    diff = diffusion.eps_l1_loss(noise, pred)
  else:
    weight = diffusion.loss_weight(snr[t], floor=weight_floor)
    diff = diffusion.x0_weighted_l2_loss(x0, pred, weight)
  bpp = jnp.mean(out["bpp"])
  metrics = {}
  if rho:
    if lpips_params is None:
      raise ValueError("loss_fn: rho > 0 needs lpips_params")
    x0_hat = predicted_x0(model.family, sched_arrays, x_t, t, pred)
    aux = jnp.mean(_lpips(lpips_params, x0, x0_hat, dropout_rng, dropout_masks))
    loss = lam * bpp + diff * (1.0 - rho) + aux * rho
    metrics["aux_loss"] = aux
  else:
    loss = lam * bpp + diff
  extra = model.apply(variables, method=CDC.extra_loss)
  return loss + extra, {
    "loss": loss,
    "bpp": bpp,
    "diffusion_loss": diff,
    "extra_loss": extra,
    **metrics,
  }


def predicted_x0(family: str, sched_arrays, x_t, t, pred):
  """The x0 estimate the LPIPS term compares with x0 (docs/model.md §7.4).

  eps: clip(sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps_hat, -1, 1);
  x: the prediction itself, not clipped (as the original).
  """
  if family == "eps":
    abar = sched_arrays.abar
    return jnp.clip(diffusion.x0_from_eps(x_t, abar[t], pred), -1.0, 1.0)
  return pred


def _lpips(params, x0, x0_hat, dropout_rng, dropout_masks):
  """Per-image LPIPS-VGG [B]; dropout on iff a key or masks are given."""
  train = dropout_rng is not None or dropout_masks is not None
  return lpips.lpips_distance(
    params,
    x0,
    x0_hat,
    train=train,
    dropout_rng=None if dropout_masks is not None else dropout_rng,
    dropout_masks=dropout_masks,
    net="vgg",
  )


class ScheduleArrays(NamedTuple):
  """The training schedule as the loss reads it (a pytree of [T] arrays)."""

  sqrt_abar: jax.Array
  sqrt_1m_abar: jax.Array
  snr: jax.Array
  abar: jax.Array


def schedule_arrays(schedule: diffusion.Schedule) -> ScheduleArrays:
  """``schedule``'s arrays as ``loss_fn`` reads them."""
  return ScheduleArrays(
    jnp.asarray(schedule.sqrt_alphas_cumprod),
    jnp.asarray(schedule.sqrt_one_minus_alphas_cumprod),
    jnp.asarray(schedule.snr),
    jnp.asarray(schedule.alphas_cumprod),
  )
