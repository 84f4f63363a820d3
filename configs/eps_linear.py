"""The released eps-param config (docs/model.md §1): BigCompressor + U-Net,
linear T=20000 schedule, L1 loss on the noise, no EMA, no gradient clipping.

Run (embedded photos, tiny model, a few minutes on CPU)::

  python -m cdc_jax.main --config=configs/eps_linear.py:tiny --workdir=/tmp/cdc

Full model on Vimeo-90k::

  python -m cdc_jax.main --config=configs/eps_linear.py --workdir=runs/eps \
    --config.data.name=vimeo --config.data.path=/data/vimeo_septuplet

Variants: ``tiny``; ``steps=N`` sets train.num_steps.
"""

from configs import common


def get_config(arg=None):
  v = common.parse_arg(arg, tiny=False, steps=0)
  c = common.base_config()
  c.model.family = "eps"
  c.model.context_channels = 3
  c.diffusion.schedule = "linear"
  c.diffusion.timesteps = 20000
  c.train.lam = 0.0032
  # The released eps trainer: no clipping, no EMA (docs/model.md §8.1, §8.4).
  c.train.grad_clip = 0.0
  c.train.ema.enabled = False
  c.eval.steps = 200
  if v.tiny:
    common.apply_tiny(c)
  if v.steps:
    c.train.num_steps = v.steps
  c.lock()
  return c
