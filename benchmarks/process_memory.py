"""Peak memory of one measurement, each in a fresh process (Linux).

The memory benchmarks (decode_memory, decode_tiled, encode_tiled) run every
measurement in a child process of their own module, so that one peak does
not hide behind another and an out-of-memory kill fails one row, not the
run. In the child: ``mark()`` after the model is loaded (the current RSS,
and the kernel's high-water mark VmHWM reset through
``/proc/self/clear_refs``), ``above(mark)`` after the work (the peak RSS
above the mark). In the parent: ``run_child(module, *argv)`` returns the
JSON object the child printed last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def status_bytes(key: str) -> int:
  """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"{key} not in /proc/self/status")


def mark() -> int:
  """The RSS now; resets the peak (VmHWM) to it."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return status_bytes("VmRSS")


def above(rss_at_mark: int) -> int:
  """Peak RSS since ``mark()``, above the RSS it returned."""
  return status_bytes("VmHWM") - rss_at_mark


def run_child(module: str, *argv) -> dict:
  """Runs ``python -m MODULE ARGV...`` (from this process's working
  directory) on one CPU device (XLA_FLAGS dropped, JAX_PLATFORMS=cpu
  unless set); returns its last stdout line as JSON."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run(
    [sys.executable, "-m", module, *map(str, argv)],
    env=env,
    capture_output=True,
    text=True,
  )
  if proc.returncode:
    why = " (killed: out of memory?)" if proc.returncode == -9 else ""
    raise RuntimeError(
      f"{module} {' '.join(map(str, argv))} failed, exit "
      f"{proc.returncode}{why}:\n{proc.stderr[-3000:]}"
    )
  return json.loads(proc.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
  return f"{n / 1e9:.2f} GB"
