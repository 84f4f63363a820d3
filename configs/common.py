"""Config pieces shared by the released configs, and variant parsing.

A config file's ``get_config(arg)`` takes a variant string (the part after
``:`` in ``--config=configs/eps_linear.py:tiny``): comma-separated words,
each a preset (``tiny``) or ``key=value`` for a few shortcuts
(``steps=500``). Everything else is overridden with absl flags,
``--config.train.lr=1e-4``; the config is locked, so a typo fails.
"""

from __future__ import annotations

import importlib.util

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py:variant' -> its config, outside absl (benchmarks)."""
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_cdc_config", path)
  if mod_spec is None or mod_spec.loader is None:
    raise SystemExit(f"{path}: not a config file")
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'tiny,steps=10' into {'tiny': True, 'steps': 10} over defaults."""
  out = ml_collections.ConfigDict(defaults)
  for word in filter(None, (arg or "").split(",")):
    key, _, value = word.partition("=")
    if key not in out:
      raise ValueError(
        f"unknown config variant {key!r}; known: {', '.join(sorted(out))}"
      )
    if not value:
      out[key] = True
      continue
    kind = type(defaults[key])
    try:
      out[key] = kind(value)
    except ValueError:
      raise ValueError(
        f"config variant {key}={value}: not {'an' if kind is int else 'a'} "
        f"{kind.__name__} (e.g. {key}={defaults[key] or 1000})"
      ) from None
  return out


def base_config() -> ml_collections.ConfigDict:
  """Fields both families share; the family files set the rest."""
  c = ml_collections.ConfigDict()

  # model: the kwargs of cdc_jax.models.cdc.CDC, one to one.
  c.model = ml_collections.ConfigDict(
    dict(
      family="eps",
      dim=64,
      dim_mults=(1, 2, 3, 4, 5, 6),
      context_dim_mults=(1, 2, 3, 4),
      reverse_context_dim_mults=ml_collections.FieldReference(
        None, field_type=tuple
      ),
      hyper_dims_mults=(4, 4, 4),
      context_channels=3,
      channels=3,
      # Compute dtype: "bfloat16" on accelerators (params, optimizer
      # state, norms, softmax, rate and loss stay float32).
      dtype="float32",
      remat=False,  # recompute U-Net block activations (less memory)
    )
  )

  c.diffusion = ml_collections.ConfigDict(
    dict(
      schedule="linear",
      timesteps=20000,
      # rho: weight of the LPIPS-VGG term, loss = lam * bpp + (1 - rho) *
      # diffusion + rho * LPIPS (the released perceptual models: 0.9).
      aux_weight=0.0,
      # rho > 0: LPIPS-VGG weights, an .npz (lpips_vgg.npz that
      # `python -m cdc_jax.convert checkpoint` writes beside a converted
      # rho > 0 checkpoint, or `python -m cdc_jax.convert lpips`).
      lpips_weights="",
      # LPIPS dropout (p = 0.5) on during training, as the original;
      # False: a deterministic perceptual term.
      lpips_dropout=True,
      # Deviations from the original (0 = off), for the tiny demos: draw
      # training t from [train_t_min * T, T) instead of [0, T); raise the
      # loss's x0-space weight to >= loss_weight_floor (x family: weight
      # max(min(SNR, 5), floor); eps: L1 weight max(1, floor / sqrt(SNR))).
      # See docs/training.md, "The quick start's tiny demo".
      train_t_min=0.0,
      loss_weight_floor=0.0,
    )
  )

  c.train = ml_collections.ConfigDict(
    dict(
      num_steps=1_000_000,
      batch_size=4,  # global batch, split over all devices
      seed=0,
      # Optimizer: Adam with PyTorch defaults.
      lr=5e-5,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      # "paper": lr * decay^floor(step / every), floored at lr_min;
      # "released": the original's effective schedule (docs/model.md §8.2):
      # lr until `every`, then lr * decay^(step - every + 1), floored.
      lr_schedule="paper",
      lr_decay=0.8,
      lr_decay_every=100_000,
      lr_min=2e-5,
      grad_clip=1.0,  # global-norm clipping; 0 disables
      # Rate weight lambda: warmup_lambda for warmup_steps, then lam.
      lam=0.0032,
      warmup_lambda=1e-6,
      warmup_steps=700_000,
      # EMA of the params (ema_pytorch semantics, docs/model.md §8.4).
      ema=ml_collections.ConfigDict(
        dict(
          enabled=True,
          beta=0.999,
          update_every=10,
          update_after_step=100,
          power=0.75,
        )
      ),
      init_from="",  # a model directory (converted or exported weights)
    )
  )

  c.data = ml_collections.ConfigDict(
    dict(
      name="embedded",
      path="",
      split="train",
      crop_size=256,
      image_key="image",  # the image feature of a tfds:<name> dataset
      # "threads" (cdc_jax.data.loader) or "grain" (worker processes);
      # both give the same batches (cdc_jax/data/pipeline.py).
      pipeline="threads",
      workers=0,  # grain worker processes (0: a thread)
    )
  )

  c.log = ml_collections.ConfigDict(dict(every=100, progress=True))

  # Orbax checkpoints in workdir/checkpoints (saved every `every` steps and
  # at the end; the newest `keep` are kept).
  c.checkpoint = ml_collections.ConfigDict(dict(every=5000, keep=3))

  # Evaluation during training (every `every` steps, on a small held-out
  # set: mean PSNR, estimated bpp, MS-SSIM when the crops are >= 161 px,
  # LPIPS when diffusion.lpips_weights is set) and at the end.
  c.eval = ml_collections.ConfigDict(
    dict(
      every=5000,
      steps=65,  # decode steps
      sampler="ddim",  # decode sampler: ddim or dpmpp2m (cdc_jax.samplers)
      gamma=0.8,  # x_T = gamma * N(0, I)
      size=256,  # center crops of this side (at most; one side for all)
      data="",  # "": the embedded held-out photo; else an image folder
      max_images=4,  # the folder's first images (sorted by path)
      # FID InceptionV3 weights (.npz or .pth) for --mode=eval's FID/KID;
      # "": off. See python -m cdc_jax.convert inception.
      inception_weights="",
    )
  )
  return c


def apply_tiny(c: ml_collections.ConfigDict) -> None:
  """A small model that trains on 2 CPU cores in minutes."""
  c.model.dim = 8
  c.data.crop_size = 64
  c.train.batch_size = 2
  c.train.num_steps = 300
  c.train.lr = 5e-4
  c.train.lr_min = 1e-4
  c.train.lr_decay_every = 200
  c.train.warmup_steps = 150
  c.train.ema.update_after_step = 20
  c.train.ema.update_every = 5
  c.log.every = 25
  c.eval.every = 150
  c.checkpoint.every = 150
  c.eval.steps = 8
  c.eval.size = 64
