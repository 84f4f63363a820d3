"""Orbax checkpoints of a training workdir (``WORKDIR/checkpoints/<step>``).

* ``make_manager`` / ``restore_or_none``: the trainer's one writer per
  workdir; saving and restoring the whole ``TrainState``.
* ``restore_params``: the decoding params of the newest intact step (the
  EMA copy where the run keeps one), read through a read-only manager
  without building an optimizer or a train state; what evaluation, export
  and the codec use.

A step whose save was interrupted (``<step>.orbax-checkpoint-tmp``) is
never restored: Orbax only lists finalised steps. A damaged step (files
truncated, zeroed or missing, a stray empty step folder): readers fall
back to the newest intact step with a warning naming the damaged one; a
resume stops with one line saying which folder to move aside, since
training on from an older step would save behind the damaged one. A
checkpoint of another model (other widths) is refused before Orbax reads
an array, naming the first parameter that differs. Readers are quiet:
Orbax's notes about read-only managers are not shown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Any

import numpy as np

from cdc_jax.errors import UserError

CHECKPOINTS = "checkpoints"
logger = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
  """A checkpoint that cannot be used: damaged, or of another model."""


def savable(state):
  """What a save hands Orbax: with one process, the host copy of the
  state (Orbax then writes numpy arrays, instead of slicing every array
  once per device: seconds per save for a state replicated on 8
  devices); with several, the arrays themselves (each process writes its
  part). Restoring reads either into the shardings the reader asks for
  (tests/test_train.py resumes a single-process save on an 8-device
  mesh, bit for bit)."""
  import jax

  return jax.device_get(state) if jax.process_count() == 1 else state


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

  Raises:
    CheckpointError: the latest step is of another model, or damaged (the
      message names the folder to move aside and the intact step).
  """
  import jax
  import orbax.checkpoint as ocp

  step = manager.latest_step()
  if step is None:
    return None
  directory = str(manager.directory)
  with _reader(directory) as reader:
    saved = _saved_tree(reader, step)
    if saved is not None:
      _check_shapes(directory, step, saved.get("params"), abstract_state.params)
    intact = [s for s in reader.all_steps() if s < step]
  if shardings is not None:
    abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state,
      shardings,
    )
  try:
    if saved is None:
      raise ValueError("its metadata is missing")
    args = ocp.args.StandardRestore(abstract_state)
    return manager.restore(step, args=args)
  except Exception as e:  # noqa: BLE001 - whatever Orbax met in the files
    _drop_closed_loop_noise()
    older = f"step {max(intact)}" if intact else "scratch"
    raise CheckpointError(
      f"{os.path.join(directory, str(step))}: checkpoint step {step} is "
      f"damaged ({_reason(e)}); move that folder aside (e.g. to "
      f"{step}.damaged) to resume from {older}, or use another --workdir"
    ) from None


def latest_step(workdir: str) -> int | None:
  """The latest complete step in ``workdir``, or None (read-only)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with _reader(checkpoint_dir(workdir)) as reader:
    return reader.latest_step()


def restore_params(workdir: str, abstract_params: Any) -> tuple[Any, int]:
  """(decoding params as numpy, step) of the newest intact checkpoint.

  Reads ``ema_params`` where the run keeps an EMA, else ``params``; only
  that subtree is read (Orbax partial restore), so no optimizer state is
  built or loaded. ``abstract_params`` gives the expected tree (e.g.
  ``jax.eval_shape`` of the model's init). Damaged steps are skipped with
  a warning naming each.

  Raises:
    FileNotFoundError: no complete checkpoint in ``workdir``.
    CheckpointError: the checkpoints are of another model, or all damaged.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir}: no complete checkpoint")
  with _reader(directory) as reader:
    steps = sorted(reader.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"{workdir}: no complete checkpoint")
    damaged = []
    for step in steps:
      try:
        params = _restore_step(reader, directory, step, abstract_params)
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 - whatever Orbax met in the files
        _drop_closed_loop_noise()
        damaged.append((step, _reason(e)))
        continue
      for bad, why in damaged:
        logger.warning(
          "%s: checkpoint step %d is damaged (%s); using step %d, the newest "
          "intact one",
          os.path.join(directory, str(bad)),
          bad,
          why,
          step,
        )
      return params, step
  listed = "; ".join(f"step {bad}: {why}" for bad, why in damaged)
  raise CheckpointError(
    f"{directory}: every checkpoint is damaged ({listed}); restore the "
    "folder from a backup, or train anew in another --workdir"
  )


def _restore_step(reader, directory: str, step: int, abstract_params):
  import orbax.checkpoint as ocp

  saved = _saved_tree(reader, step)
  if saved is None:
    raise ValueError("its metadata is missing")
  key = "ema_params" if saved.get("ema_params") else "params"
  _check_shapes(directory, step, saved.get(key), abstract_params)
  out = reader.restore(
    step,
    args=ocp.args.PyTreeRestore(
      item={key: abstract_params},
      restore_args={key: _numpy_restore_args(abstract_params)},
      partial_restore=True,
    ),
  )
  return out[key]


def _saved_tree(reader, step: int):
  """The saved tree of metadata (dict), or None where it is unreadable."""
  try:
    saved = reader.item_metadata(step)
  except Exception:  # noqa: BLE001 - a damaged step; the caller says so
    return None
  saved = getattr(saved, "tree", saved)
  return saved if isinstance(saved, dict) else None


def _shapes(tree) -> dict[str, tuple]:
  import jax

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
    for path, leaf in leaves
    if hasattr(leaf, "shape")
  }


def _check_shapes(directory: str, step: int, saved, abstract) -> None:
  """Refuses a checkpoint of another model, naming a parameter."""
  if saved is None:
    return
  have, want = _shapes(saved), _shapes(abstract)
  for name in sorted(set(have) | set(want)):
    if have.get(name) != want.get(name):
      raise CheckpointError(
        f"{os.path.join(directory, str(step))}: the checkpoint is of "
        f"another model (params {name}: saved {have.get(name)}, the "
        f"config's {want.get(name)}); use the run's own config or another "
        "--workdir"
      )


def _reason(e: BaseException) -> str:
  """The first line of an Orbax or TensorStore error, without the
  folder the message names anyway."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
  return text or type(e).__name__


@contextlib.contextmanager
def _reader(directory: str):
  """A read-only manager of ``directory``, with Orbax's notes about its
  options (and absl's other warnings) silenced while it is used."""
  import orbax.checkpoint as ocp

  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    manager = ocp.CheckpointManager(
      directory,
      options=_read_only_options(),
      item_handlers=ocp.PyTreeCheckpointHandler(),
    )
    try:
      yield manager
    finally:
      manager.close()
  finally:
    absl.setLevel(level)


def _drop_closed_loop_noise() -> None:
  """A failed read leaves TensorStore callbacks that later report
  "Event loop is closed" through ``sys.unraisablehook``, hundreds of
  lines of tracebacks after the real error; those alone are dropped."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def _read_only_options():
  """A reader's options; in multi-process runs a reader is local to its
  process (no barriers with processes that do not read, e.g. export on
  process 0 only)."""
  import jax
  import orbax.checkpoint as ocp

  # The fields read_only would reset (with a warning each) set as it would.
  quiet = dict(read_only=True, save_interval_steps=0, create=False)
  if jax.process_count() == 1:
    return ocp.CheckpointManagerOptions(**quiet)
  me = jax.process_index()
  return ocp.CheckpointManagerOptions(
    **quiet,
    multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}
    ),
  )


def _numpy_restore_args(tree):
  import jax
  import orbax.checkpoint as ocp

  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
