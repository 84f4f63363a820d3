"""Entry point: train (default), evaluate or export a CDC model.

  python -m cdc_jax.main --config=configs/x_cosine.py:tiny --workdir=/tmp/cdc
  python -m cdc_jax.main --config=configs/eps_linear.py --workdir=runs/eps \
      --config.data.name=vimeo --config.data.path=/data/vimeo_septuplet
  python -m cdc_jax.main --config=... --workdir=... --mode=eval
  python -m cdc_jax.main --config=... --workdir=... --mode=export

train: trains (resuming from the latest checkpoint in --workdir), exports
workdir/model (decoding params, EMA where present, with entropy tables),
then compresses the held-out photo to a real file and reports real and
estimated bpp and PSNR. eval: evaluates the latest checkpoint (EMA params,
no optimizer built) on the held-out photo beside JPEG/WebP/AVIF, report in
workdir/eval. export: writes workdir/model from the latest checkpoint.
Multi-process runs: see cdc_jax/distributed.py and launch/.

Exit status: 0 done; 2 a user error (one line on stderr); 130 Ctrl-C
(one line; checkpoints already saved are kept); 75 preempted
(SIGTERM, or JAX's preemption notice): a checkpoint of the current step
was saved, rerun the same command to resume (cdc_jax/preemption.py).
Compiled programs are cached on disk (cdc_jax/compile_cache.py;
--nocompile_cache or CDC_COMPILE_CACHE=off turn that off). --workdir
must be a local or mounted path, not a gs:// URL; without it the run uses
runs/<config>[_<variant>] (printed).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from cdc_jax import cli_errors
from cdc_jax.config_flags_errors import parse_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Python config file (and :variant).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Directory for checkpoints, logs and the exported model (default: "
  "runs/<config>[_<variant>], e.g. runs/x_cosine_tiny).",
)
_MODE = flags.DEFINE_enum(
  "mode", "train", ["train", "eval", "export"], "train (resuming)|eval|export"
)
_COORD = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0|auto")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-process: count.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-process: this one.")
_CACHE = flags.DEFINE_bool(
  "compile_cache",
  True,
  "Persistent XLA compilation cache (cdc_jax/compile_cache.py); "
  "--nocompile_cache turns it off.",
)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax is chatty
  logging.getLogger("cdc_jax").setLevel(logging.INFO)
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  sys.exit(_run(_MODE.value, _CONFIG.value, _WORKDIR.value, spec))


@cli_errors.user_errors(None)
def _run(mode: str, config, workdir: str | None, spec: str) -> int:
  # Imported here, so --help stays fast.
  from cdc_jax import compile_cache, distributed, jobs, preemption

  if workdir is None:
    workdir = jobs.default_workdir(spec)
    print(f"workdir: {workdir} (the default; --workdir=DIR chooses)")
  # Before anything touches a device; a no-op for one process.
  jobs.check_workdir(workdir, must_exist=mode != "train")
  distributed.initialize(_COORD.value, _NPROC.value, _PID.value, log=True)
  compile_cache.enable(disabled=not _CACHE.value)
  try:
    if mode == "export":
      jobs.export_job(workdir)
    elif mode == "eval":
      jobs.eval_job(config, workdir)
    else:
      jobs.train_job(config, workdir)
  except preemption.Preempted as e:
    print(f"{e} (exit status {preemption.EXIT_CODE})", file=sys.stderr)
    return preemption.EXIT_CODE
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main, flags_parser=parse_flags)
