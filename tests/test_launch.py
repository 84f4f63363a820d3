"""The launch scripts: syntax (bash -n), shellcheck, and their dry runs.

A dry run prints the commands a script would run; with fake ``gcloud`` /
``srun`` / ``scontrol`` on PATH (which record their arguments) the real
run must execute exactly the printed commands.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(
  f for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch"))
)
TPU = os.path.join(LAUNCH, "tpu_pod.sh")
SLURM = os.path.join(LAUNCH, "slurm.sbatch")

# A fake command: appends its name, argv and CDC_COORDINATOR to $CALLS.
FAKE = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["CALLS"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0]), sys.argv[1:],
                      os.environ.get("CDC_COORDINATOR")]) + "\\n")
if os.path.basename(sys.argv[0]) == "scontrol":
  print("gpu03\\ngpu04")
"""


def test_scripts_found():
  assert {"local.sh", "tpu_pod.sh", "slurm.sbatch"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
  res = subprocess.run(
    ["bash", "-n", os.path.join(LAUNCH, name)], capture_output=True, text=True
  )
  assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_shellcheck(name):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  res = subprocess.run(
    ["shellcheck", "--shell=bash", os.path.join(LAUNCH, name)],
    capture_output=True,
    text=True,
  )
  assert res.returncode == 0, res.stdout + res.stderr


def _env(tmp_path, **extra):
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "CDC_", "TPU_", "DRY_RUN"))
  }
  env.update(TMPDIR=str(tmp_path), CALLS=str(tmp_path / "calls.jsonl"))
  env.update(extra)
  return env


