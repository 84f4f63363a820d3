"""The main job: train (default), distil, evaluate or export a CDC model.

  python -m cdc_jax.main --config=configs/x_cosine.py:tiny
  python -m cdc_jax.main --config=configs/eps_linear.py --workdir=runs/eps \
      --config.data.name=vimeo --config.data.path=/data/vimeo_septuplet
  python -m cdc_jax.main --config=configs/distill.py \
      --config.distill.teacher=runs/eps/model --workdir=runs/eps_distill

Modes, the workdir, exit statuses (0, 2 user error, 130 Ctrl-C, 75
preempted: rerun to resume) and multi-process runs: docs/training.md and
docs/scale_out.md.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

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
  "mode",
  None,
  ["train", "distill", "eval", "export"],
  "train (resuming)|distill (resuming)|eval|export; default: distill for "
  "a config with a distill section (configs/distill.py), else train",
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
  from cdc_jax import jobs  # here, so that --help stays fast

  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  procs = (_COORD.value, _NPROC.value, _PID.value)
  sys.exit(
    jobs.run(
      _MODE.value, _CONFIG.value, _WORKDIR.value, spec, procs, _CACHE.value
    )
  )


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main, flags_parser=parse_flags)
