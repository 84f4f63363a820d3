"""The main job's command line: user errors are one line, export mode."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from configs import eps_linear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, tmp_path):
  cmd = [sys.executable, "-m", "cdc_jax.main", *args]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )


@pytest.mark.parametrize(
  "override,expect",
  [
    ("--config.diffusion.aux_weight=0.9", "aux_weight"),
    ("--config.train.lr=abc", "lr"),
    ("--config.train.lrr=1", "lrr"),
    ("--config=configs/eps_linear.py:tinyy", "tinyy"),
  ],
  ids=["aux_weight", "not_a_number", "misspelled_key", "unknown_variant"],
)
def test_main_user_error_is_one_line(tmp_path, override, expect):
  res = _main(
    "--config=configs/eps_linear.py:tiny",
    f"--workdir={tmp_path / 'w'}",
    override,
    tmp_path=tmp_path,
  )
  assert res.returncode != 0
  assert "Traceback" not in res.stderr, res.stderr
  lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
  errors = [ln for ln in lines if "error" in ln.lower()]
  assert len(errors) == 1 and expect in errors[0], res.stderr


def test_export_without_checkpoint_is_one_line(tmp_path):
  work = tmp_path / "w"
  work.mkdir()
  (work / "config.json").write_text(
    eps_linear.get_config("tiny").to_json_best_effort()
  )
  res = _main(
    "--config=configs/eps_linear.py:tiny",
    f"--workdir={work}",
    "--mode=export",
    tmp_path=tmp_path,
  )
  assert res.returncode == 2, res.stderr
  assert "Traceback" not in res.stderr, res.stderr
  assert "error:" in res.stderr and "no complete checkpoint" in res.stderr


def test_export_of_a_non_workdir_is_one_line(tmp_path):
  work = tmp_path / "w"
  work.mkdir()
  (work / "config.json").write_text("{}")
  res = _main(
    "--config=configs/eps_linear.py:tiny",
    f"--workdir={work}",
    "--mode=export",
    tmp_path=tmp_path,
  )
  assert res.returncode == 2, res.stderr
  assert "Traceback" not in res.stderr, res.stderr
  assert "no 'model' section" in res.stderr


def test_bucket_workdir_fails_fast_in_one_line(tmp_path):
  res = _main(
    "--config=configs/eps_linear.py:tiny",
    "--workdir=gs://bucket/runs/eps",
    tmp_path=tmp_path,
  )
  assert res.returncode == 2, res.stderr
  assert "Traceback" not in res.stderr, res.stderr
  errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
  assert len(errors) == 1, res.stderr
  assert "gs://bucket/runs/eps" in errors[0] and "gcsfuse" in errors[0]
  assert "launch/tpu_pod.sh" in errors[0]
  # Nothing started: no runtime, no workdir (no local "gs:" folder).
  assert not os.path.exists(os.path.join(REPO, "gs:"))
  assert "process 0 of" not in res.stderr


def test_default_workdir_is_named_after_the_config():
  from cdc_jax.jobs import default_workdir

  assert default_workdir("configs/eps_linear.py") == "runs/eps_linear"
  assert default_workdir("configs/x_cosine.py:tiny") == "runs/x_cosine_tiny"
  got = default_workdir("configs/x_cosine.py:tiny,steps=3")
  assert got == "runs/x_cosine_tiny_steps3"


def test_no_workdir_uses_and_prints_the_default(tmp_path):
  """Without --workdir the run names the default it uses (here export,
  which needs an existing workdir: one line, nothing created)."""
  default = os.path.join(REPO, "runs", "eps_linear_tiny")
  if os.path.lexists(default):
    pytest.skip(f"{default} exists")
  res = _main(
    "--config=configs/eps_linear.py:tiny", "--mode=export", tmp_path=tmp_path
  )
  assert res.returncode == 2, res.stderr
  assert "Traceback" not in res.stderr, res.stderr
  assert "workdir: runs/eps_linear_tiny (the default" in res.stdout
  assert "--workdir=runs/eps_linear_tiny: no such folder" in res.stderr
  assert not os.path.lexists(default)
