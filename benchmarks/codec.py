"""Speed and size of the cdc_jax codec on one 768x512 photo.

  python -m benchmarks.codec --config configs/eps_linear.py:tiny
  python -m benchmarks.codec --config configs/eps_linear.py --steps 1,2
  python -m benchmarks.codec --model MODEL_DIR [--steps 1,17,65]
  python -m benchmarks.codec --config configs/eps_linear.py --calibrate \
      --steps 1,17 --extrapolate 65 --precision float32,bfloat16 --repeats 1

``--model`` takes a model directory (or training workdir) as the codec
does; ``--config`` builds a randomly initialised model from a config file
(``path[:variant]``) and its entropy tables. Random-init entropy models
give almost only zero y symbols (sigma sits at its 0.1 floor) and the few
+-1 cost 16 to 30 bits each: meaningless rates. ``--calibrate`` rescales
the last layers of g_a, h_a and h_s on the benchmark image
(``cdc_jax.testing.calibrate_entropy_model``) so that the latents and
scales have trained-like magnitudes (about 0.2 bpp for configs' tiny
variants, 0.5 bpp at full size, where z's 256 channels cost 0.3 bpp),
which makes the entropy-coding throughput and the size overheads
meaningful.

The image is ``skimage.data.coffee()`` (600x400), resized with Lanczos to
768x512 (same aspect ratio, nothing cropped), or ``--image PATH`` resized
to cover ``--size`` and centre-cropped.

Measured (medians of ``--repeats`` runs after a warm-up, with
``block_until_ready``): encode (analysis g_a, h_a, h_s on the device; range
coding on the host; ``codec.compress_image`` end to end), entropy coding
throughput (z and y symbols per second, table indexes included), the
ahead-of-time lower and compile time of the decode loop (g_s + DDIM scan)
per S, its run time in total and per step, and the file size against the
model's float estimate and the integer-table estimate. ``--precision
float32,bfloat16`` times the decode loop with the model computing in each
(``cdc_jax.models.cdc.with_dtype``; the entropy decoding is float32
either way); ``--extrapolate 65`` adds clearly labelled estimates from the
per-step slope when a large S is too slow to measure (CPU).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cdc_jax import codec, model_dir, testing
from cdc_jax.coding import range_coder
from cdc_jax.coding import tables as coding_tables
from cdc_jax.eval import metrics
from cdc_jax.imageio import to_float
from cdc_jax.models.cdc import (
  from_config,
  init_params,
  to_config,
  with_dtype,
)
from cdc_jax.sample import Sampler, initial_noise
from configs import common


def model_from_config(spec: str, seed: int):
  """Random-init CDC of a config: (model, model_cfg, diffusion_cfg, params)."""
  config = common.load_config(spec)
  model_cfg = to_config(config.model)
  diffusion_cfg = {
    "schedule": config.diffusion.schedule,
    "timesteps": int(config.diffusion.timesteps),
  }
  model = from_config(model_cfg)
  init = jax.jit(functools.partial(init_params, model))
  params = jax.tree.map(np.array, jax.device_get(init(jax.random.key(seed))))
  return model, model_cfg, diffusion_cfg, params


def fit(img: np.ndarray, h: int, w: int) -> np.ndarray:
  """Resize to cover h x w (Lanczos), then centre-crop."""
  ih, iw, _ = img.shape
  scale = max(h / ih, w / iw)
  rh, rw = max(h, round(ih * scale)), max(w, round(iw * scale))
  im = Image.fromarray(img).resize((rw, rh), Image.LANCZOS)
  top, left = (rh - h) // 2, (rw - w) // 2
  return np.asarray(im)[top : top + h, left : left + w]


def median_time(fn, repeats: int, warmup: bool = True) -> float:
  if warmup:  # eager ops compile on their first call with a new shape
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def fmt_time(s: float) -> str:
  return f"{s * 1e3:.1f} ms" if abs(s) < 1 else f"{s:.2f} s"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--model", help="model directory or training workdir")
  src.add_argument(
    "--config",
    help="config file[:variant] for a random-init model, e.g. "
    "configs/eps_linear.py:tiny",
  )
  p.add_argument("--steps", default="1,17,65", help="decode steps S, a list")
  p.add_argument("--image", help="an image file (default: skimage coffee)")
  p.add_argument("--size", default="512x768", help="H x W (default 512x768)")
  p.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
  p.add_argument(
    "--precision",
    default="float32",
    help="decode precision(s): float32, bfloat16 or a list",
  )
  p.add_argument(
    "--no-warmup",
    dest="warmup",
    action="store_false",
    help="time decode loops without an untimed first run (slow CPUs)",
  )
  p.add_argument(
    "--extrapolate",
    type=lambda v: [int(x) for x in v.split(",")],
    default=[],
    help="S values to extrapolate from the smallest and largest S timed",
  )
  p.add_argument("--seed", type=int, default=0, help="init seed (--config)")
  p.add_argument(
    "--calibrate",
    action="store_true",
    help="rescale the entropy model's last layers (see above)",
  )
  args = p.parse_args(argv)
  if args.model and args.calibrate:
    p.error("--calibrate applies to --config models only")
  steps_list = [int(s) for s in args.steps.split(",")]
  h, w = (int(v) for v in args.size.lower().split("x"))

  if args.image:
    raw = np.asarray(Image.open(args.image).convert("RGB"))
    img_desc = f"{args.image} ({raw.shape[1]}x{raw.shape[0]})"
  else:
    import skimage.data

    raw = skimage.data.coffee()
    img_desc = f"skimage.data.coffee ({raw.shape[1]}x{raw.shape[0]})"
  img = fit(raw, h, w)
  img_desc += f", Lanczos-resized/centre-cropped to {w}x{h}"

  t = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    if args.config:
      model, model_cfg, diff_cfg, params = model_from_config(
        args.config, args.seed
      )
      if args.calibrate:
        params = testing.calibrate_entropy_model(model, params, img)
      path = os.path.join(tmp, "model")
      model_dir.export(path, model_cfg, diff_cfg, params)  # + tables
      model_desc = f"{args.config} (random init, seed {args.seed})"
    else:
      path = args.model
      model_desc = args.model
    cm = codec.load(path)
  setup_s = time.perf_counter() - t
  if args.calibrate:
    model_desc += ", calibrated entropy model"
  n_params = sum(int(np.size(a)) for a in jax.tree.leaves(cm.params))

  dev = jax.devices()[0]
  print(
    f"backend {jax.default_backend()}, device {dev.device_kind} "
    f"({len(jax.devices())}x), jax {jax.__version__}, {os.cpu_count()} CPUs, "
    f"load average {os.getloadavg()[0]:.1f}"
  )
  print(
    f"model {model_desc}: family {cm.family}, {n_params / 1e6:.2f} M params"
  )
  print(f"image {img_desc}")
  print(f"setup (init, tables, export, load) {fmt_time(setup_s)}")

  # -- encode --------------------------------------------------------------
  s0 = steps_list[0]
  t = time.perf_counter()
  res = codec.compress_image(cm, img, steps=s0)
  first_encode = time.perf_counter() - t
  encode_s = median_time(
    lambda: codec.compress_image(cm, img, steps=s0), args.repeats
  )
  padded = codec.pad_image(img, cm.downsampling_factor)
  x = jnp.asarray(to_float(padded))[None]

  def analysis():
    y, z_sym = cm.analyze(cm.params, x)
    return y, z_sym, *cm.hyper(cm.params, z_sym)

  analysis_s = median_time(analysis, args.repeats)
  latents = codec.encode_latents(cm, x)
  z_sym, y_sym, y_idx = latents.z_sym, latents.y_sym, latents.y_indexes
  n_sym = z_sym.size + y_sym.size
  z_idx = coding_tables.channel_indexes(z_sym.shape)

  def entropy_encode():  # table indexes included
    return codec.entropy_encode(cm, latents)

  words = entropy_encode()

  def entropy_decode():
    dec = range_coder.Decoder(words)
    z = dec.decode(z_idx, cm.z_tables)
    return z, dec.decode(y_idx, cm.y_tables)

  z_dec, y_dec = entropy_decode()
  assert np.array_equal(z_dec.reshape(z_sym.shape), z_sym)
  assert np.array_equal(y_dec.reshape(y_sym.shape), y_sym)
  ent_enc_s = median_time(entropy_encode, max(args.repeats, 5))
  ent_dec_s = median_time(entropy_decode, max(args.repeats, 5))
  # The exact integer scale path (both sides run it once per image).
  scales_s = median_time(lambda: cm.scales(z_sym), max(args.repeats, 3))

  header, stream = codec.parse(cm, res.data)
  # The decoder's host side: entropy decode with the hyper-decoder between
  # z and y, and y_hat = y_sym + mu.
  decode_entropy_s = median_time(
    lambda: codec.decode_latents(cm, header, stream), args.repeats
  )

  # -- size ----------------------------------------------------------------
  z_bits = range_coder.estimate_bits(z_sym, z_idx, cm.z_tables)
  int_bits = z_bits + range_coder.estimate_bits(y_sym, y_idx, cm.y_tables)
  payload_bits = 8 * len(stream)
  file_bits = 8 * len(res.data)
  rows = [
    ("encode: analysis g_a+h_a+h_s (device)", fmt_time(analysis_s)),
    (
      "encode: range coding (host)",
      f"{fmt_time(ent_enc_s)}, {n_sym / ent_enc_s / 1e6:.2f} M symbols/s",
    ),
    (
      "encode: compress_image total",
      f"{fmt_time(encode_s)} (first call, compiles: {fmt_time(first_encode)})",
    ),
    (
      "decode: range decoding (host)",
      f"{fmt_time(ent_dec_s)}, {n_sym / ent_dec_s / 1e6:.2f} M symbols/s",
    ),
    ("exact scale indexes (host, both sides)", fmt_time(scales_s)),
    ("decode: entropy decode incl. h_s", fmt_time(decode_entropy_s)),
    ("symbols", f"{z_sym.size} z + {y_sym.size} y"),
    (
      "file",
      f"{len(res.data)} B ({len(res.data) - len(stream)} B header), "
      f"{metrics.bpp(len(res.data), h, w):.4f} bpp",
    ),
    (
      "model float estimate",
      f"{res.estimated_bits:.0f} bits, {res.estimated_bpp:.4f} bpp",
    ),
    (
      "file over float estimate",
      f"{100 * (file_bits / res.estimated_bits - 1):+.2f} % (payload only "
      f"{100 * (payload_bits / res.estimated_bits - 1):+.2f} %)",
    ),
    (
      "file over integer-table estimate",
      f"{100 * (file_bits / int_bits - 1):+.2f} % (payload only "
      f"{100 * (payload_bits / int_bits - 1):+.2f} %, {int_bits:.0f} bits)",
    ),
  ]
  width = max(len(r[0]) for r in rows)
  print()
  for name, value in rows:
    print(f"{name:<{width}}  {value}")

  # -- decode loop per S -----------------------------------------------------
  y_hat = codec.decode_latents(cm, header, stream)
  hp, wp = codec.padded_size(h, w, cm.downsampling_factor)
  x_init = initial_noise(
    header.seed, (1, hp, wp, cm.model.channels), header.gamma
  )
  for precision in args.precision.split(","):
    decode_loops(cm, precision, steps_list, y_hat, x_init, args)
    print(f"  (+ entropy decode incl. h_s: {fmt_time(decode_entropy_s)})")
  return 0


def decode_loops(cm, precision: str, steps_list, y_hat, x_init, args):
  """Times g_s + the DDIM loop per S with the model in ``precision``."""
  sampler = Sampler(with_dtype(cm.model, precision), cm.schedule)
  hp, wp = x_init.shape[1:3]
  print(
    f"\ndecode loop in {precision} (g_s + DDIM loop, batch 1, {wp}x{hp}, "
    f"median of {args.repeats}, load {os.getloadavg()[0]:.1f})"
  )
  cols = ("S", "lower", "compile", "loop", "per step")
  print("{:>5} {:>10} {:>10} {:>10} {:>10}".format(*cols))
  loops = {}
  for s in steps_list:
    # decode_latent as one jitted program (its step tables constants).
    loop = jax.jit(functools.partial(sampler.decode_latent, steps=s))
    call_args = (cm.params, y_hat, x_init)
    t = time.perf_counter()
    lowered = loop.lower(*call_args)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    loop_s = median_time(
      lambda c=compiled, a=call_args: c(*a), args.repeats, args.warmup
    )
    loops[s] = loop_s
    print(
      f"{s:>5} {fmt_time(lower_s):>10} {fmt_time(compile_s):>10} "
      f"{fmt_time(loop_s):>10} {fmt_time(loop_s / s):>10}"
    )
  if len(loops) >= 2:
    (s1, t1), (s2, t2) = min(loops.items()), max(loops.items())
    if s2 > s1:
      slope = (t2 - t1) / (s2 - s1)
      print(
        f"per step from the S={s1} and S={s2} loops: {fmt_time(slope)} "
        f"(the rest, g_s and loop setup: {fmt_time(t1 - s1 * slope)})"
      )
      for s in args.extrapolate:
        print(
          f"S={s} EXTRAPOLATED (not measured): "
          f"{fmt_time(t1 + (s - s1) * slope)}"
        )


if __name__ == "__main__":
  sys.exit(main())
