"""Files written by earlier cdc_jax versions decode as the contract says.

``tests/golden/{eps,x}.cdcj`` (format v1, written before the package
layout changed) and ``{eps,x}_v3.cdcj`` (the current format) were written
by ``tests/golden/make_golden.py``, with their decoded PNGs and the
digests of their symbols. The check runs in a fresh process with JAX's
default compile options and device count, as a user's decode would, and
asserts the decode contract (docs/bitstream.md):

* the decoded symbols are identical, and the entropy coder re-encodes
  them to the identical stream (exact on every machine for v3; v1 and v2
  choose their tables from float32 scales, portable only where that float
  path agrees, as it does for these files);
* the pixels are identical where the PNGs were written, and elsewhere
  within the cross-platform tolerance below.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measured between XLA:CPU settings (default, 8 host devices, backend
# optimisation level 0, max ISA SSE4.2 and AVX2, bfloat16 default matmul
# precision) on these files: at most 1 level, on at most 0.55 % of the
# pixels (x family; 0.008 % for eps). The bounds leave room for other
# CPUs; README states the contract.
MAX_LEVEL_DIFF = 2
MAX_PIXELS_DIFFERING = 0.02


def test_golden_files_decode_as_the_contract_says(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  report = tmp_path / "golden.json"
  script = os.path.join(ROOT, "tests", "golden", "make_golden.py")
  proc = subprocess.run(
    [sys.executable, script, "--check", "--report", str(report)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
  results = {r["file"]: r for r in json.loads(report.read_text())}
  assert sorted(results) == [
    "eps.cdcj",
    "eps_v3.cdcj",
    "x.cdcj",
    "x_v3.cdcj",
  ]
  for name, r in results.items():
    assert r["version"] == (1 if "_v3" not in name else 3)
    assert r["symbols_identical"] and r["stream_identical"], r
    assert r["max_level_diff"] <= MAX_LEVEL_DIFF, r
    assert r["pixels_differing"] <= MAX_PIXELS_DIFFERING, r
