"""Multi-process start-up: one JAX process per host (or per GPU).

``initialize`` decides, before anything touches a device, whether this
run is one process of several and, if so, calls
``jax.distributed.initialize``. Where the settings come from, first
match wins:

1. Explicit values, each from its argument (the main job's
   ``--coordinator``, ``--num_processes``, ``--process_id``) else its
   environment variable (``CDC_COORDINATOR``, ``CDC_NUM_PROCESSES``,
   ``CDC_PROCESS_ID``): all three, or only some inside a SLURM step (JAX
   fills the rest from SLURM's variables). ``--coordinator=auto`` leaves
   all three to JAX's cluster detection.
2. ``CDC_DISTRIBUTED=off``: a single process, whatever the environment
   says (e.g. a one-task step inside a SLURM allocation);
   ``CDC_DISTRIBUTED=auto``: JAX's cluster detection, as ``auto`` above.
3. Detected clusters, in JAX's own terms: a SLURM step with more than
   one task (``srun``: coordinator on the first node of the step, port
   61440 + job id mod 4096 unless ``JAX_COORDINATOR_PORT`` is set, one
   GPU per task unless ``JAX_LOCAL_DEVICE_IDS`` is set); a Cloud TPU VM
   (JAX reads the hosts from the VM metadata; a single-host VM becomes a
   one-process run, which also turns on the preemption service), unless
   ``JAX_PLATFORMS`` leaves out tpu.
4. Otherwise: a single process; nothing is initialised.

After ``initialize``, ``describe()`` gives the line the main job logs:
``process 0 of 2 (explicit, coordinator 10.0.0.1:1234): 4 local / 8
global gpu devices``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax

from cdc_jax.errors import UserError

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "CDC_COORDINATOR"
ENV_NUM_PROCESSES = "CDC_NUM_PROCESSES"
ENV_PROCESS_ID = "CDC_PROCESS_ID"
ENV_MODE = "CDC_DISTRIBUTED"
AUTO = "auto"
# How long a finished process waits at exit for the others. JAX's 300 s
# is shorter than process 0's held-out report after training on a CPU or
# a slow host; a timeout there aborts every process after the work is done.
SHUTDOWN_TIMEOUT_S = 3600
_ENV = {
  "coordinator": ENV_COORDINATOR,
  "num_processes": ENV_NUM_PROCESSES,
  "process_id": ENV_PROCESS_ID,
}

# SLURM's variables for one task of a step (what JAX's detector reads).
_SLURM_VARS = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)


class DistributedError(UserError, ValueError):
  """Multi-process settings that cannot work (one line, for the user)."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What ``initialize`` does: ``kind`` is 'single', 'explicit' or 'auto'.

  For 'explicit', the values given (None: left to JAX's detection); for
  'auto', all None. ``reason`` says where the decision came from.
  """

  kind: str
  reason: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _given(*values) -> bool:
  return any(v not in (None, "") for v in values)


def _int(value, name: str) -> int | None:
  if value in (None, ""):
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedError(
      f"{name}={value!r} (--{name} or {_ENV[name]}) is not an integer"
    ) from None


def _check_coordinator(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(
      f"coordinator={address!r} (--coordinator or {ENV_COORDINATOR}) must "
      "be HOST:PORT with a port in 1..65535, e.g. 10.0.0.1:8476, or 'auto' "
      "for JAX's cluster detection"
    )


def _check_counts(num: int | None, pid: int | None) -> None:
  if num is not None and num < 1:
    raise DistributedError(
      f"num_processes={num} (--num_processes or {ENV_NUM_PROCESSES}) must "
      "be at least 1"
    )
  if pid is not None and (pid < 0 or (num is not None and pid >= num)):
    raise DistributedError(
      f"process_id={pid} (--process_id or {ENV_PROCESS_ID}) is out of "
      f"range: use 0..num_processes-1 (num_processes={num})"
    )


def slurm_tasks(environ: Mapping[str, str]) -> int:
  """Tasks of the SLURM step this process belongs to (0: not in one)."""
  if not all(k in environ for k in _SLURM_VARS):
    return 0
  try:
    return int(environ["SLURM_NTASKS"])
  except ValueError:
    return 0


def on_cloud_tpu_vm() -> bool:
  """Whether JAX found Cloud TPU chips when it was imported."""
  # JAX's own flag (set by ``import jax``), which its TPU-VM cluster
  # detection reads too; there is no public accessor for it.
  from jax._src import cloud_tpu_init

  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def plan(
  coordinator: str | None = None,
  num_processes: int | str | None = None,
  process_id: int | str | None = None,
  environ: Mapping[str, str] | None = None,
  tpu_vm: bool | None = None,
) -> Plan:
  """Decides how to start (see the module docstring); touches no device.

  Raises:
    DistributedError: values that cannot work (a malformed coordinator,
      a process id out of range, an incomplete explicit setting outside
      SLURM).
  """
  env = os.environ if environ is None else environ
  args = dict(
    coordinator=coordinator, num_processes=num_processes, process_id=process_id
  )
  values = [a if _given(a) else env.get(_ENV[k]) for k, a in args.items()]
  if _given(*values):
    return _explicit(*values, env)
  mode = env.get(ENV_MODE, "").strip().lower()
  if mode in ("off", "0", "false", "no"):
    return Plan("single", f"{ENV_MODE}={mode}")
  if mode == AUTO:
    return Plan("auto", f"{ENV_MODE}=auto")
  if mode:
    raise DistributedError(
      f"{ENV_MODE}={mode!r}: use 'auto', 'off' or leave it unset"
    )
  tasks = slurm_tasks(env)
  if tasks > 1:
    return Plan("auto", f"SLURM step with {tasks} tasks")
  if tpu_vm is None:  # JAX_PLATFORMS=cpu on a TPU VM: a CPU run
    tpu_vm = on_cloud_tpu_vm() and "tpu" in env.get("JAX_PLATFORMS", "tpu")
  if tpu_vm:
    return Plan("auto", "Cloud TPU VM")
  return Plan("single", "no coordinator given and no cluster detected")


def _explicit(coordinator, num_processes, process_id, env) -> Plan:
  if coordinator == AUTO:
    if _given(num_processes, process_id):
      raise DistributedError(
        "coordinator=auto takes everything from the cluster; drop "
        "num_processes/process_id or give a HOST:PORT coordinator"
      )
    return Plan("auto", "coordinator=auto")
  num = _int(num_processes, "num_processes")
  pid = _int(process_id, "process_id")
  _check_counts(num, pid)
  if coordinator:
    _check_coordinator(coordinator)
  missing = [
    name
    for name, v in zip(_ENV, (coordinator or None, num, pid), strict=True)
    if v is None
  ]
  if missing and not slurm_tasks(env):
    raise DistributedError(
      f"{', '.join(missing)} missing: a multi-process run needs "
      "--coordinator=HOST:PORT, --num_processes=N and --process_id=I (or "
      f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), unless "
      "SLURM provides them; --coordinator=auto detects SLURM and TPU VMs"
    )
  return Plan("explicit", "explicit", coordinator or None, num, pid)


def initialize(
  coordinator: str | None = None,
  num_processes: int | str | None = None,
  process_id: int | str | None = None,
  timeout_s: int = 300,
  log: bool = False,
) -> Plan:
  """Starts the multi-process runtime when the run has several processes.

  Must run before anything touches a device (``jax.devices()``, a jitted
  call, ``device_put``). Does nothing for a single process, and nothing
  if the runtime is already up. Returns the plan it followed; ``log``:
  logs ``describe(plan)`` (every process, at INFO).

  Raises:
    DistributedError: bad settings, or called after devices were used.
  """
  p = plan(coordinator, num_processes, process_id)
  if p.kind != "single" and not jax.distributed.is_initialized():
    _start(p, timeout_s)
  if log:
    logger.info("%s", describe(p))
  return p


def _start(p: Plan, timeout_s: int) -> None:
  try:
    jax.distributed.initialize(
      coordinator_address=p.coordinator,
      num_processes=p.num_processes,
      process_id=p.process_id,
      initialization_timeout=timeout_s,
      shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    )
  except RuntimeError as e:
    if "before any JAX calls" in str(e):
      raise DistributedError(
        "the multi-process runtime must start before anything uses a "
        "device: call cdc_jax.distributed.initialize() first"
      ) from None
    raise


def describe(p: Plan | None = None) -> str:
  """'process i of n: L local / G global <platform> devices' (+ origin)."""
  where = ""
  if p is not None and p.kind != "single":
    where = f" ({p.reason}"
    where += f", coordinator {p.coordinator})" if p.coordinator else ")"
  platform = jax.devices()[0].platform
  return (
    f"process {jax.process_index()} of {jax.process_count()}{where}: "
    f"{jax.local_device_count()} local / {jax.device_count()} global "
    f"{platform} devices"
  )
