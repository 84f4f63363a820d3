"""First and second wall time of ``python -m cdc_jax.codec decompress``.

  python -m benchmarks.compile_cache                        # tiny eps model
  python -m benchmarks.compile_cache --config configs/x_cosine.py --steps 2
  python -m benchmarks.compile_cache --model MODEL_DIR --size 512x768

Compresses one photo once, then decompresses the same file several times,
each in a new process with a new, empty persistent compilation cache
(``CDC_COMPILE_CACHE=DIR``, ``cdc_jax.compile_cache``): run 1 compiles and
writes the cache, run 2 loads the compiled programs from it, and a run
with ``CDC_COMPILE_CACHE=off`` shows the cost without a cache. Prints each
command, its wall time (process start to exit: imports, model load,
compile or cache load, decode, PNG write), the cache entries after it, and
whether the decoded PNGs are identical.

The model: ``--model`` (a model directory or training workdir), else a
randomly initialised model of ``--config`` (entropy model calibrated on
the image, ``cdc_jax.testing``), else the tiny eps model of
``cdc_jax.testing``. The image: ``skimage.data.chelsea`` centre-cropped to
``--size`` (HxW).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(args, tmp: str, img) -> str:
  """The model directory to benchmark (made in ``tmp`` unless given)."""
  from cdc_jax import model_dir, testing

  if args.model:
    return args.model
  out = os.path.join(tmp, "model")
  if not args.config:
    testing.export_tiny(out, "eps", calib=img)
    return out
  from cdc_jax.models.cdc import from_config, to_config
  from configs import common

  c = common.load_config(args.config)
  model = from_config(c.model)
  params = testing.random_params(model)
  params = testing.calibrate_entropy_model(model, params, img)
  dc = c.diffusion
  diffusion = {"schedule": dc.schedule, "timesteps": int(dc.timesteps)}
  model_dir.export(out, to_config(c.model), diffusion, params)
  return out


def _image(size: str):
  from cdc_jax import testing

  h, w = (int(v) for v in size.lower().split("x"))
  full = testing.photo("chelsea")
  top, left = (full.shape[0] - h) // 2, (full.shape[1] - w) // 2
  return testing.photo("chelsea", (h, w), max(top, 0), max(left, 0))


def _entries(cache: str) -> int:
  if not os.path.isdir(cache):
    return 0
  return sum(n.endswith("-cache") for n in os.listdir(cache))


def _run(cmd: list[str], cache: str) -> float:
  """Wall seconds of ``cmd`` with CDC_COMPILE_CACHE=cache."""
  env = {**os.environ, "CDC_COMPILE_CACHE": cache}
  shown = " ".join(cmd[1:] if cmd[0] == sys.executable else cmd)
  print(f"$ CDC_COMPILE_CACHE={cache} python {shown}", flush=True)
  t0 = time.perf_counter()
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  if res.returncode:
    sys.exit(f"failed ({res.returncode}):\n{res.stderr[-3000:]}")
  return seconds


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="", help="model directory or workdir")
  p.add_argument("--config", default="", help="random-init model of a config")
  p.add_argument("--size", default="256x384", help="image HxW")
  p.add_argument("--steps", type=int, default=17, help="DDIM decode steps")
  p.add_argument("--no-off-run", action="store_true", help="skip the off run")
  args = p.parse_args()

  from cdc_jax.imageio import save_png

  tmp = tempfile.mkdtemp(prefix="cdc_cc_bench_")
  img = _image(args.size)
  src, cdcj = os.path.join(tmp, "in.png"), os.path.join(tmp, "in.cdcj")
  save_png(src, img)
  model = _model(args, tmp, img)
  codec = [sys.executable, "-m", "cdc_jax.codec"]
  _run(
    [*codec, "compress", "--model", model, src, cdcj, "--steps"]
    + [str(args.steps)],
    "off",
  )
  cache = os.path.join(tmp, "xla_cache")
  runs = [("first", cache), ("second", cache)]
  if not args.no_off_run:
    runs.append(("off", "off"))
  rows, outputs = [], []
  for name, where in runs:
    out = os.path.join(tmp, f"out_{name}.png")
    cmd = [*codec, "decompress", "--model", model, cdcj, out]
    seconds = _run(cmd, where)
    rows.append((name, seconds, _entries(cache)))
    with open(out, "rb") as f:
      outputs.append(f.read())
  import jax

  print(
    f"\ndecompress of a {args.size} image, {args.steps} steps, "
    f"{jax.devices()[0].platform}, jax {jax.__version__}"
  )
  for name, seconds, n in rows:
    print(f"  {name:>6} run: {seconds:6.2f} s wall, {n} cache entries after")
  same = all(o == outputs[0] for o in outputs)
  print(f"  decoded PNGs identical: {same}; files in {tmp}")


if __name__ == "__main__":
  main()
