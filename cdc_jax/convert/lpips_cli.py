"""``python -m cdc_jax.convert.lpips_cli``: LPIPS weights -> one ``.npz``.

Writes the params of ``cdc_jax.models.lpips.LPIPS`` from a torchvision trunk
file and the lpips package's linear layers, so that evaluation needs
neither torch nor the network afterwards. An error is one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from cdc_jax import cli_errors, files, model_dir
from cdc_jax.convert.lpips import (
  TORCHVISION_FILES,
  params_from_torch,
  save_params,
)

PROG = "python -m cdc_jax.convert.lpips_cli"


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog=PROG,
    description=(
      "Write LPIPS v0.1 weights (VGG16 or AlexNet trunk) as an .npz for "
      "cdc_jax. Needs torch to read the .pth files. Trunk weights: "
      + "; ".join(f"{n}: {u}" for n, u in TORCHVISION_FILES.items())
      + " (download them yourself; nothing is fetched)."
    ),
  )
  p.add_argument("output", help="the .npz to write")
  p.add_argument("--net", choices=("vgg", "alex"), default="vgg")
  p.add_argument(
    "--backbone",
    required=True,
    help="torchvision state dict of the trunk (vgg16-397923af.pth or "
    "alexnet-owt-7be5be79.pth)",
  )
  p.add_argument(
    "--lins",
    default=None,
    help="the lpips package's linear layers, weights/v0.1/{net}.pth "
    "(default: the one inside the installed lpips package)",
  )
  return p


@cli_errors.user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
  """CLI entry; returns the exit status (2 on a weights error)."""
  args = parser().parse_args(argv)
  inputs = [args.backbone, args.lins]
  files.check_output(args.output, inputs)  # before the weights are read
  params = params_from_torch(args.backbone, args.net, args.lins)
  save_params(args.output, params, inputs)
  n = sum(v.size for v in model_dir.flatten(params).values())
  print(f"LPIPS-{args.net}: {n:,} parameters -> {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
