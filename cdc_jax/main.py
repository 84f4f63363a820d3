"""Entry point: train (default) or export a CDC model.

  python -m cdc_jax.main --config=configs/eps_linear.py:tiny --workdir=/tmp/cdc
  python -m cdc_jax.main --config=configs/eps_linear.py --workdir=runs/eps \
      --config.data.name=vimeo --config.data.path=/data/vimeo_septuplet
  python -m cdc_jax.main --config=... --workdir=... --mode=export

Training resumes from the latest checkpoint in --workdir. At the end it
exports ``workdir/model`` (params-only, EMA where present, with entropy
tables) and compresses a held-out photo to a real file, printing the real
and estimated bpp and the PSNR, and writing a side-by-side PNG.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Python config file (and :variant).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, logs and the exported model."
)
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "export"],
  "train: train (resuming) then report; export: write workdir/model from "
  "the latest checkpoint.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Orbax and absl are chatty at INFO; keep cdc_jax's own INFO lines.
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("cdc_jax").setLevel(logging.INFO)
  # Imported here so --help stays fast.
  from cdc_jax import checkpoint, data, train

  config = _CONFIG.value
  workdir = _WORKDIR.value
  try:
    if _MODE.value == "export":
      train.export_latest(config, workdir)
      return
    if config.data.name == "embedded" and not config.model.dim < 64:
      logging.warning(
        "training the full model on the %d embedded photos: fine as a smoke "
        "test, useless for a real model. Point it at Vimeo-90k with "
        "--config.data.name=vimeo --config.data.path=/path/to/"
        "vimeo_septuplet (with sep_trainlist.txt and sequences/).",
        len(data.EmbeddedSource()),
      )
    train.train_and_evaluate(config, workdir)
    if train.is_main_process():
      train.final_report(config, workdir)
  except (
    train.TrainingError,
    data.ImageError,
    checkpoint.ModelError,
    ValueError,
    FileNotFoundError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
  """absl's parser, with config errors (unknown keys, bad values, unknown
  variants) reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - any parse error is a user error
    # KeyError messages arrive repr-quoted with escaped newlines.
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    lines = [ln.strip(" '\"") for ln in text.splitlines() if ln.strip()]
    if "Traceback" in text:  # an exception inside the config file
      lines = lines[-1:]
    print(f"error: {': '.join(lines) or type(e).__name__}", file=sys.stderr)
    print(
      "see --help; config fields: --config.<section>.<field>=value",
      file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main, flags_parser=_parse_flags)
