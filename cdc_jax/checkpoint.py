"""Orbax checkpoints of a training workdir (``WORKDIR/checkpoints/<step>``).

* ``make_manager`` / ``restore_or_none``: the trainer's one writer per
  workdir; saving and restoring the whole ``TrainState``.
* ``restore_params``: the decoding params of the latest complete step (the
  EMA copy where the run keeps one), read through a read-only manager
  without building an optimizer or a train state; what evaluation, export
  and the codec use.

A step whose save was interrupted (``<step>.orbax-checkpoint-tmp``) is
never restored: Orbax only lists finalised steps.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

CHECKPOINTS = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def make_manager(workdir: str, max_to_keep: int, interval: int):
  """The trainer's CheckpointManager (Orbax: one live writer per dir)."""
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
    checkpoint_dir(workdir),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=interval, create=True
    ),
  )


def restore_or_none(manager, abstract_state: Any, shardings: Any = None):
  """Restores the latest complete checkpoint, or returns None.

  ``shardings`` (a tree like the state, or None): the restored arrays are
  placed with them directly (each process reads what it holds).
  """
  import jax
  import orbax.checkpoint as ocp

  step = manager.latest_step()
  if step is None:
    return None
  if shardings is not None:
    abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state,
      shardings,
    )
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def latest_step(workdir: str) -> int | None:
  """The latest complete step in ``workdir``, or None (read-only)."""
  import orbax.checkpoint as ocp

  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  manager = ocp.CheckpointManager(
    checkpoint_dir(workdir),
    options=_read_only_options(),
  )
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_params(workdir: str, abstract_params: Any) -> tuple[Any, int]:
  """(decoding params as numpy, step) of the latest complete checkpoint.

  Reads ``ema_params`` where the run keeps an EMA, else ``params``; only
  that subtree is read (Orbax partial restore), so no optimizer state is
  built or loaded. ``abstract_params`` gives the expected tree (e.g.
  ``jax.eval_shape`` of the model's init).

  Raises:
    FileNotFoundError: no complete checkpoint in ``workdir``.
  """
  import orbax.checkpoint as ocp

  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f"{workdir}: no complete checkpoint")
  manager = ocp.CheckpointManager(
    checkpoint_dir(workdir),
    options=_read_only_options(),
    item_handlers=ocp.PyTreeCheckpointHandler(),
  )
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir}: no complete checkpoint")
    saved = manager.item_metadata(step)
    saved = getattr(saved, "tree", saved)
    key = "ema_params" if saved.get("ema_params") else "params"
    item = {key: abstract_params}
    restore_args = {
      key: _numpy_restore_args(abstract_params),
    }
    out = manager.restore(
      step,
      args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True
      ),
    )
    return out[key], step
  finally:
    manager.close()


def _read_only_options():
  """A reader's options; in multi-process runs a reader is local to its
  process (no barriers with processes that do not read, e.g. export on
  process 0 only)."""
  import jax
  import orbax.checkpoint as ocp

  if jax.process_count() == 1:
    return ocp.CheckpointManagerOptions(read_only=True)
  me = jax.process_index()
  return ocp.CheckpointManagerOptions(
    read_only=True,
    multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}
    ),
  )


def _numpy_restore_args(tree):
  import jax
  import orbax.checkpoint as ocp

  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
