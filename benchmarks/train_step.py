"""Speed and memory of the jitted, data-parallel train step.

  python benchmarks/train_step.py --config configs/eps_linear.py:tiny \
      --batch 2 --crop 64 --steps 20
  python benchmarks/train_step.py --config configs/eps_linear.py \
      --batch 1 --crop 256 --steps 5 [--dtype bfloat16]

Builds the state and step exactly as ``cdc_jax.train`` does (all local
devices, state donated), then prints the compile time (first call), the
median step time over ``--steps`` calls (each ``block_until_ready``),
images/s, and the peak memory: the device's ``peak_bytes_in_use`` where the
backend reports it, else the process's max RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cdc_jax import sharding  # noqa: E402
from cdc_jax.models.cdc import from_config  # noqa: E402
from cdc_jax.optim import make_optimizer  # noqa: E402
from cdc_jax.train_state import init_state  # noqa: E402
from cdc_jax.train_step import make_train_step  # noqa: E402
from configs import common  # noqa: E402


def peak_memory() -> str:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB (device peak)"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return f"{rss:.2f} GiB (process max RSS)"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="config file[:variant]")
  p.add_argument("--batch", type=int, default=None, help="global batch")
  p.add_argument("--crop", type=int, default=None, help="crop size (64k)")
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  p.add_argument("--dtype", default=None, help="model compute dtype")
  args = p.parse_args()

  config = common.load_config(args.config)
  with config.unlocked():
    if args.batch:
      config.train.batch_size = args.batch
    if args.crop:
      config.data.crop_size = args.crop
    if args.dtype:
      config.model.dtype = args.dtype
  b, s = config.train.batch_size, config.data.crop_size
  mesh = sharding.make_mesh()
  sharding.check_batch(b, mesh)
  model = from_config(config.model)
  tx = make_optimizer(config.train)
  ema = config.train.ema.enabled
  state = init_state(model, tx, jax.random.key(0), ema)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  state_sharding = sharding.replicated(mesh, state)
  state = jax.device_put(state, state_sharding)
  step_fn, batch_sharding = make_train_step(
    config, model, tx, mesh, state_sharding
  )
  rng = np.random.default_rng(0)
  batch = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
  batch = jax.device_put(batch, batch_sharding)

  t0 = time.perf_counter()
  state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  dev = jax.devices()[0]
  print(
    f"backend {jax.default_backend()}, {len(jax.devices())}x "
    f"{dev.device_kind}, jax {jax.__version__}, {os.cpu_count()} CPUs"
  )
  print(
    f"config {args.config}: {n_params / 1e6:.2f} M params, family "
    f"{config.model.family}, dtype {config.model.dtype}, batch {b}, "
    f"crop {s}"
  )
  print(f"compile + first step  {compile_s:8.2f} s")
  print(
    f"step (median of {len(times)}) {med * 1e3:8.1f} ms  "
    f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})"
  )
  print(f"images/s              {b / med:8.2f}")
  print(f"peak memory           {peak_memory()}")
  print(f"loss {float(m['loss']):.4f}, finite: {bool(np.isfinite(m['loss']))}")


if __name__ == "__main__":
  main()
