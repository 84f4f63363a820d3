"""What distilling the released models costs: FLOPs per step, and the
time of a distillation recipe on accelerators at an assumed MFU.

  python -m benchmarks.distill_cost
  python -m benchmarks.distill_cost --batch 64 --steps-per-round 20000 \
      --rounds 4 --mfu 0.4

For each released config (``configs/eps_linear.py``, ``configs/x_cosine.py``,
their full widths), the distillation step (``cdc_jax.distill_step``: two
teacher U-Net passes, one student pass and its backward, the teacher's
context model) and training's step at ``--batch`` crops of ``--crop``
pixels are lowered (not compiled) and XLA's cost analysis counts their
FLOPs. The recipe's FLOPs (rounds x steps per round x FLOPs per step) are
then divided by the dense bf16 peaks of one H100 (989 TFLOP/s) and a
v5e-16 slice (16 x 197 TFLOP/s) times ``--mfu``: an estimate, not a
measurement (no accelerator run stands behind the MFU).
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

from benchmarks.train_step import PEAK_FLOPS, flops_of
from cdc_jax import diffusion, distill, distill_step, samplers
from cdc_jax.losses import schedule_arrays
from cdc_jax.models.cdc import from_config, init_params
from cdc_jax.optim import make_optimizer
from cdc_jax.train_state import TrainState
from cdc_jax.train_step import train_step
from configs import common

CONFIGS = ("configs/eps_linear.py", "configs/x_cosine.py")
TARGETS = {"one H100": PEAK_FLOPS["H100"][0], "v5e-16": 16 * 197e12}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=4, help="global batch")
  p.add_argument("--crop", type=int, default=256, help="crop side")
  p.add_argument("--teacher-steps", type=int, default=64)
  p.add_argument("--rounds", type=int, default=4, help="64 -> 4: 4 rounds")
  p.add_argument("--steps-per-round", type=int, default=20_000)
  p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU")
  return p.parse_args(argv)


def lowered_flops(fn, *abstract) -> float:
  return flops_of(jax.jit(fn).lower(*abstract).cost_analysis())


def step_flops(spec: str, batch: int, crop: int, teacher_steps: int):
  """(distillation step, training step) FLOPs of one config."""
  config = common.load_config("configs/distill.py")
  family = common.load_config(spec)
  with config.unlocked():
    config.model.update(family.model.to_dict())
    config.diffusion.update(family.diffusion.to_dict())
  model, tx = from_config(config.model), make_optimizer(config.train)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  zero = jnp.zeros((), jnp.int32)
  dstate = jax.eval_shape(
    lambda p: distill_step.DistillState(zero, p, tx.init(p), p, p, zero), params
  )
  dc = config.diffusion
  schedule = diffusion.make_schedule(dc.schedule, dc.timesteps)
  fam = config.model.family
  student = samplers.Student(teacher_steps, teacher_steps // 2, "x0")
  tables = distill_step.round_tables(schedule, fam, student)
  batch_spec = jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.uint8)
  d = functools.partial(
    distill_step.distill_step,
    model=model,
    tx=tx,
    config=config,
    tables=distill_step.RoundTables(*(jnp.asarray(a) for a in tables)),
    rng=jax.random.key(0),
    param=distill.DEFAULT_PARAMETERISATION[fam],
    teacher_param=None,
    round_start=0,
  )
  t = functools.partial(
    train_step,
    model=model,
    tx=tx,
    config=family,
    sched_arrays=schedule_arrays(schedule),
    rng=jax.random.key(0),
  )
  tstate = jax.eval_shape(
    lambda p: TrainState(zero, p, tx.init(p), p, jnp.zeros((), jnp.float32)),
    params,
  )
  return lowered_flops(d, dstate, batch_spec), lowered_flops(
    t, tstate, batch_spec
  )


def main(argv=None) -> int:
  args = parse_args(argv)
  steps = args.rounds * args.steps_per_round
  print(
    f"batch {args.batch} x {args.crop}^2, {args.rounds} rounds from "
    f"S = {args.teacher_steps}, {args.steps_per_round} steps each; "
    f"MFU {args.mfu:g} assumed"
  )
  for spec in CONFIGS:
    dist, tr = step_flops(spec, args.batch, args.crop, args.teacher_steps)
    total = dist * steps
    times = ", ".join(
      f"{name} {total / (peak * args.mfu) / 3600:.2f} h"
      for name, peak in TARGETS.items()
    )
    print(
      f"{spec}: distillation step {dist / 1e12:.2f} TFLOP "
      f"(training step {tr / 1e12:.2f}, x{dist / tr:.2f}); the recipe "
      f"{total / 1e15:.0f} PFLOP: {times}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
