"""Data parallelism: the device mesh, batch checks, host-local -> global.

One ``data`` axis over all devices of all processes: params and optimizer
state replicated, the global batch split along its first axis. Each
process feeds its local share (``global_batch // process_count``);
``global_batch`` assembles the global array without gathering anything.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cdc_jax.errors import UserError


class ShardingError(UserError, ValueError):
  """A batch that cannot be split over the devices and processes."""


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), ("data",))


def check_batch(global_batch: int, mesh: Mesh) -> None:
  """The global batch must divide by the devices (and so the processes)."""
  n = mesh.devices.size
  procs = jax.process_count()
  if global_batch % n:
    raise ShardingError(
      f"train.batch_size={global_batch} is not divisible by the {n} devices "
      f"({procs} process(es) x {n // procs} local); use a multiple of {n} "
      f"(e.g. --config.train.batch_size={max(n, global_batch // n * n)})"
    )


def replicated(mesh: Mesh, tree):
  """A tree of fully replicated shardings shaped like ``tree``."""
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The global batch split along its first axis."""
  return NamedSharding(mesh, P("data"))


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows -> the global batch (no cross-host copies)."""
  return jax.make_array_from_process_local_data(sharding, local)
