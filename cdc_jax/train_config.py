"""The checks a training config passes before anything is built.

``validate_config`` refuses, with one line naming the field, its value
and what it may be, what a run would otherwise hit only after compiling
(a ZeroDivisionError at the first ``every``), or would do silently wrong
(``train.num_steps = -1`` trains nothing and exports an untrained model).
"""

from __future__ import annotations

import os

from cdc_jax import model_check, samplers
from cdc_jax.errors import UserError
from cdc_jax.models.cdc import from_config, to_config

# Fields that count steps or items and must be positive integers.
LR_SCHEDULES = ("paper", "released")
POSITIVE = (
  "train.num_steps",
  "train.batch_size",
  "checkpoint.every",
  "checkpoint.keep",
  "eval.every",
  "eval.steps",
  "eval.max_images",
  "eval.size",
  "log.every",
)


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (non-finite loss, bad configuration)."""


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check_positive(config) -> None:
  for name in POSITIVE:
    v = _get(config, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise TrainingError(
        f"{name} = {v!r} must be a positive integer "
        f"(--config.{name}=N with N >= 1)"
      )
  t = int(config.diffusion.timesteps)
  if t < 1 or config.eval.steps > t:
    raise TrainingError(
      f"eval.steps = {config.eval.steps} must be in [1, diffusion.timesteps"
      f" = {t}]"
    )


def check_sampler(config) -> None:
  name = config.eval.sampler
  if name not in samplers.SAMPLERS:
    raise TrainingError(
      f"eval.sampler = {name!r} is not a sampler; use one of "
      f"{', '.join(samplers.SAMPLERS)} (--config.eval.sampler=NAME)"
    )


def _check_lpips(dc) -> None:
  rho, path = dc.aux_weight, dc.lpips_weights
  if not 0.0 <= rho <= 1.0:
    raise TrainingError(f"diffusion.aux_weight (rho) = {rho} must be in [0, 1]")
  if rho and not (os.path.isfile(path) and os.access(path, os.R_OK)):
    what = f"={path} is not a readable file" if path else "is not set"
    raise TrainingError(
      f"diffusion.aux_weight (rho) = {rho} > 0 needs LPIPS-VGG weights, but "
      f"--config.diffusion.lpips_weights {what}; pass the lpips_vgg.npz that "
      "`python -m cdc_jax.convert checkpoint` writes beside a converted "
      "rho > 0 checkpoint, or write one with `python -m cdc_jax.convert "
      "lpips OUT.npz --backbone vgg16-397923af.pth` (torchvision's VGG16, "
      "downloaded by you); or set --config.diffusion.aux_weight=0"
    )


def check_model(config) -> None:
  """The model and diffusion sections, field by field, as a model
  directory's model.json is checked (``cdc_jax.model_check``)."""
  where = "the config"
  model_check.check_model(
    to_config(config.model.to_dict()), where, TrainingError
  )
  model_check.check_diffusion(
    model_check.diffusion_config(config), where, TrainingError
  )
  lr = config.train.lr_schedule
  if lr not in LR_SCHEDULES:
    raise TrainingError(
      f"train.lr_schedule = {lr!r} must be one of {LR_SCHEDULES}"
    )


def validate_config(config) -> None:
  """Errors a run would otherwise hit only after compiling, or silently."""
  check_model(config)
  dc = config.diffusion
  _check_lpips(dc)
  t_min = dc.train_t_min
  floor = dc.loss_weight_floor
  if not 0.0 <= t_min < 1.0:
    raise TrainingError(f"diffusion.train_t_min = {t_min} must be in [0, 1)")
  if floor < 0.0:
    raise TrainingError(f"diffusion.loss_weight_floor = {floor} must be >= 0")
  check_positive(config)
  check_sampler(config)
  factor = from_config(config.model).downsampling_factor
  crop = config.data.crop_size
  if crop < factor or crop % factor:
    raise TrainingError(
      f"data.crop_size={crop} must be a positive multiple of {factor} (the "
      "model's downsampling factor)"
    )
