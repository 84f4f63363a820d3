"""Files written by an earlier cdc_jax decode bit-identically today.

``tests/golden/{eps,x}.cdcj`` and their decoded PNGs were written by
``tests/golden/make_golden.py`` before the package layout changed. The
check runs in a fresh process with JAX's default compile options and
device count (the test session's 8 fake devices and reduced optimisation
change XLA:CPU's rounding), as a user's decode would.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_golden_files_decode_bit_identically():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  script = os.path.join(HERE, "golden", "make_golden.py")
  proc = subprocess.run(
    [sys.executable, script, "--check"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
  for family in ("eps", "x"):
    assert f"{family}: file identical True, pixels identical True" in (
      proc.stdout
    )
