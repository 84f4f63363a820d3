"""The training loss of CDC (spec §6.2).

``lam * mean(bpp) + diffusion_loss + extra_loss`` where the diffusion loss
is L1 on eps (family ``eps``) or the min(SNR, 5)-weighted L2 on x0 (family
``x``), and the extra loss trains the hyperprior's medians (its gradient
reaches only them). The gradient of the total equals the original's
``loss.backward(); extra_loss.backward()``.
"""

from __future__ import annotations

import jax.numpy as jnp

from cdc_jax import diffusion
from cdc_jax.models.cdc import CDC


def loss_fn(params, model: CDC, sched_arrays, x0, t, noise, rate_noise, lam):
  """Total loss and metrics for images x0 [B,H,W,3] in [-1, 1].

  ``sched_arrays`` = (sqrt(abar), sqrt(1 - abar), SNR) of the training
  schedule; ``t`` [B] int training indices, ``noise`` like x0,
  ``rate_noise`` the (u_z, u_y) uniform noise of the rate term; all
  explicit so parity tests can inject the original's draws.
  """
  sqrt_abar, sqrt_1m_abar, snr = sched_arrays
  variables = {"params": params}
  out = model.apply(
    variables, x0, train=True, rate_noise=rate_noise, method=CDC.context_model
  )
  x_t = diffusion.q_sample(x0, sqrt_abar[t], sqrt_1m_abar[t], noise)
  time = (t.astype(jnp.float32) / sqrt_abar.shape[0])[:, None]
  pred = model.apply(variables, x_t, time, out["context"], method=CDC.denoise)
  if model.family == "eps":
    diff = diffusion.eps_l1_loss(noise, pred)
  else:
    weight = diffusion.loss_weight(snr[t])
    diff = diffusion.x0_weighted_l2_loss(x0, pred, weight)
  bpp = jnp.mean(out["bpp"])
  loss = lam * bpp + diff
  extra = model.apply(variables, method=CDC.extra_loss)
  return loss + extra, {
    "loss": loss,
    "bpp": bpp,
    "diffusion_loss": diff,
    "extra_loss": extra,
  }


def schedule_arrays(schedule: diffusion.Schedule):
  """The (sqrt(abar), sqrt(1 - abar), SNR) device arrays ``loss_fn`` reads."""
  return (
    jnp.asarray(schedule.sqrt_alphas_cumprod),
    jnp.asarray(schedule.sqrt_one_minus_alphas_cumprod),
    jnp.asarray(schedule.snr),
  )
