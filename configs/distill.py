"""Progressive distillation of a trained model (``cdc_jax.distill``).

  python -m cdc_jax.main --config=configs/distill.py \
    --config.distill.teacher=models/x_b0.0032 --workdir=runs/distill_x \
    --config.data.name=vimeo --config.data.path=/data/vimeo_septuplet

The model and diffusion sections are the teacher's (filled in at the
start; the saved config.json has them). Each round halves the decode
steps, from ``teacher_steps`` to ``target_steps``, in ``steps_per_round``
optimiser steps. Variants: ``tiny`` (small batches and crops, short
rounds, for CPU); ``steps=N`` sets ``distill.steps_per_round``.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  v = common.parse_arg(arg, tiny=False, steps=0)
  c = common.base_config()
  c.distill = ml_collections.ConfigDict(
    dict(
      teacher="",  # a model directory or a training workdir
      # The teacher's DDIM grid (its decode steps, floor(linspace(0, T-1,
      # S)) as docs/model.md §9.1); a teacher that is itself a student
      # brings its own.
      teacher_steps=64,
      target_steps=4,  # teacher_steps / 2^rounds
      steps_per_round=20_000,
      # The student's output: "x0", "eps", "v" or "" (the family's own: x0
      # for the x family, eps for the eps family).
      parameterisation="",
      # Train the context decoder g_s with the U-Net (False: frozen, the
      # teacher's context maps). The entropy model is always frozen.
      train_context=False,
    )
  )
  c.train.lr = 5e-5
  c.train.lr_decay_every = 10**9  # constant within and across rounds
  c.train.lr_min = 0.0
  c.train.grad_clip = 1.0
  c.train.warmup_steps = 0  # no rate term: lambda is unused
  c.train.ema.enabled = True
  c.train.ema.beta = 0.999
  c.checkpoint.every = 2000
  c.eval.every = 5000
  if v.tiny:
    c.data.crop_size = 64
    c.train.batch_size = 4
    c.train.lr = 2e-4
    c.train.ema.update_after_step = 20
    c.train.ema.update_every = 5
    c.distill.steps_per_round = 300
    c.log.every = 25
    c.eval.every = 300
    c.checkpoint.every = 100
    c.eval.size = 64
  if v.steps:
    c.distill.steps_per_round = v.steps
  c.lock()
  return c
