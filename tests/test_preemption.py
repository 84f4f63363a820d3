"""Preemption-safe runs: SIGTERM saves the current step and exits 75; a
rerun resumes bit-identically; SIGKILL loses at most one interval and an
unfinished save is never restored.

The end-to-end tests run ``python -m cdc_jax.main`` (tiny eps model, one
CPU device) in subprocesses that share the test compile cache; the
uninterrupted reference run is shared by them (module fixture).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cdc_jax import checkpoint, preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30


# -- Watch: the per-step question ---------------------------------------------


class _Manager:
  """What Watch asks of a CheckpointManager: JAX's preemption sync point
  (here: True from ``at`` on), recording the steps asked."""

  def __init__(self, at=None):
    self.at, self.asked = at, []

  def reached_preemption(self, step):
    self.asked.append(step)
    return self.at is not None and step >= self.at


def test_sigterm_sets_the_flag_and_handlers_come_back():
  before = signal.getsignal(signal.SIGTERM)
  manager = _Manager()
  with preemption.Watch(manager) as watch:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the test goes on
    assert watch.reached(2)
    assert watch.received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before
  assert manager.asked == [1]  # the flag answers without asking


def test_sync_point_is_asked_every_step():
  manager = _Manager(at=3)
  with preemption.Watch(manager) as watch:
    answers = [watch.reached(s) for s in range(1, 5)]
  assert answers == [False, False, True, True]
  assert manager.asked == [1, 2, 3, 4]


def test_preempted_names_the_step_and_directory():
  e = preemption.Preempted(17, "/w/checkpoints")
  assert "step 17" in str(e) and "/w/checkpoints" in str(e)
  assert (e.step, e.directory) == (17, "/w/checkpoints")


# -- the main job in subprocesses ---------------------------------------------


def _command(workdir, every):
  return [
    sys.executable,
    "-m",
    "cdc_jax.main",
    f"--config=configs/eps_linear.py:tiny,steps={STEPS}",
    f"--workdir={workdir}",
    "--config.model.dim=4",
    "--config.train.batch_size=1",
    "--config.log.progress=False",
    "--config.log.every=1",
    f"--config.checkpoint.every={every}",
    "--config.eval.every=1000000",
    "--config.eval.steps=1",
  ]


def _env():
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",  # as conftest: faster compiles
    # The test processes' cache: a warm one makes reruns quick.
    "CDC_COMPILE_CACHE": jax.config.jax_compilation_cache_dir or "off",
  }
  env.pop("XLA_FLAGS", None)  # one device
  return env


class _Job:
  """``python -m cdc_jax.main`` with its stderr read line by line."""

  def __init__(self, workdir, every):
    self.proc = subprocess.Popen(
      _command(workdir, every),
      cwd=REPO,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.lines: queue.Queue = queue.Queue()
    self.log: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stderr:
      self.lines.put(line)
    self.lines.put(None)

  def wait_for_step(self, step, timeout=600) -> None:
    """Blocks until the job logs ``step <step>:`` (fails if it ends)."""
    while True:
      line = self.lines.get(timeout=timeout)
      assert line is not None, "".join(self.log[-40:])
      self.log.append(line)
      m = re.search(r"step (\d+): loss", line)
      if m and int(m.group(1)) >= step:
        return

  def finish(self, timeout=600) -> tuple[int, str]:
    """(exit status, the whole stderr)."""
    self.proc.wait(timeout=timeout)
    self._reader.join(timeout=60)
    while (line := self.lines.get()) is not None:
      self.log.append(line)
    self.proc.stdout.close()
    return self.proc.returncode, "".join(self.log)


def _run(workdir, every) -> str:
  code, log = _Job(workdir, every).finish()
  assert code == 0, log[-4000:]
  return log


def _final_state(workdir) -> dict:
  """The whole saved state (params, optimizer, step) at STEPS, as numpy."""
  path = os.path.join(checkpoint.checkpoint_dir(workdir), str(STEPS))
  with ocp.StandardCheckpointer() as ckptr:
    return jax.device_get(ckptr.restore(os.path.join(path, "default")))


def _last_loss(workdir) -> float:
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)["loss"]


def _assert_same_state(workdir, reference):
  state, loss = reference
  got = _final_state(workdir)
  assert jax.tree.structure(got) == jax.tree.structure(state)
  leaves = jax.tree.leaves(got), jax.tree.leaves(state)
  for a, b in zip(*leaves, strict=True):
    assert np.array_equal(a, b)  # bit-identical, not close
  assert _last_loss(workdir) == loss


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run's final state and last loss."""
  work = str(tmp_path_factory.mktemp("reference"))
  _run(work, every=1000)
  return _final_state(work), _last_loss(work)


@pytest.mark.slow  # three main-job runs (compiles, the held-out report)
def test_sigterm_saves_exits_75_and_resumes_bit_identically(
  reference, tmp_path
):
  work = str(tmp_path / "w")
  job = _Job(work, every=1000)
  job.wait_for_step(2)
  job.proc.send_signal(signal.SIGTERM)
  code, log = job.finish()
  assert code == preemption.EXIT_CODE, log[-4000:]
  m = re.search(r"preempted: checkpoint of step (\d+) saved", log)
  assert m, log[-4000:]
  saved = int(m.group(1))
  assert 2 <= saved < STEPS
  assert "SIGTERM received: saving step" in log
  assert "Traceback" not in log
  # That step is the last complete one, and nothing was exported.
  assert checkpoint.latest_step(work) == saved
  assert not os.path.exists(os.path.join(work, "model"))

  log = _run(work, every=1000)
  assert f"training from checkpoint step {saved}," in log
  _assert_same_state(work, reference)


@pytest.mark.slow  # two main-job runs
def test_sigkill_resumes_from_the_last_complete_checkpoint(reference, tmp_path):
  work = str(tmp_path / "w")
  every = 3
  job = _Job(work, every=every)
  job.wait_for_step(7)  # checkpoints 3 and 6 requested, 6 maybe unfinished
  job.proc.kill()
  code, _ = job.finish()
  assert code == -signal.SIGKILL
  last = checkpoint.latest_step(work)
  assert last is not None and last % every == 0 and last >= every
  # What a kill in the middle of the next save leaves behind: it must
  # never be restored (and the rerun's own save of that step replaces it).
  unfinished = os.path.join(
    checkpoint.checkpoint_dir(work), f"{last + every}.orbax-checkpoint-tmp"
  )
  os.makedirs(os.path.join(unfinished, "default"), exist_ok=True)
  with open(os.path.join(unfinished, "default", "junk"), "wb") as f:
    f.write(b"\0" * 64)

  log = _run(work, every=every)
  assert f"training from checkpoint step {last}," in log
  assert not os.path.exists(unfinished)
  _assert_same_state(work, reference)