def _fakes(tmp_path, *names):
  """A PATH with fake ``names`` in front."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for n in names:
    (bin_dir / n).write_text(FAKE)
    (bin_dir / n).chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def _run(script, *args, env):
  return subprocess.run(
    ["bash", script, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )


def _calls(tmp_path):
  path = tmp_path / "calls.jsonl"
  if not path.exists():
    return []
  return [json.loads(ln) for ln in path.read_text().splitlines()]


def _commands(stdout, program):
  """The printed commands of ``program``, split as a shell would."""
  return [
    shlex.split(ln)
    for ln in stdout.splitlines()
    if ln.startswith(program + " ")
  ]


# -- TPU pods ------------------------------------------------------------------

TPU_ENV = dict(
  TPU_NAME="cdc-test",
  ZONE="us-west4-a",
  BUCKET="gs://my-bucket",
  DATA="gs://my-bucket/vimeo_septuplet",
)
JOB_FLAGS = ["--config.train.batch_size=64", "--config.data.path=/odd 'p'"]


@pytest.mark.parametrize(
  "command", ["create", "install", "run", "logs", "stop", "delete"]
)
def test_tpu_dry_run_prints_what_runs(tmp_path, command):
  env = _env(tmp_path, **TPU_ENV)
  dry = _run(TPU, "--dry-run", command, "--", *JOB_FLAGS, env=env)
  assert dry.returncode == 0, dry.stderr
  printed = _commands(dry.stdout, "gcloud")
  assert printed and not _calls(tmp_path)  # printed, nothing ran

  env["PATH"] = _fakes(tmp_path, "gcloud")
  real = _run(TPU, command, "--", *JOB_FLAGS, env=env)
  assert real.returncode == 0, real.stderr
  ran = [["gcloud", *argv] for name, argv, _ in _calls(tmp_path)]
  assert ran == printed


def _tpu(tmp_path, command, **extra):
  res = _run(
    TPU,
    "--dry-run",
    command,
    "--",
    *JOB_FLAGS,
    env=_env(tmp_path, **{**TPU_ENV, **extra}),
  )
  assert res.returncode == 0, res.stderr
  return _commands(res.stdout, "gcloud")


def _remote(cmd):
  """The shell line a ``gcloud ... ssh --command=LINE`` runs on hosts."""
  (line,) = [a[len("--command=") :] for a in cmd if a.startswith("--command=")]
  res = subprocess.run(["bash", "-n", "-c", line], capture_output=True)
  assert res.returncode == 0, (line, res.stderr)
  return line


def test_tpu_create_and_delete(tmp_path):
  (create,) = _tpu(tmp_path, "create")
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert "--accelerator-type=v5litepod-16" in create
  assert "--version=v2-alpha-tpuv5-lite" in create
  queued = _tpu(tmp_path, "create", QUEUED="1", SPOT="1")[0]
  assert queued[:5] == ["gcloud", "compute", "tpus", "queued-resources"] + [
    "create"
  ]
  assert "--node-id=cdc-test" in queued and "--spot" in queued
  assert "--runtime-version=v2-alpha-tpuv5-lite" in queued
  (delete,) = _tpu(tmp_path, "delete", QUEUED="1")
  assert delete[3:5] == ["queued-resources", "delete"]
  assert "--force" in delete


def test_tpu_install_and_run_on_all_workers(tmp_path):
  scp, ssh = _tpu(tmp_path, "install")
  assert scp[4] == "scp" and "--worker=all" in scp
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  line = _remote(ssh)
  assert "-r ~/cdc_jax/requirements.txt" in line
  assert "'jax[tpu]==0.10.2'" in line

  (run,) = _tpu(tmp_path, "run")
  assert run[4] == "ssh" and "--worker=all" in run
  line = _remote(run)
  assert "gcsfuse" in line and "/mnt/gcs/my-bucket" in line
  assert "gcloud storage rsync -r gs://my-bucket/vimeo_septuplet" in line
  job = shlex.split(line.split("nohup ", 1)[1].split(" >", 1)[0])
  assert job[:3] == ["~/cdc_venv/bin/python", "-m", "cdc_jax.main"]
  assert "--workdir=/mnt/gcs/my-bucket/runs/eps" in job
  assert job[-2:] == JOB_FLAGS  # passed through, quoted once more
  assert "CDC_DISTRIBUTED=auto" in line


def test_tpu_logs_and_usage_errors(tmp_path):
  (logs,) = _tpu(tmp_path, "logs")
  assert "--worker=0" in logs and "tail" in _remote(logs)
  res = _run(TPU, "--dry-run", "run", env=_env(tmp_path))  # no BUCKET
  assert res.returncode == 2 and "BUCKET=gs://" in res.stderr
  res = _run(TPU, "bogus", env=_env(tmp_path))
  assert res.returncode == 2 and "create" in res.stdout


# -- SLURM ---------------------------------------------------------------------

SLURM_ENV = dict(SLURM_JOB_ID="12345", SLURM_JOB_NODELIST="gpu[03-06,09],cpu1")


def _slurm(tmp_path, *flags, dry=True, fakes=(), **extra):
  env = _env(tmp_path, **{**SLURM_ENV, **extra})
  env["PATH"] = _fakes(tmp_path, *fakes)
  args = ["--dry-run"] if dry else []
  args += ["configs/eps_linear.py", "/shared/run", *flags]
  return _run(SLURM, *args, env=env)


def test_slurm_dry_run_without_slurm(tmp_path):
  res = _slurm(tmp_path, "--config.train.batch_size=16")
  assert res.returncode == 0, res.stderr
  port = 61440 + 12345 % 4096  # JAX's own choice for a SLURM job
  assert f"export CDC_COORDINATOR=gpu03:{port}" in res.stdout
  (srun,) = _commands(res.stdout, "srun")
  assert srun[-5:] == [
    "-m",
    "cdc_jax.main",
    "--config=configs/eps_linear.py",
    "--workdir=/shared/run",
    "--config.train.batch_size=16",
  ]
  assert "--kill-on-bad-exit=1" in srun and not _calls(tmp_path)


def test_slurm_runs_the_printed_srun(tmp_path):
  dry = _slurm(tmp_path, fakes=("scontrol",), PORT="1234")
  (printed,) = _commands(dry.stdout, "srun")
  assert "CDC_COORDINATOR=gpu03:1234" in dry.stdout  # from scontrol
  (tmp_path / "calls.jsonl").unlink()
  res = _slurm(tmp_path, dry=False, fakes=("scontrol", "srun"), PORT="1234")
  assert res.returncode == 0, res.stderr
  scontrol, srun = _calls(tmp_path)
  assert scontrol[:2] == [
    "scontrol",
    ["show", "hostnames", SLURM_ENV["SLURM_JOB_NODELIST"]],
  ]
  assert ["srun", *srun[1]] == printed
  assert srun[2] == "gpu03:1234"  # the tasks inherit the coordinator


def test_slurm_one_process_per_node(tmp_path):
  res = _slurm(tmp_path, PER_NODE="1", SLURM_GPUS_ON_NODE="4")
  assert "export JAX_LOCAL_DEVICE_IDS=0\\,1\\,2\\,3" in res.stdout
  (srun,) = _commands(res.stdout, "srun")
  assert "--ntasks-per-node=1" in srun


def test_slurm_outside_a_job_is_an_error(tmp_path):
  env = _env(tmp_path)
  res = _run(SLURM, "--dry-run", "c", "w", env=env)
  assert res.returncode != 0 and "not in a SLURM job" in res.stderr


def test_local_dry_run(tmp_path):
  res = _run(
    os.path.join(LAUNCH, "local.sh"),
    "--dry-run",
    "configs/x_cosine.py:tiny",
    "/tmp/w",
    "--config.train.num_steps=3",
    env=_env(tmp_path),
  )
  assert res.returncode == 0, res.stderr
  (cmd,) = _commands(res.stdout, "python")
  assert cmd == [
    "python",
    "-m",
    "cdc_jax.main",
    "--config=configs/x_cosine.py:tiny",
    "--workdir=/tmp/w",
    "--config.train.num_steps=3",
  ]


def test_tpu_stop_line_terms_then_kills(tmp_path):
  """The hosts' stop line, run here on a job that ignores SIGTERM (as a
  JAX process does until its loop reaches a preemption sync point)."""
  (stop,) = _tpu(tmp_path, "stop", STOP_WAIT="1")
  job = subprocess.Popen(["bash", "-c", "trap '' TERM; exec sleep 60"])
  (tmp_path / "cdc_train.pid").write_text(str(job.pid))
  try:
    res = subprocess.run(
      ["bash", "-c", _remote(stop)],
      env={**os.environ, "HOME": str(tmp_path)},
      timeout=30,
    )
    assert job.wait(timeout=10) == -9  # SIGKILL after STOP_WAIT
  finally:
    job.kill()
  assert res.returncode == 0
