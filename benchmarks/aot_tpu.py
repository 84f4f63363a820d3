"""Ahead-of-time compile of the train step for a TPU pod slice, on any host.

A check that the data-parallel step lowers and compiles for a pod (the
sharding, the collectives, the memory per chip) without a TPU: libtpu's
compile-only devices stand in for the slice. Nothing runs on a device.

  python -m venv --system-site-packages /tmp/tpuenv
  /tmp/tpuenv/bin/pip install libtpu==0.0.52     # not in requirements
  /tmp/tpuenv/bin/python -m benchmarks.aot_tpu \
      --config configs/eps_linear.py --topology v5e:4x4 --per-chip 4 \
      --dtype bfloat16 [--remat]

A separate virtual environment keeps libtpu away from the CPU install
(with libtpu importable, ``import jax`` probes for a TPU first and logs
warnings; ``jax.devices()`` still falls back to the CPU). The topology
names are libtpu's (``v5e:2x2``, ``v5e:4x4``, ``v4:2x2x2``, ``v5p:2x2x2``,
``v6e:4x4``, ...). The global batch is ``--per-chip`` x chips unless
``--batch`` is given. Prints the mesh, the lower and compile times, XLA's
FLOPs per chip and step, and the compiled memory analysis per chip
(arguments = the replicated state and the batch shard, outputs, aliased =
donated, temporaries), against the chip's HBM where known.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

# The train-step benchmark: the step jitted as the trainer jits it (state
# replicated and donated, batch split).
from benchmarks.train_step import flops_of, jit_step
from cdc_jax import sharding
from cdc_jax.models.cdc import from_config
from cdc_jax.optim import make_optimizer
from cdc_jax.train_state import init_state
from configs import common

HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5p": 95, "TPU v6 lite": 32}


def _gib(n) -> str:
  return f"{n / 2**30:.3f} GiB"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/eps_linear.py")
  p.add_argument("--topology", default="v5e:4x4", help="libtpu topology")
  p.add_argument("--per-chip", type=int, default=4, help="batch per chip")
  p.add_argument("--batch", type=int, default=None, help="global batch")
  p.add_argument("--crop", type=int, default=256)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", action="store_true")
  args = p.parse_args(argv)

  from jax.experimental import topologies

  try:
    topo = topologies.get_topology_desc(args.topology, platform="tpu")
  except Exception as e:  # noqa: BLE001 - libtpu missing or name unknown
    raise SystemExit(
      f"--topology {args.topology}: no TPU topology ({type(e).__name__}: "
      f"{str(e).splitlines()[0][:300]}); install libtpu (see above) and "
      "use a libtpu topology name such as v5e:4x4"
    ) from None
  devices = topo.devices
  mesh = sharding.make_mesh(devices)
  kind = devices[0].device_kind
  hosts = len({d.process_index for d in devices})
  batch = args.batch or args.per_chip * len(devices)
  config = common.load_config(args.config)
  with config.unlocked():
    config.train.batch_size = batch
    config.data.crop_size = args.crop
    config.model.dtype = args.dtype
    config.model.remat = args.remat
  if batch % len(devices):
    raise SystemExit(
      f"--batch {batch} is not divisible by the {len(devices)} chips"
    )
  model = from_config(config.model)
  tx = make_optimizer(config.train)
  abstract = jax.eval_shape(
    lambda: init_state(model, tx, jax.random.key(0), config.train.ema.enabled)
  )
  state_sharding = sharding.replicated(mesh, abstract)
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    state_sharding,
  )
  s = args.crop
  images = jax.ShapeDtypeStruct(
    (batch, s, s, 3), "uint8", sharding=sharding.batch_sharding(mesh)
  )
  print(
    f"topology {args.topology}: {len(devices)} x {kind} ({hosts} hosts), "
    f"mesh {dict(mesh.shape)}; jax {jax.__version__}"
  )
  print(
    f"config {args.config}: family {config.model.family}, dtype "
    f"{args.dtype}, remat {args.remat}, global batch {batch} "
    f"({batch // len(devices)} per chip), crop {s}"
  )
  jitted = jit_step(config, model, tx, mesh, state_sharding)
  t0 = time.perf_counter()
  lowered = jitted.lower(state, images, None)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  print(f"lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
  flops = flops_of(compiled.cost_analysis())
  print(f"FLOPs per chip and step (XLA cost analysis): {flops / 1e12:.3f} T")
  mem = compiled.memory_analysis()
  print(f"memory analysis per chip: {mem}")
  args_b = mem.argument_size_in_bytes
  total = args_b + mem.output_size_in_bytes - mem.alias_size_in_bytes
  total += mem.temp_size_in_bytes
  hbm = next((v for k, v in HBM_GIB.items() if k in kind), None)
  of = f" of {hbm} GiB HBM" if hbm else ""
  print(
    f"  arguments {_gib(args_b)}, outputs {_gib(mem.output_size_in_bytes)}, "
    f"aliased (donated) {_gib(mem.alias_size_in_bytes)}, temporaries "
    f"{_gib(mem.temp_size_in_bytes)}; peak estimate {_gib(total)}{of}"
  )
  hlo = compiled.as_text() or ""
  for op in ("all-reduce", "all-gather", "reduce-scatter"):
    print(f"  {op} ops in the compiled HLO: {hlo.count(op + '(')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
