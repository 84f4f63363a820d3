"""Multi-process start-up and runs on one machine.

``plan`` (who starts what) is tested in-process. The real runs are 2 OS
processes on 127.0.0.1 with 2 fake CPU devices each: this file run as a
script (``python test_distributed.py MODE OUT [COORDINATOR PROCESS_ID]``).
A peer that never arrives makes the other abort, so every pair runs under
a timeout and both processes' stderr is shown on failure.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import distributed, preemption, sharding
from cdc_jax.distributed import DistributedError, Plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, COLS = 8, 3  # the global batch of the collective test
STEPS = 3  # the training comparison
LONG = 40  # the preemption test: SIGTERM comes long before the end


def global_rows():
  return np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) + 0.5


def weighted_sum(x):
  """Sensitive to the row order: row r weighs r + 1."""
  return jnp.sum(x * jnp.arange(1, ROWS + 1, dtype=x.dtype)[:, None])


def train_config(num_steps=STEPS):
  """Global batch 4 (one crop per device), a final checkpoint."""
  import tiny_training

  c = tiny_training.config(batch_size=4, num_steps=num_steps)
  c.checkpoint.every = num_steps
  c.eval.steps = 1
  return c


# -- the workers (subprocesses) ------------------------------------------------


def _worker_collective(out: dict) -> None:
  """The global batch from this process's rows; a jitted reduction."""
  mesh = sharding.make_mesh()
  pid, n = jax.process_index(), jax.process_count()
  local = global_rows()[pid * ROWS // n : (pid + 1) * ROWS // n]
  batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
  total = jax.jit(weighted_sum, out_shardings=sharding.replicated(mesh, 0))
  out["global_shape"] = list(batch.shape)
  out["weighted_sum"] = float(total(batch))
  try:
    sharding.check_batch(6, mesh)
    out["check_batch"] = "accepted 6"
  except sharding.ShardingError as e:
    out["check_batch"] = str(e)


def _worker(mode: str, out_path: str, coordinator=None, pid=None) -> None:
  jax.config.update("jax_disable_most_optimizations", True)  # as conftest
  # No persistent compile cache: in jax 0.10.2 each process has its own
  # cache key for a multi-process program and only process 0 writes, so
  # with a warm cache process 0 loads while process 1 compiles, and the
  # skew can exceed gloo's 30 s start-up deadline (GLOO_SKEW).
  jax.config.update("jax_enable_compilation_cache", False)
  n = None if coordinator is None else 2
  plan = distributed.initialize(coordinator, n, pid, timeout_s=60)
  out = {
    "plan": plan.kind,
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "describe": distributed.describe(plan),
  }
  workdir = os.path.join(os.path.dirname(out_path), "work")
  if mode == "train":
    from cdc_jax import jobs, train

    t0 = time.time()
    out["metrics"] = train.train_and_evaluate(train_config(), workdir)
    out["train_s"] = time.time() - t0
    out["exported"] = jobs.export_job(workdir)  # process 0 only
  elif mode == "preempt":
    _worker_preempt(out, workdir)
  else:
    _worker_collective(out)
  with open(out_path, "w") as f:
    json.dump(out, f)
  if out.get("preempted_at") is not None:
    sys.exit(preemption.EXIT_CODE)  # as the main job does


def _worker_preempt(out: dict, workdir: str) -> None:
  """Trains LONG steps, logging each on process 0; records where a
  preemption stopped it (None: it finished)."""
  from cdc_jax import train

  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("cdc_jax").setLevel(logging.INFO)
  started = _Records()
  logging.getLogger("cdc_jax.train").addHandler(started)
  out["preempted_at"], out["started"] = None, started.messages
  try:
    out["metrics"] = train.train_and_evaluate(train_config(LONG), workdir)
  except preemption.Preempted as e:
    out["preempted_at"] = e.step


class _Records(logging.Handler):
  """Keeps the 'training from ...' message of the trainer's log."""

  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    if record.getMessage().startswith("training from"):
      self.messages.append(record.getMessage())


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# XLA:CPU's gloo collectives give a peer 30 s (not configurable) to reach
# its first collective; on a loaded 2-core machine one process can fall
# that far behind the other while compiling.
GLOO_SKEW = "Gloo context initialization failed"


def run_pair(mode, tmp_path, timeout=120, slurm=False) -> list[dict]:
  """Runs the two workers of ``mode``; returns their JSON outputs.

  ``slurm``: no coordinator arguments; a faked SLURM step instead. A
  pair that fails through the gloo start-up deadline (scheduling skew on
  a loaded machine, not a fault of the code under test) runs once more.
  """
  codes, logs = _run_pair_once(mode, tmp_path, timeout, slurm)
  if codes != [0, 0] and any(GLOO_SKEW in err for err in logs):
    print("gloo start-up timeout (process skew under load); rerunning")
    codes, logs = _run_pair_once(mode, tmp_path, timeout, slurm)
  report = "\n".join(
    f"--- process {i} (exit {code}) stderr:\n{err[-4000:]}"
    for i, (code, err) in enumerate(zip(codes, logs, strict=True))
  )
  assert codes == [0, 0], report
  results = []
  for i in range(2):
    with open(tmp_path / f"out{i}.json") as f:
      results.append(json.load(f))
  return results


def _run_pair_once(mode, tmp_path, timeout, slurm):
  """(exit codes, stderr without gloo's chatter) of one run of the pair."""
  procs = _start_pair(mode, tmp_path, slurm)
  try:
    logs = [p.communicate(timeout=timeout)[1] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:  # SIGKILL: JAX catches SIGTERM (preemption notice)
      p.kill()
    logs = [p.communicate()[1] for p in procs]
  return [p.returncode for p in procs], [_without_gloo(e) for e in logs]


def _without_gloo(err: str) -> str:
  return "\n".join(ln for ln in err.splitlines() if "[Gloo]" not in ln)


def _start_pair(mode, tmp_path, slurm=False) -> list[subprocess.Popen]:
  """Starts this file's two workers of ``mode`` (stdout, stderr piped)."""
  port = free_port()
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    "PYTHONPATH": os.pathsep.join([REPO, os.path.dirname(__file__)]),
  }
  for k in [k for k in env if k.startswith(("CDC_", "SLURM_"))]:
    del env[k]
  procs = []
  for i in range(2):
    args, penv = [mode, str(tmp_path / f"out{i}.json")], dict(env)
    if slurm:
      penv.update(
        SLURM_JOB_ID="4242",
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS="2",
        SLURM_PROCID=str(i),
        SLURM_LOCALID=str(i),
        JAX_COORDINATOR_PORT=str(port),
      )
    else:
      args += [f"127.0.0.1:{port}", str(i)]
    procs.append(
      subprocess.Popen(
        [sys.executable, __file__, *args],
        cwd=REPO,
        env=penv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  return procs


def _check_topology(results, kind):
  for i, r in enumerate(results):
    assert r["plan"] == kind
    assert r["process_index"] == i
    assert (r["process_count"], r["device_count"]) == (2, 4)
    assert r["local_device_count"] == 2
    assert r["describe"].startswith(f"process {i} of 2")
    assert "2 local / 4 global cpu devices" in r["describe"]


# slow: gloo's fixed 30 s start-up deadline can pass on a loaded 2-core
# machine while the other process still compiles.
@pytest.mark.slow
def test_two_processes_build_one_global_batch(tmp_path):
  results = run_pair("collective", tmp_path)
  _check_topology(results, "explicit")
  # The single-process result of the same global batch.
  want = float(weighted_sum(jax.numpy.asarray(global_rows())))
  for r in results:
    assert r["global_shape"] == [ROWS, COLS]
    assert r["weighted_sum"] == pytest.approx(want, rel=1e-6)
    # The batch check counts every process's devices.
    assert "batch_size=6" in r["check_batch"]
    assert "4 devices (2 process(es) x 2 local)" in r["check_batch"]


@pytest.mark.slow  # 2 processes (see above)
def test_slurm_step_is_detected(tmp_path):
  """No arguments: the SLURM variables of an srun step start the pair."""
  results = run_pair("collective", tmp_path, slurm=True)
  _check_topology(results, "auto")
  assert "SLURM step with 2 tasks" in results[0]["describe"]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  """3 steps on 2 processes x 2 devices == 1 process x 4 devices, same
  global batch (process p's rows from its own shard of the files)."""
  from cdc_jax import checkpoint, train
  from cdc_jax.data.loader import Loader
  from cdc_jax.data.sources import make_source
  from cdc_jax.models.cdc import from_config
  from cdc_jax.optim import make_optimizer
  from cdc_jax.train_step import make_train_step

  t0 = time.time()
  results = run_pair("train", tmp_path, timeout=1500)
  print(f"pair: {time.time() - t0:.1f} s, train_and_evaluate", end=" ")
  print(", ".join(f"{r['train_s']:.1f} s" for r in results))
  _check_topology(results, "explicit")
  c = train_config()
  model, tx = from_config(c.model), make_optimizer(c.train)
  mesh = sharding.make_mesh(jax.devices()[:4])
  fresh = checkpoint.make_manager(str(tmp_path / "ref"), 1, STEPS)
  state, origin = train.initial_state(c, model, tx, fresh, mesh)
  assert origin == "scratch"
  state_sharding = sharding.replicated(mesh, state)
  step, batch_sharding = make_train_step(c, model, tx, mesh, state_sharding)
  loaders = [
    Loader(make_source(c.data), 2, c.data.crop_size, c.train.seed, p, 2)
    for p in range(2)
  ]
  assert not set(loaders[0].indices) & set(loaders[1].indices)
  for k in range(STEPS):
    rows = np.concatenate([ld.batch_at(k) for ld in loaders])
    state, metrics = step(state, jax.device_put(rows, batch_sharding))
  want = jax.device_get(state)

  manager = checkpoint.make_manager(str(tmp_path / "work"), 1, STEPS)
  try:
    assert manager.latest_step() == STEPS
    got = jax.device_get(checkpoint.restore_or_none(manager, want))
  finally:
    manager.close()
  assert int(got.step) == STEPS
  # Different reduction orders (gloo across processes): float32 rounding;
  # Adam's eps 1e-5 (tiny_training) keeps it from flipping updates.
  for name in ("params", "ema_params", "opt_state"):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      getattr(got, name),
      getattr(want, name),
    )
  for r in results:
    assert r["metrics"]["loss"] == pytest.approx(
      float(metrics["loss"]), rel=1e-5
    )
  assert os.path.isdir(tmp_path / "work" / "model")  # process 0 exported
  # --mode=export: process 0 alone reads the checkpoint and writes.
  assert results[0]["exported"] == str(tmp_path / "work" / "model")
  assert results[1]["exported"] is None


class _Pair:
  """The two workers of ``mode``, their stderr read line by line."""

  def __init__(self, mode, tmp_path):
    self.procs = _start_pair(mode, tmp_path)
    self.logs: list[list[str]] = [[], []]
    self.lines: queue.Queue = queue.Queue()
    self.readers = [
      threading.Thread(target=self._read, args=(i,), daemon=True)
      for i in range(2)
    ]
    for t in self.readers:
      t.start()

  def _read(self, i):
    for line in self.procs[i].stderr:
      self.logs[i].append(line)
      self.lines.put((i, line))
    self.lines.put((i, None))

  def wait_for_step(self, step, timeout) -> bool:
    """True once process 0 logs ``step >= step``; False if it ends."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      try:
        i, line = self.lines.get(timeout=5)
      except queue.Empty:
        continue
      if i == 0 and line is None:
        return False
      m = re.search(r"step (\d+): loss", line or "")
      if i == 0 and m and int(m.group(1)) >= step:
        return True
    return False

  def finish(self, timeout) -> tuple[list[int], list[str]]:
    """(exit codes, stderr without gloo's chatter); kills at timeout."""
    for p in self.procs:
      try:
        p.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for t in self.readers:
      t.join(timeout=60)
    for p in self.procs:
      p.stdout.close()
    codes = [p.returncode for p in self.procs]
    return codes, [_without_gloo("".join(lines)) for lines in self.logs]


def _preempt_pair(tmp_path) -> tuple[list[int], list[str]]:
  """Starts the pair and SIGTERMs process 1 once process 0 logged step 2
  (once more if gloo's start-up deadline passed)."""
  for _ in range(2):
    pair = _Pair("preempt", tmp_path)
    if pair.wait_for_step(2, timeout=1500):
      pair.procs[1].send_signal(signal.SIGTERM)
    codes, logs = pair.finish(timeout=300)
    if not any(GLOO_SKEW in err for err in logs):
      break
    print("gloo start-up timeout (process skew under load); rerunning")
  return codes, logs


@pytest.mark.slow  # two pairs of processes
def test_sigterm_to_one_process_saves_both_and_the_pair_resumes(tmp_path):
  """JAX's preemption service: a SIGTERM to process 1 alone makes both
  save the same step and exit 75; the restarted pair resumes there."""
  from cdc_jax import checkpoint

  codes, logs = _preempt_pair(tmp_path)
  report = "\n".join(
    f"--- process {i}:\n{e[-3000:]}" for i, e in enumerate(logs)
  )
  assert codes == [preemption.EXIT_CODE] * 2, report
  results = []
  for i in range(2):
    with open(tmp_path / f"out{i}.json") as f:
      results.append(json.load(f))
  saved = results[0]["preempted_at"]
  assert results[1]["preempted_at"] == saved  # the same step everywhere
  assert 2 <= saved < LONG
  work = str(tmp_path / "work")
  assert checkpoint.latest_step(work) == saved

  results = run_pair("preempt", tmp_path, timeout=1500)
  for r in results:
    assert r["preempted_at"] is None
    assert r["started"] == [
      f"training from checkpoint step {saved}, step {saved} of {LONG}"
    ]
  assert checkpoint.latest_step(work) == LONG


@pytest.mark.slow  # ~30 s on 2 loaded cores (a model export, compiles)
def test_initial_state_from_init_from_is_replicated_on_the_mesh(tmp_path):
  """``train.init_from`` params go onto the mesh from each process's own
  host copy (``make_array_from_callback``: no cross-process comparison of
  every leaf, as ``device_put`` of host data does), EMA copied."""
  from jax.sharding import NamedSharding, PartitionSpec

  from cdc_jax import checkpoint, testing, train
  from cdc_jax.models.cdc import from_config
  from cdc_jax.optim import make_optimizer
  from configs import eps_linear

  params = testing.export_tiny(str(tmp_path / "m"), "eps")
  c = eps_linear.get_config("tiny")
  c.unlock()
  c.model.update(testing.TINY_MODELS["eps"])
  c.train.ema.enabled = True
  c.train.init_from = str(tmp_path / "m")
  mesh = sharding.make_mesh()
  manager = checkpoint.make_manager(str(tmp_path / "w"), 1, 10)
  try:
    state, origin = train.initial_state(
      c, from_config(c.model), make_optimizer(c.train), manager, mesh
    )
  finally:
    manager.close()
  assert origin == c.train.init_from and int(state.step) == 0
  replicated = NamedSharding(mesh, PartitionSpec())
  assert all(x.sharding == replicated for x in jax.tree.leaves(state))
  host = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, host.params, params)
  jax.tree.map(np.testing.assert_array_equal, host.ema_params, params)


# -- plan: who starts what (no processes) --------------------------------------

SLURM_TASK = dict(
  SLURM_JOB_ID="7",
  SLURM_STEP_NODELIST="gpu[01-02]",
  SLURM_NTASKS="16",
  SLURM_PROCID="3",
  SLURM_LOCALID="3",
)


def _plan(*args, env=None, tpu_vm=False, **kwargs) -> Plan:
  return distributed.plan(*args, environ=env or {}, tpu_vm=tpu_vm, **kwargs)


def test_plan_single_process_by_default():
  assert _plan().kind == "single"
  assert _plan(env={"SLURM_NTASKS": "4"}).kind == "single"  # not in a step
  assert _plan(env={**SLURM_TASK, "SLURM_NTASKS": "1"}).kind == "single"
  assert _plan(env={**SLURM_TASK, "CDC_DISTRIBUTED": "off"}).kind == "single"


def test_plan_explicit_from_flags_or_environment():
  p = _plan("10.0.0.1:1234", 2, 1)
  assert (p.kind, p.coordinator, p.num_processes, p.process_id) == (
    "explicit",
    "10.0.0.1:1234",
    2,
    1,
  )
  env = {
    "CDC_COORDINATOR": "h:9",
    "CDC_NUM_PROCESSES": "4",
    "CDC_PROCESS_ID": "3",
  }
  p = _plan(env=env)
  assert (p.coordinator, p.num_processes, p.process_id) == ("h:9", 4, 3)
  p = _plan(process_id=0, env=env)  # a flag overrides its variable
  assert (p.coordinator, p.num_processes, p.process_id) == ("h:9", 4, 0)


def test_plan_detects_clusters():
  assert _plan(env=SLURM_TASK).reason == "SLURM step with 16 tasks"
  assert _plan(tpu_vm=True).kind == "auto"
  assert _plan(env={"CDC_DISTRIBUTED": "auto"}).kind == "auto"
  assert _plan("auto").kind == "auto"
  # In a SLURM step, a coordinator alone is enough: JAX takes the rest.
  p = _plan(env={**SLURM_TASK, "CDC_COORDINATOR": "gpu01:61447"})
  assert (p.kind, p.coordinator, p.num_processes) == (
    "explicit",
    "gpu01:61447",
    None,
  )


@pytest.mark.parametrize(
  "args,env,expect",
  [
    (("h:1", 2, 2), {}, "process_id=2 .* out of range"),
    (("h:1", 2, -1), {}, "process_id=-1 .* out of range"),
    (("h:1", 0, 0), {}, "num_processes=0 .* at least 1"),
    (("h", 2, 0), {}, "coordinator='h' .* HOST:PORT"),
    (("h:99999", 2, 0), {}, "HOST:PORT"),
    ((None, 2, None), {}, "coordinator, process_id missing"),
    (("auto", 2, None), {}, "coordinator=auto takes everything"),
    ((), {"CDC_PROCESS_ID": "one"}, "process_id='one' .* not an integer"),
    ((), {"CDC_DISTRIBUTED": "yes"}, "CDC_DISTRIBUTED='yes'"),
  ],
)
def test_plan_errors_are_clear(args, env, expect):
  with pytest.raises(DistributedError, match=expect):
    _plan(*args, env=env)


def test_initialize_does_nothing_for_one_process(monkeypatch):
  for k in ("CDC_COORDINATOR", "CDC_NUM_PROCESSES", "CDC_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("CDC_DISTRIBUTED", "off")
  assert distributed.initialize().kind == "single"
  assert not jax.distributed.is_initialized()
  assert distributed.describe() == (
    f"process 0 of 1: {jax.local_device_count()} local / "
    f"{jax.device_count()} global cpu devices"
  )


def test_initialize_after_devices_are_used_is_a_clear_error():
  jax.devices()  # the backend is up (as in every pytest process)
  with pytest.raises(DistributedError, match="before anything uses a device"):
    distributed.initialize("127.0.0.1:1", 2, 0)


def test_main_rejects_bad_flags_in_one_line(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "cdc_jax.main",
    "--config=configs/eps_linear.py:tiny",
    f"--workdir={tmp_path}",
    "--coordinator=127.0.0.1:1",
    "--num_processes=2",
    "--process_id=2",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  res = subprocess.run(
    cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert res.returncode == 2
  assert "Traceback" not in res.stderr, res.stderr
  errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
  assert len(errors) == 1 and "process_id=2" in errors[0], res.stderr


if __name__ == "__main__":
  _worker(*sys.argv[1:3], *sys.argv[3:4], *map(int, sys.argv[4:5]))
