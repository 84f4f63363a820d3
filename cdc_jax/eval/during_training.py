"""Evaluation during training: a fixed set of crops reconstructed by the
model in one jitted call, without entropy coding (the model's estimated
bpp), so that it can run every ``eval.every`` steps on sharded params.

The set is ``eval.datasets.eval_images`` cropped by
``eval.datasets.crop_set``; the real-file report (``cdc_jax.eval.pipeline``)
runs once, at the end of training and in ``--mode=eval``.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import diffusion
from cdc_jax.eval import datasets, metrics
from cdc_jax.eval.ms_ssim import batch_ms_ssim, min_side
from cdc_jax.models.lpips import lpips_distance
from cdc_jax.sample import Sampler, initial_noise

logger = logging.getLogger(__name__)


def _to_uint8(x):
  """``imageio.to_uint8`` in jnp (traceable): clamp, scale, truncate."""
  x = jnp.clip(jnp.nan_to_num(x.astype(jnp.float32)), -1.0, 1.0)
  return jnp.clip((x + 1.0) * 0.5 * 255.0 + 0.5, 0, 255).astype(jnp.uint8)


class SetEvaluator:
  """Reconstructs a fixed set of crops (no entropy coding: the model's
  estimated bpp) and measures it, in one jitted call (one compile).

  ``__call__(params) -> (means, first)``: ``means`` holds the per-image
  averages of ``psnr`` (uint8, peak 255), ``bpp`` (estimated), ``ms_ssim``
  (only when the crops' side is >= ``ms_ssim.min_side()``, 161 px) and
  ``lpips`` (only with ``lpips_params``); ``first`` is the first crop's
  reconstruction, uint8 [s, s, 3]. The initial noise is drawn once from
  ``seed``, so successive evaluations differ only by the params.
  ``decoder`` is a ``cdc_jax.sample.Sampler``; ``sampler`` names the
  decode sampler (``cdc_jax.samplers.SAMPLERS``).
  """

  def __init__(
    self,
    decoder,
    crops,
    steps,
    gamma,
    lpips_params=None,
    seed=0,
    sampler="ddim",
  ):
    self.crops = np.asarray(crops, np.uint8)  # [N, s, s, 3]
    self.steps = int(steps)
    self.sampler = sampler
    self.lpips_params = lpips_params
    self.with_ms_ssim = self.crops.shape[1] >= min_side()
    self._x_init = initial_noise(seed, self.crops.shape, gamma)
    self._decoder = decoder
    self._fn = jax.jit(self._measure)

  def _measure(self, params, lpips_params, img_u8, x_init):
    x = img_u8.astype(jnp.float32) / 255.0 * 2.0 - 1.0
    rec, bpp = self._decoder.reconstruct(
      params, x, x_init, self.steps, sampler=self.sampler
    )
    rec_u8 = _to_uint8(rec)
    out = {"psnr": metrics.batch_psnr(img_u8, rec_u8), "bpp": bpp}
    if self.with_ms_ssim:
      out["ms_ssim"] = batch_ms_ssim(img_u8, rec_u8)
    if lpips_params is not None:
      y = rec_u8.astype(jnp.float32) / 255.0 * 2.0 - 1.0
      out["lpips"] = lpips_distance(lpips_params, x, y)
    return {k: jnp.mean(v) for k, v in out.items()}, rec_u8[0]

  def __call__(self, params) -> tuple[dict, np.ndarray]:
    means, first = jax.device_get(
      self._fn(params, self.lpips_params, self.crops, self._x_init)
    )
    return {k: float(v) for k, v in means.items()}, np.asarray(first)

  def log(self, params, step: int, writer=None) -> dict:
    """``self(params)``, its means written to TensorBoard (``writer``, a
    tensorboardX ``SummaryWriter``, or None) as ``eval/<metric>`` with
    the first crop beside its reconstruction; returns the means as
    ``eval_<metric>``."""
    means, first = self(params)
    if writer is not None:
      for k, v in means.items():
        writer.add_scalar(f"eval/{k}", v, step)
      pair = np.concatenate([self.crops[0], first], axis=1)
      writer.add_image(
        "eval/original_vs_reconstruction", pair, step, dataformats="HWC"
      )
    return {f"eval_{k}": v for k, v in means.items()}


def from_config(config, model, lpips_params=None, student=None) -> SetEvaluator:
  """The evaluator of ``config.eval``: its set (``data``: "" for the
  embedded held-out photo, else a folder, its first ``max_images``),
  center-cropped to one side <= ``size``, decoded with ``steps`` of
  ``sampler`` at ``gamma``, or for a distilled ``student``
  (``samplers.Student``) with its own S-step decode; LPIPS too with
  ``lpips_params``."""
  dc, ec = config.diffusion, config.eval
  schedule = diffusion.make_schedule(dc.schedule, dc.timesteps)
  images = datasets.eval_images(ec.data, ec.max_images)
  crops = datasets.crop_set(
    [img for _, img in images], ec.size, model.downsampling_factor
  )
  logger.info(
    "evaluating every %d steps on %d held-out crop(s) of %dx%d",
    ec.every,
    len(crops),
    crops.shape[1],
    crops.shape[2],
  )
  decoder = Sampler(model, schedule, student)
  steps, sampler = ec.steps, ec.sampler
  if student is not None:
    steps, sampler = student.steps, decoder.student_sampler
  return SetEvaluator(
    decoder, crops, steps, ec.gamma, lpips_params, sampler=sampler
  )
