"""``python -m cdc_jax.convert.inception_cli SRC.pth OUT.npz``.

Converts the FID InceptionV3 weights (torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` or pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``) once into a plain ``.npz``, so
that FID/KID need neither torch nor the network afterwards. An error is one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from cdc_jax import cli_errors
from cdc_jax.convert.inception import (
  WEIGHTS_URLS,
  convert_file,
)

PROG = "python -m cdc_jax.convert.inception_cli"


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog=PROG,
    description=(
      "Write the FID InceptionV3 (pt_inception-2015-12-05) weights as an "
      ".npz for cdc_jax's FID/KID. Needs torch to read the .pth. Get the "
      f"file from {WEIGHTS_URLS[0]} or {WEIGHTS_URLS[1]} (download it "
      "yourself; nothing is fetched)."
    ),
  )
  p.add_argument("source", help="the .pth state dict (or an .npz to check)")
  p.add_argument("output", help="the .npz to write")
  return p


@cli_errors.user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
  """CLI entry; returns the exit status (2 on a weights error)."""
  args = parser().parse_args(argv)
  n = convert_file(args.source, args.output)
  print(f"InceptionV3 (FID): {n:,} values -> {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
