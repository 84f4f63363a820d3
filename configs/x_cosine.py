"""The released x-param config (spec §0): ResnetCompressor (64-channel
context) + U-Net, cosine T=8193 schedule, min(SNR,5)-weighted L2 on x0,
EMA, gradient clipping at 1.0.

Run (embedded photos, tiny model, a few minutes on CPU)::

  python -m cdc_jax.main --config=configs/x_cosine.py:tiny --workdir=/tmp/cdcx

Full model on Vimeo-90k::

  python -m cdc_jax.main --config=configs/x_cosine.py --workdir=runs/x \
    --config.data.name=vimeo --config.data.path=/data/vimeo_septuplet

Variants: ``tiny``; ``steps=N`` sets train.num_steps.
"""

from configs import common


def get_config(arg=None):
  v = common.parse_arg(arg, tiny=False, steps=0)
  c = common.base_config()
  c.model.family = "x"
  c.model.context_channels = 64
  c.model.reverse_context_dim_mults = (4, 3, 2, 1)
  c.diffusion.schedule = "cosine"
  c.diffusion.timesteps = 8193
  c.train.lam = 0.0032
  c.train.grad_clip = 1.0
  c.train.ema.enabled = True
  c.eval.steps = 65
  if v.tiny:
    common.apply_tiny(c)
    c.model.context_channels = 8
  if v.steps:
    c.train.num_steps = v.steps
  c.lock()
  return c
