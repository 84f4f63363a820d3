"""Cost of decode progress reporting.

  python -m benchmarks.decode_progress                       # tiny eps, 64x64
  python -m benchmarks.decode_progress --config configs/eps_linear.py \
      --size 256x256 --steps 8

``cdc_jax.sample.Sampler`` runs the DDIM steps as a ``fori_loop`` over a
window [start, stop) of the step tables; with a progress function the host
runs the same compiled loop window by window and reports after each
(windows of about ``REPORT_EVERY_S``, timed per (shape, S); a warm
decode of a fast model is one window). This times, interleaved
round by round (medians of ``--repeats``), the decode loop (g_s + S steps,
batch 1):

* ``plain``: g_s and a ``lax.scan`` over the steps in one program (the
  sampler before progress existed, built here);
* ``none``: ``Sampler.decode_latent`` with ``progress=None``;
* ``progress``: with a progress function (the call waits for the result);
* ``every``: with progress, ``REPORT_EVERY_S = 0``: a report after every
  step, the worst case;

and checks that all give identical floats. Wall time is reported, and
the process CPU time, which a loaded machine disturbs less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import codec, model_dir, sample, samplers, testing
from cdc_jax.models.cdc import CDC
from cdc_jax.sample import initial_noise


def plain_decoder(sampler):
  """g_s + a DDIM ``lax.scan`` for ``sampler``'s model, one program."""
  model, family = sampler.model, sampler.family

  @jax.jit
  def run(params, y_hat, x_init, abar, abar_prev, time):
    context = model.apply({"params": params}, y_hat, method=CDC.g_s)
    b = x_init.shape[0]

    def step(x, per_step):
      a, a_prev, t = per_step
      t = jnp.full((b, 1), t, jnp.float32)
      out = model.apply({"params": params}, x, t, context, method=CDC.denoise)
      return samplers.ddim_step(x, out, a, a_prev, family), None

    x, _ = jax.lax.scan(step, x_init, (abar, abar_prev, time))
    return x

  return run


def every_step(sampler, params, y_hat, x_init, steps, progress):
  """decode_latent with a progress report after every step."""
  saved, sample.REPORT_EVERY_S = sample.REPORT_EVERY_S, 0.0
  try:
    return sampler.decode_latent(params, y_hat, x_init, steps, progress)
  finally:
    sample.REPORT_EVERY_S = saved


def load_model(config: str | None, tmp: str):
  path = os.path.join(tmp, "model")
  if config is None:
    testing.export_tiny(path, "eps")
    return codec.load(path), "cdc_jax.testing tiny eps (dim 4)"
  from benchmarks.codec import model_from_config

  _, model_cfg, diff_cfg, params = model_from_config(config, 0)
  model_dir.export(path, model_cfg, diff_cfg, params)
  return codec.load(path), f"{config} (random init)"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", help="config[:variant] (default: tiny eps)")
  p.add_argument("--size", default="64x64", help="H x W")
  p.add_argument("--steps", type=int, default=8, help="decode steps S")
  p.add_argument("--repeats", type=int, default=7, help="timed rounds")
  args = p.parse_args(argv)
  h, w = (int(v) for v in args.size.split("x"))
  with tempfile.TemporaryDirectory() as tmp:
    cm, desc = load_model(args.config, tmp)
  img = testing.photo("astronaut", (h, w))
  blob = codec.compress(cm, img, steps=args.steps)
  header, stream = codec.parse(cm, blob)
  y_hat = codec.decode_latents(cm, header, stream)
  hp, wp = codec.padded_size(h, w, cm.downsampling_factor)
  x_init = initial_noise(header.seed, (1, hp, wp, 3), header.gamma)
  plain = plain_decoder(cm.sampler)
  calls = {"progress": [], "every": []}

  def report(name):
    calls[name].clear()  # keeps the last decode's reports
    return lambda done, total: calls[name].append(done)

  variants = {
    # The per-step tables made per call, as the sampler does.
    "plain": lambda: plain(
      cm.params, y_hat, x_init, *cm.sampler.tables(args.steps)
    ),
    "none": lambda: cm.sampler.decode_latent(
      cm.params, y_hat, x_init, args.steps
    ),
    "progress": lambda: cm.sampler.decode_latent(
      cm.params, y_hat, x_init, args.steps, report("progress")
    ),
    "every": lambda: every_step(
      cm.sampler, cm.params, y_hat, x_init, args.steps, report("every")
    ),
  }
  outs = {
    k: np.asarray(jax.block_until_ready(f())) for k, f in variants.items()
  }
  same = all(np.array_equal(outs["plain"], o) for o in outs.values())
  wall: dict = {k: [] for k in variants}
  cpu: dict = {k: [] for k in variants}
  for _ in range(args.repeats):
    for k, f in variants.items():
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(f())
      wall[k].append(time.perf_counter() - t)
      cpu[k].append(time.process_time() - c)
  print(f"{desc}, {wp}x{hp}, S={args.steps}, {args.repeats} rounds")
  print(f"identical floats ({', '.join(variants)}): {same}")
  print(f"reports of the last decodes: {calls}")
  for name, runs in (("wall", wall), ("cpu", cpu)):
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in med.items():
      over = 100 * (v / med["plain"] - 1)
      print(
        f"  {name:<4} {k:<9} {v * 1e3:9.1f} ms  {v / args.steps * 1e3:8.2f} "
        f"ms/step  {over:+6.2f} %  (min {min(runs[k]) * 1e3:.1f} ms)"
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
