"""``python -m cdc_jax.convert COMMAND ...``: the converter CLI.

::

  python -m cdc_jax.convert checkpoint CHECKPOINT.pt OUTPUT_DIR
      [--family eps|x] [--ema | --no-ema] [--overwrite]
  python -m cdc_jax.convert lpips OUTPUT.npz --backbone PTH
      [--net vgg|alex] [--lins PTH]
  python -m cdc_jax.convert inception SRC.pth OUT.npz

``checkpoint`` writes a model directory from a released CDC checkpoint;
``lpips`` and ``inception`` write the LPIPS and FID InceptionV3 weights as
an ``.npz`` that training and evaluation read without torch. A user error
(``cdc_jax.errors.UserError``: a bad weights file, an output that is not
new, empty or a model directory) is one line on stderr and exit status 2;
nothing is written then. Without a command: the usage, exit status 2.
"""

from __future__ import annotations

import argparse
import os

from cdc_jax import cli_errors, files, model_dir
from cdc_jax.convert.inception import convert_file as inception_to_npz
from cdc_jax.convert.lpips import (
  TORCHVISION_FILES,
  params_from_torch,
  save_params,
)
from cdc_jax.convert.torch_checkpoint import LPIPS_FILE, convert_file
from cdc_jax.models.inception import WEIGHTS_URLS

PROG = "python -m cdc_jax.convert"
TORCH = "Needs torch: pip install -r requirements-torch.txt"


def _checkpoint_parser(sub) -> None:
  p = sub.add_parser(
    "checkpoint",
    help="a released CDC checkpoint -> a cdc_jax model directory",
    description=(
      "Convert a released PyTorch CDC checkpoint (buggyyang/CDC_compression"
      ", eps- or x-param) into a cdc_jax model directory (model.json, "
      "params.npz, entropy_tables.npz; lpips_vgg.npz when the checkpoint "
      f"has LPIPS weights). {TORCH}"
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
  p.set_defaults(run=_checkpoint)


def _lpips_parser(sub) -> None:
  p = sub.add_parser(
    "lpips",
    help="LPIPS v0.1 weights (torchvision trunk + lpips lins) -> .npz",
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
  p.set_defaults(run=_lpips)


def _inception_parser(sub) -> None:
  p = sub.add_parser(
    "inception",
    help="the FID InceptionV3 weights (.pth) -> .npz",
    description=(
      "Write the FID InceptionV3 (pt_inception-2015-12-05) weights as an "
      ".npz for cdc_jax's FID/KID. Needs torch to read the .pth. Get the "
      f"file from {WEIGHTS_URLS[0]} or {WEIGHTS_URLS[1]} (download it "
      "yourself; nothing is fetched)."
    ),
  )
  p.add_argument("source", help="the .pth state dict (or an .npz to check)")
  p.add_argument("output", help="the .npz to write")
  p.set_defaults(run=_inception)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog=PROG,
    description=(
      "Convert PyTorch weights for cdc_jax: a released CDC checkpoint into "
      "a model directory, the LPIPS and FID InceptionV3 weights into .npz "
      f"files. {TORCH}. Each command's --help says more."
    ),
  )
  sub = p.add_subparsers(dest="command", required=True, title="commands")
  _checkpoint_parser(sub)
  _lpips_parser(sub)
  _inception_parser(sub)
  return p


def _checkpoint(args) -> int:
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


def _lpips(args) -> int:
  inputs = [args.backbone, args.lins]
  files.check_output(args.output, inputs)  # before the weights are read
  params = params_from_torch(args.backbone, args.net, args.lins)
  save_params(args.output, params, inputs)
  n = sum(v.size for v in model_dir.flatten(params).values())
  print(f"LPIPS-{args.net}: {n:,} parameters -> {args.output}")
  return 0


def _inception(args) -> int:
  n = inception_to_npz(args.source, args.output)
  print(f"InceptionV3 (FID): {n:,} values -> {args.output}")
  return 0


@cli_errors.user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
  """CLI entry; returns the exit status (2 on a user error)."""
  args = parser().parse_args(argv)
  return args.run(args)
