"""Speed, memory and MFU of the jitted, data-parallel train step.

  python -m benchmarks.train_step --config configs/eps_linear.py:tiny \
      --batch 2 --crop 64 --steps 20
  python -m benchmarks.train_step --config configs/eps_linear.py --crop 256 \
      --batch 4,16 --dtype float32,bfloat16 --remat 0,1 --steps 3
  python -m benchmarks.train_step --config configs/x_cosine.py --crop 256 \
      --batch 4 --steps 0            # compile only: FLOPs and memory plan

Builds the state and the step as ``cdc_jax.train`` does (all local
devices, the state replicated and donated, the batch split over the mesh),
compiles it ahead of time and prints per run:

* lower and compile time (``jit(...).lower(...)``, ``.compile()``);
* the median step time over ``--steps`` calls (each ``block_until_ready``,
  after one untimed call) and images/s;
* XLA's cost analysis: FLOPs per step and device of the compiled program
  (remat's recomputation included) and of the model (the program without
  remat, from the lowered HLO, not compiled); MFU = model FLOPs / step time
  / peak FLOP/s, HFU the same with the compiled FLOPs. The peak per device
  comes from ``--peak-flops`` or a table of known accelerators (dense,
  no sparsity; float32 on GPUs counted at the TF32 peak, which JAX's
  default matmul precision uses; on TPUs at the bf16 peak). On CPU MFU is
  not meaningful and is printed only with ``--peak-flops``;
* memory: XLA's buffer plan of the compiled step (arguments, outputs,
  temporaries, aliased = donated) and the measured peak: the device's
  ``peak_bytes_in_use`` where the backend reports it (GPU, TPU), else the
  process's max RSS (CPU; includes the Python process and the compiler).

Several values of ``--batch``, ``--dtype`` or ``--remat`` run each
combination in its own process (a clean peak memory and compile) and end
with a table. ``--json`` prints one JSON line per run instead.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from cdc_jax import diffusion, sharding
from cdc_jax.losses import schedule_arrays
from cdc_jax.models.cdc import from_config
from cdc_jax.optim import make_optimizer
from cdc_jax.train_state import init_state
from cdc_jax.train_step import train_step
from configs import common

# Dense peak FLOP/s per device (vendor datasheets): (bf16, float32 as JAX
# runs it by default: TF32 on NVIDIA Ampere and later, bf16 passes on TPU).
PEAK_FLOPS = {
  "H200": (989e12, 494e12),
  "H100": (989e12, 494e12),  # SXM; PCIe is lower, pass --peak-flops
  "A100": (312e12, 156e12),
  "L4": (121e12, 60e12),
  "TPU v4": (275e12, 275e12),
  "TPU v5 lite": (197e12, 197e12),  # v5e
  "TPU v5p": (459e12, 459e12),
  "TPU v5": (459e12, 459e12),
  "TPU v6 lite": (918e12, 918e12),  # v6e (Trillium)
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  for name, (bf16, f32) in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else f32
  return None


def peak_memory() -> tuple[float, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"], "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS"


def flops_of(cost) -> float:
  if isinstance(cost, list | tuple):  # older jax: one dict per module
    return sum(c.get("flops", 0.0) for c in cost)
  return float((cost or {}).get("flops", 0.0))


def make_config(args, batch: int, dtype: str, remat: bool):
  config = common.load_config(args.config)
  with config.unlocked():
    config.train.batch_size = batch
    if args.crop:
      config.data.crop_size = args.crop
    config.model.dtype = dtype
    config.model.remat = remat
  if config.diffusion.aux_weight:
    raise SystemExit(
      f"{args.config}: diffusion.aux_weight > 0 (LPIPS) is not benchmarked "
      "here; pass --config.diffusion.aux_weight=0 to the config or use a "
      "config without the perceptual term"
    )
  return config


def jit_step(config, model, tx, mesh, state_sharding, donate=True):
  """The step exactly as ``train_step.make_train_step`` jits it."""
  dc = config.diffusion
  step = functools.partial(
    train_step,
    model=model,
    tx=tx,
    config=config,
    sched_arrays=schedule_arrays(
      diffusion.make_schedule(dc.schedule, dc.timesteps)
    ),
    rng=jax.random.key(config.train.seed),
  )
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    step,
    in_shardings=(state_sharding, sharding.batch_sharding(mesh), repl),
    out_shardings=(state_sharding, repl),
    donate_argnums=0 if donate else (),
  )


def run_one(args, batch: int, dtype: str, remat: bool) -> dict:
  config = make_config(args, batch, dtype, remat)
  b, s = config.train.batch_size, config.data.crop_size
  mesh = sharding.make_mesh()
  sharding.check_batch(b, mesh)
  n_dev = mesh.devices.size
  model = from_config(config.model)
  tx = make_optimizer(config.train)
  ema = config.train.ema.enabled
  if args.steps > 0:
    state = init_state(model, tx, jax.random.key(0), ema)
  else:  # compile only: shapes suffice, no init and no memory
    state = jax.eval_shape(
      lambda: init_state(model, tx, jax.random.key(0), ema)
    )
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  state_sharding = sharding.replicated(mesh, state)
  shape = (b, s, s, 3)
  if args.steps > 0:
    state = jax.device_put(state, state_sharding)
    batch_arr = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
    batch_arr = jax.device_put(batch_arr, sharding.batch_sharding(mesh))
  else:
    state = jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      state,
      state_sharding,
    )
    batch_arr = jax.ShapeDtypeStruct(
      shape, np.uint8, sharding=sharding.batch_sharding(mesh)
    )

  jitted = jit_step(config, model, tx, mesh, state_sharding)
  t0 = time.perf_counter()
  lowered = jitted.lower(state, batch_arr, None)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  hw_flops = flops_of(compiled.cost_analysis())
  # Model FLOPs: the same step without remat, lowered only (global HLO).
  plain = model.clone(remat=False)
  model_flops = hw_flops
  if remat:
    plain_step = jit_step(config, plain, tx, mesh, state_sharding, False)
    lowered_plain = plain_step.lower(state, batch_arr, None)
    model_flops = flops_of(lowered_plain.cost_analysis()) / n_dev
  mem = compiled.memory_analysis()

  times, loss = [], float("nan")
  if args.steps > 0:
    state, m = compiled(state, batch_arr, None)  # untimed warm-up
    jax.block_until_ready(m)
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch_arr, None)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    loss = float(m["loss"])
  peak, peak_kind = peak_memory()
  if not times:
    peak_kind += " while compiling; no step ran"
  dev = jax.devices()[0]
  out = dict(
    config=args.config,
    family=config.model.family,
    dtype=dtype,
    remat=remat,
    batch=b,
    crop=s,
    devices=n_dev,
    device_kind=dev.device_kind,
    backend=jax.default_backend(),
    params_m=n_params / 1e6,
    lower_s=lower_s,
    compile_s=compile_s,
    steps=len(times),
    step_s=statistics.median(times) if times else None,
    step_min_s=min(times) if times else None,
    step_max_s=max(times) if times else None,
    loss=loss,
    hw_flops=hw_flops,
    model_flops=model_flops,
    mem_args=getattr(mem, "argument_size_in_bytes", None),
    mem_out=getattr(mem, "output_size_in_bytes", None),
    mem_temp=getattr(mem, "temp_size_in_bytes", None),
    mem_alias=getattr(mem, "alias_size_in_bytes", None),
    peak_bytes=peak,
    peak_kind=peak_kind,
    load=os.getloadavg()[0],
  )
  peak_f = args.peak_flops or peak_flops(dev.device_kind, dtype)
  out["peak_flops"] = peak_f
  if times and peak_f:
    out["mfu"] = model_flops / out["step_s"] / peak_f
    out["hfu"] = hw_flops / out["step_s"] / peak_f
  return out


def _gib(x) -> str:
  return "-" if x is None else f"{x / 2**30:.2f}"


def print_run(r: dict) -> None:
  print(
    f"backend {r['backend']}, {r['devices']}x {r['device_kind']}, jax "
    f"{jax.__version__}, {os.cpu_count()} CPUs, load {r['load']:.1f}"
  )
  print(
    f"config {r['config']}: {r['params_m']:.2f} M params, family "
    f"{r['family']}, dtype {r['dtype']}, remat {r['remat']}, batch "
    f"{r['batch']}, crop {r['crop']}"
  )
  print(f"lower / compile       {r['lower_s']:.2f} s / {r['compile_s']:.2f} s")
  if r["step_s"] is not None:
    print(
      f"step (median of {r['steps']}) {r['step_s'] * 1e3:8.1f} ms  "
      f"(min {r['step_min_s'] * 1e3:.1f}, max {r['step_max_s'] * 1e3:.1f})"
    )
    print(f"images/s              {r['batch'] / r['step_s']:8.3f}")
  print(
    f"FLOPs/step/device     {r['model_flops'] / 1e12:.3f} T model, "
    f"{r['hw_flops'] / 1e12:.3f} T compiled (XLA cost analysis)"
  )
  if "mfu" in r:
    print(
      f"MFU / HFU             {100 * r['mfu']:.1f} % / {100 * r['hfu']:.1f} %"
      f" of {r['peak_flops'] / 1e12:.0f} TFLOP/s"
    )
  elif r["step_s"] is not None:
    achieved = r["hw_flops"] / r["step_s"] / 1e9
    print(
      f"MFU                   not meaningful on {r['device_kind']} without "
      f"--peak-flops (achieved {achieved:.1f} GFLOP/s)"
    )
  print(
    f"XLA memory plan       args {_gib(r['mem_args'])} GiB, out "
    f"{_gib(r['mem_out'])}, temp {_gib(r['mem_temp'])}, aliased "
    f"{_gib(r['mem_alias'])}"
  )
  print(f"peak memory           {_gib(r['peak_bytes'])} GiB ({r['peak_kind']})")
  if r["steps"]:
    print(f"loss {r['loss']:.4f}, finite: {bool(np.isfinite(r['loss']))}")


def print_table(rows: list[dict]) -> None:
  head = (
    "family dtype    remat batch compile_s  step_s  img/s  TFLOP/step "
    "temp_GiB peak_GiB  MFU"
  )
  print(head)
  for r in rows:
    step = f"{r['step_s']:.2f}" if r["step_s"] else "-"
    ips = f"{r['batch'] / r['step_s']:.3f}" if r["step_s"] else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
    peak = _gib(r["peak_bytes"]) if r["step_s"] else "-"
    print(
      f"{r['family']:<6} {r['dtype']:<8} {int(r['remat']):>5} "
      f"{r['batch']:>5} {r['compile_s']:>9.1f} {step:>7} {ips:>6} "
      f"{r['hw_flops'] / 1e12:>11.3f} {_gib(r['mem_temp']):>8} "
      f"{peak:>8} {mfu:>5}"
    )


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="config file[:variant]")
  p.add_argument("--batch", default=None, help="global batch(es), e.g. 4,16")
  p.add_argument("--crop", type=int, default=None, help="crop size (64k)")
  p.add_argument("--steps", type=int, default=5, help="timed steps (0: none)")
  p.add_argument("--dtype", default=None, help="float32,bfloat16 (a list)")
  p.add_argument("--remat", default="0", help="0,1 (a list)")
  p.add_argument("--peak-flops", type=float, default=None, help="per device")
  p.add_argument("--json", action="store_true", help="one JSON line per run")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(argv)
  base = common.load_config(args.config)
  batches = [
    int(v) for v in (args.batch or str(base.train.batch_size)).split(",")
  ]
  dtypes = (args.dtype or base.model.dtype).split(",")
  remats = [bool(int(v)) for v in args.remat.split(",")]
  combos = list(itertools.product(batches, dtypes, remats))
  if len(combos) == 1:
    r = run_one(args, *combos[0])
    if args.json:
      print(json.dumps(r))
    else:
      print_run(r)
    return 0
  rows = []
  for b, dt, rm in combos:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--json"]
    cmd += ["--config", args.config, "--batch", str(b), "--dtype", dt]
    cmd += ["--remat", str(int(rm)), "--steps", str(args.steps)]
    if args.crop:
      cmd += ["--crop", str(args.crop)]
    if args.peak_flops:
      cmd += ["--peak-flops", str(args.peak_flops)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
      print(f"batch {b} {dt} remat {int(rm)} failed:\n{res.stderr[-2000:]}")
      continue
    r = json.loads(res.stdout.strip().splitlines()[-1])
    rows.append(r)
    if args.json:
      print(json.dumps(r), flush=True)
    else:
      print_run(r)
      print(flush=True)
  if rows and not args.json:
    print_table(rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
