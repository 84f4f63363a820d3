"""Preemption notices: save at the current step, exit, resume exactly.

The training loop asks ``Watch.reached(step)`` once per step (no device
sync); when it answers True, every process saves a checkpoint at that
step, waits for it and raises ``Preempted``, and the main job exits with
``EXIT_CODE``. Rerunning the same command resumes from that checkpoint,
bit-identical to an uninterrupted run: batches are a pure function of
(seed, step) and the step's randomness is ``fold_in(seed, step)``.

Where the notice comes from:

* Multi-process runs, and any run after ``jax.distributed.initialize``
  (pods, SLURM steps, single-host TPU VMs): JAX's preemption service owns
  SIGTERM. A notice on any process (SIGTERM, or the TPU runtime's
  maintenance event) is shared with all of them, and they agree on one
  step to save at: ``CheckpointManager.reached_preemption(step)``
  (``jax.experimental.multihost_utils.reached_preemption_sync_point``)
  answers True on every process at that same step. It must be asked at
  every step, on every process.
* A single process without the distributed runtime: a SIGTERM handler
  sets a flag that ``reached`` reads. A second SIGTERM does not kill the
  process either; SIGKILL does (at most one checkpoint interval is lost:
  Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it when the
  step is complete, and only complete steps are ever restored).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

logger = logging.getLogger(__name__)

# The main job's exit status after a preemption save: EX_TEMPFAIL of
# sysexits.h ("temporary failure; the user is invited to retry"). 0 means
# finished, 2 a user error, 1 a crash; a scheduler or a wrapper loop can
# requeue on 75.
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM,)


class Preempted(Exception):
  """A preemption checkpoint was saved at ``step``; rerun to resume."""

  def __init__(self, step: int, directory: str):
    self.step, self.directory = step, directory
    super().__init__(
      f"preempted: checkpoint of step {step} saved in {directory}; rerun "
      "the same command to resume from it"
    )


class Watch:
  """Answers 'save and stop now?' once per step (a context manager).

  Args:
    manager: the run's Orbax ``CheckpointManager`` (its
      ``reached_preemption`` is JAX's preemption sync point).
    signals: what the single-process handler catches while the context
      is open; the previous handlers come back on exit.
  """

  def __init__(self, manager, signals=SIGNALS):
    self.manager = manager
    self.signals = tuple(signals)
    self.received: int | None = None  # the signal number, once caught
    self._previous: dict = {}

  def __enter__(self) -> Watch:
    if jax.distributed.is_initialized():
      return self  # JAX's preemption service handles SIGTERM
    if threading.current_thread() is not threading.main_thread():
      logger.warning("not the main thread: SIGTERM will not save")
      return self
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._notice)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def _notice(self, signum, frame) -> None:
    # Only a flag: the loop reads it between steps (no logging here, a
    # signal handler can run while the logging lock is held).
    del frame
    self.received = signum

  def reached(self, step: int) -> bool:
    """True when every process should save at ``step`` and stop."""
    if self.received is not None:
      name = signal.Signals(self.received).name
      logger.warning("%s received: saving step %d and stopping", name, step)
      return True
    if self.manager.reached_preemption(step):
      logger.warning("preemption notice: saving step %d and stopping", step)
      return True
    return False
