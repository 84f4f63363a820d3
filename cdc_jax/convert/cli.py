"""``python -m cdc_jax.convert CHECKPOINT.pt OUTPUT_DIR``: the converter CLI.

A user error (``cdc_jax.errors.UserError``: a bad checkpoint, an output
directory that is not new, empty or a model directory) is one line on
stderr and exit status 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import os

from cdc_jax import cli_errors, model_dir
from cdc_jax.convert.torch_checkpoint import LPIPS_FILE, convert_file

PROG = "python -m cdc_jax.convert"


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog=PROG,
    description=(
      "Convert a released PyTorch CDC checkpoint (buggyyang/CDC_compression"
      ", eps- or x-param) into a cdc_jax model directory (model.json, "
      "params.npz, entropy_tables.npz; lpips_vgg.npz when the checkpoint "
      "has LPIPS weights). Needs torch: pip install -r requirements-torch.txt"
    ),
  )
  p.add_argument("checkpoint", help="the .pt file")
  p.add_argument(
    "output_dir",
    help="model directory to write: new or empty (an existing model "
    "directory only with --overwrite; anything else is refused)",
  )
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace the model directory OUTPUT_DIR holds (only its model "
    "files: model.json, params.npz, entropy_tables.npz, lpips_vgg.npz)",
  )
  p.add_argument(
    "--family",
    choices=("eps", "x"),
    default=None,
    help="expected model family; detected from the keys when omitted, "
    "an error when it disagrees",
  )
  p.add_argument(
    "--ema",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="use the EMA weights (ckpt['ema'], ema_model.*) when present, "
    "as the original x-param test does; --no-ema takes ckpt['model'] "
    "(default: --ema)",
  )
  return p


@cli_errors.user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
  """CLI entry; returns the exit status (2 on a user error)."""
  args = parser().parse_args(argv)
  conv, fp = convert_file(
    args.checkpoint, args.output_dir, args.family, args.ema, args.overwrite
  )
  m, d = conv.model_config, conv.diffusion_config
  n = len(model_dir.flatten(conv.params))
  print(
    f"converted {args.checkpoint} ({conv.source} weights): family "
    f"{m['family']}, dim {m['dim']}, {n} tensors, {d['schedule']} schedule "
    f"T={d['timesteps']}"
  )
  if conv.lpips is not None:
    print(f"LPIPS-VGG weights -> {os.path.join(args.output_dir, LPIPS_FILE)}")
  print(f"wrote {args.output_dir} (fingerprint {fp[:16]})")
  return 0
