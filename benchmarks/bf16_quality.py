"""What bfloat16 compute changes: training loss and decoded images.

  python -m benchmarks.bf16_quality --config configs/eps_linear.py:tiny \
      --steps 300 --every 25 --plot /tmp/bf16_quality_eps.png

1. Training: the same initial state and the same batches (the embedded
   photos, ``Loader`` seed 0) trained ``--steps`` steps with
   ``model.dtype`` float32 and bfloat16 (params, optimizer state and the
   loss stay float32 in both). Every ``--every`` steps it prints the mean
   loss of the window for both and their difference; at the end the mean
   over the last quarter, the mean |per-step difference| (both runs see the
   same t, noise and crops, so a step's difference is the precision's) and
   how far the params drifted apart. ``--plot`` writes the curves (PNG).
2. Decoding: the float32-trained params decode the held-out photo
   (chelsea, centre crop ``--size``) from the same latents (y_hat of the
   float32 context model, as the codec's) and the same x_T with a float32
   and a bfloat16 model (``cdc_jax.models.cdc.with_dtype``), for each S in
   ``--decode-steps``. Printed: PSNR of each decode against the original,
   PSNR between the two decodes (uint8, as written to disk), max |diff| of
   the floats and the share of pixels whose uint8 value differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import diffusion, sharding
from cdc_jax.data.loader import Loader
from cdc_jax.data.sources import HELD_OUT, EmbeddedSource, embedded_images
from cdc_jax.eval import metrics
from cdc_jax.imageio import to_float, to_uint8
from cdc_jax.models.cdc import CDC, from_config, with_dtype
from cdc_jax.optim import make_optimizer
from cdc_jax.sample import Sampler, initial_noise
from cdc_jax.train_state import decoding_params, init_state
from cdc_jax.train_step import make_train_step
from configs import common

DTYPES = ("float32", "bfloat16")


def train(config, dtype: str, host_state, batches):
  """Per-step metrics and the final state of one run in ``dtype``."""
  with config.unlocked():
    config.model.dtype = dtype
  model = from_config(config.model)
  tx = make_optimizer(config.train)
  mesh = sharding.make_mesh()
  state_sharding = sharding.replicated(mesh, host_state)
  step, batch_sharding = make_train_step(
    config, model, tx, mesh, state_sharding
  )
  state = jax.device_put(host_state, state_sharding)
  out = []
  t0 = time.perf_counter()
  for i, batch in enumerate(batches):
    if i == 1:  # the first step compiled
      first, t0 = time.perf_counter() - t0, time.perf_counter()
    state, m = step(state, jax.device_put(batch, batch_sharding))
    out.append({k: float(v) for k, v in jax.device_get(m).items()})
  per_step = (time.perf_counter() - t0) / max(len(batches) - 1, 1)
  return out, jax.device_get(state), (first, per_step)


def loss_report(runs: dict, every: int) -> None:
  f32 = np.array([m["loss"] for m in runs["float32"]])
  b16 = np.array([m["loss"] for m in runs["bfloat16"]])
  print(f"\n{'steps':>11} {'float32':>9} {'bfloat16':>9} {'diff':>9} (means)")
  for s in range(0, len(f32), every):
    a, b = f32[s : s + every].mean(), b16[s : s + every].mean()
    last = min(s + every, len(f32)) - 1
    print(f"{s:>5}-{last:<5} {a:9.4f} {b:9.4f} {b - a:+9.4f}")
  q = max(1, len(f32) // 4)
  a, b = f32[-q:].mean(), b16[-q:].mean()
  print(
    f"last {q} steps: float32 {a:.4f}, bfloat16 {b:.4f}, difference "
    f"{b - a:+.4f} ({100 * (b - a) / a:+.2f} %)"
  )
  m0 = {dt: runs[dt][0] for dt in DTYPES}
  print(
    "step 0 (same params, bf16 vs f32 compute only): loss "
    f"{m0['float32']['loss']:.5f} vs {m0['bfloat16']['loss']:.5f}, bpp "
    f"{m0['float32']['bpp']:.4f} vs {m0['bfloat16']['bpp']:.4f}"
  )
  d = np.abs(b16 - f32)
  print(
    f"|per-step difference|: mean {d.mean():.4f}, first 10 steps "
    f"{d[:10].mean():.5f}, last {q} {d[-q:].mean():.4f} (mean loss "
    f"{f32.mean():.4f})"
  )
  for k in ("diffusion_loss", "bpp"):
    x = np.array([m[k] for m in runs["float32"]])[-q:].mean()
    y = np.array([m[k] for m in runs["bfloat16"]])[-q:].mean()
    print(f"  {k} (last {q}): float32 {x:.4f}, bfloat16 {y:.4f}")


def plot(runs: dict, path: str, title: str, every: int) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  kernel = np.ones(every) / every
  for dt, color in zip(DTYPES, ("tab:blue", "tab:red"), strict=True):
    loss = np.array([m["loss"] for m in runs[dt]])
    ax1.plot(loss, color=color, alpha=0.25, lw=0.7)
    smooth = np.convolve(loss, kernel, mode="valid")
    x = np.arange(every - 1, len(loss))
    ax1.plot(x, smooth, color=color, label=dt)
  ax1.set_ylabel(f"loss (light: per step, dark: mean of {every})")
  ax1.legend()
  ax1.set_title(title)
  diff = np.array([m["loss"] for m in runs["bfloat16"]]) - np.array(
    [m["loss"] for m in runs["float32"]]
  )
  ax2.plot(diff, lw=0.7)
  ax2.axhline(0, color="k", lw=0.5)
  ax2.set_ylabel("loss bf16 - float32")
  ax2.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"plot: {path}")


def decode_report(config, params, size, steps_list, seed: int) -> None:
  img = dict(embedded_images())[HELD_OUT]
  h, w = size
  top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
  img = img[top : top + h, left : left + w]
  with config.unlocked():
    config.model.dtype = "float32"
  model = from_config(config.model)
  sched = diffusion.make_schedule(
    config.diffusion.schedule, config.diffusion.timesteps
  )
  x = jnp.asarray(to_float(img))[None]
  ctx = jax.jit(
    lambda p: model.apply({"params": p}, x, method=CDC.context_model)
  )(params)
  x_init = initial_noise(seed, x.shape, config.eval.gamma)
  samplers = {dt: Sampler(with_dtype(model, dt), sched) for dt in DTYPES}
  print(
    f"\ndecode of {HELD_OUT} {w}x{h} (float32-trained params, same y_hat "
    f"and x_T, gamma {config.eval.gamma}), {float(ctx['bpp'][0]):.3f} bpp "
    "estimated"
  )
  cols = ("S", "PSNR f32", "PSNR bf16", "f32 vs bf16", "max|diff|", "px diff")
  print("{:>4} {:>10} {:>10} {:>12} {:>10} {:>8}".format(*cols))
  for s in steps_list:
    rec = {
      dt: np.asarray(smp.decode_latent(params, ctx["y_hat"], x_init, s))[0]
      for dt, smp in samplers.items()
    }
    u8 = {dt: to_uint8(r) for dt, r in rec.items()}
    a, b = u8["float32"], u8["bfloat16"]
    print(
      f"{s:>4} {metrics.psnr(img, a):>10.2f} {metrics.psnr(img, b):>10.2f} "
      f"{metrics.psnr(a, b):>12.2f} "
      f"{np.abs(rec['float32'] - rec['bfloat16']).max():>10.4f} "
      f"{100 * np.mean(a != b):>7.2f}%"
    )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/eps_linear.py:tiny")
  p.add_argument("--steps", type=int, default=300, help="training steps")
  p.add_argument("--every", type=int, default=25, help="print window")
  p.add_argument("--plot", default="", help="PNG path for the loss curves")
  p.add_argument("--decode-steps", default="8,65", help="S values, a list")
  p.add_argument("--size", default="256x384", help="decode crop H x W")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  config = common.load_config(args.config)
  config.unlock()
  config.model.dtype = "float32"
  model = from_config(config.model)
  tx = make_optimizer(config.train)
  host = jax.device_get(
    init_state(model, tx, jax.random.key(args.seed), config.train.ema.enabled)
  )
  loader = Loader(
    EmbeddedSource(), config.train.batch_size, config.data.crop_size, 0
  )
  batches = [loader.batch_at(i) for i in range(args.steps)]
  print(
    f"{args.config}: family {config.model.family}, dim {config.model.dim}, "
    f"batch {config.train.batch_size}, crop {config.data.crop_size}, "
    f"{args.steps} steps; backend {jax.default_backend()}, load "
    f"{os.getloadavg()[0]:.1f}"
  )
  runs, states = {}, {}
  for dt in DTYPES:
    runs[dt], states[dt], (first, per_step) = train(config, dt, host, batches)
    print(
      f"trained {dt}: first step (compile) {first:.1f} s, then "
      f"{1e3 * per_step:.0f} ms/step"
    )
  loss_report(runs, args.every)
  pa = jax.tree.leaves(states["float32"].params)
  pb = jax.tree.leaves(states["bfloat16"].params)
  drift = [
    np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)
    for a, b in zip(pa, pb, strict=True)
  ]
  total = np.sqrt(
    sum(np.sum((a - b) ** 2) for a, b in zip(pa, pb, strict=True))
  )
  total /= np.sqrt(sum(np.sum(a**2) for a in pa))
  print(
    f"params after training, |bf16 - f32| / |f32|: all {total:.2e}; per "
    f"tensor median {np.median(drift):.2e}, 90th percentile "
    f"{np.percentile(drift, 90):.2e}"
  )
  if args.plot:
    title = f"{args.config}: float32 vs bfloat16 compute"
    plot(runs, args.plot, title, args.every)
  size = tuple(int(v) for v in args.size.lower().split("x"))
  steps_list = [int(s) for s in args.decode_steps.split(",")]
  params = decoding_params(states["float32"])  # EMA where the config has it
  decode_report(config, params, size, steps_list, args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
