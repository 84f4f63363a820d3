"""The main job's modes, one function each (``cdc_jax.main`` calls them).

``train``: trains, exports ``workdir/model`` and prints the held-out
report made through the real file codec. ``export``: ``workdir/model``
from the latest checkpoint (params only; no optimizer is built).
"""

from __future__ import annotations

import logging
import os

import jax

from cdc_jax import files, model_dir, train
from cdc_jax.data.sources import HELD_OUT, EmbeddedSource
from cdc_jax.errors import SettingError
from cdc_jax.eval import held_out

logger = logging.getLogger(__name__)


def train_job(config, workdir: str) -> dict:
  """Trains in ``workdir``; process 0 then prints the held-out report."""
  if config.data.name == "embedded" and config.model.dim >= 64:
    logger.warning(
      "training the full model on the %d embedded photos: fine as a smoke "
      "test, useless for a real model. Point it at Vimeo-90k with "
      "--config.data.name=vimeo --config.data.path=/path/to/"
      "vimeo_septuplet (with sep_trainlist.txt and sequences/).",
      len(EmbeddedSource()),
    )
  metrics = train.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    rep = held_out.report(
      os.path.join(workdir, model_dir.EXPORT_DIR),
      workdir,
      config.eval.steps,
      config.eval.gamma,
      config.eval.sampler,
    )
    print(held_out.summary(rep))
  return metrics


def eval_job(config, workdir: str) -> dict:
  """Evaluates the workdir's latest checkpoint (EMA params where present,
  no optimizer built) on the held-out photo: real file, PSNR, MS-SSIM
  (LPIPS when ``config.diffusion.lpips_weights`` is set; FID/KID per
  setting when ``config.eval.inception_weights`` is, on this one photo
  NaN or not meaningful: the report says which), beside JPEG/WebP/AVIF
  at the nearest bpp; the report in workdir/eval."""
  from cdc_jax import codec
  from cdc_jax.eval import pipeline

  opts = pipeline.Options(
    steps=(config.eval.steps,),
    samplers=(config.eval.sampler,),
    gammas=(config.eval.gamma,),
    progress=config.log.progress,
    title="held-out photo",
    lpips_weights=config.diffusion.lpips_weights,
    inception_weights=config.eval.inception_weights,
  )
  # Bad weight files fail before decoding.
  lpips_fn = pipeline.lpips_of(opts)
  extractor = pipeline.inception_of(opts)
  cm = codec.load(workdir)
  out = os.path.join(workdir, "eval")
  image = [(f"{HELD_OUT} (held out)", held_out.held_out_image())]
  result = pipeline.evaluate(
    {"workdir": cm}, image, out, opts, lpips_fn, extractor
  )
  print("\n".join(pipeline.cdc_vs_baseline(result["rows"])))
  print("\n".join(pipeline.fid_lines(result) + result["notes"]))
  print(f"report: {out}")
  return result


def export_job(workdir: str) -> str | None:
  """Writes ``workdir/model`` from the latest checkpoint; returns its path.

  Multi-process runs: process 0 alone reads and writes (None elsewhere).
  """
  if jax.process_index() != 0:
    return None
  out = model_dir.export_workdir(workdir)
  print(f"exported {out}")
  return out


def default_workdir(config_spec: str) -> str:
  """The workdir of a run without ``--workdir``: ``runs/<config file
  stem>[_<variant>]`` (``configs/x_cosine.py:tiny`` -> ``runs/x_cosine_tiny``;
  ``...:tiny,steps=3`` -> ``runs/x_cosine_tiny_steps3``)."""
  path, _, variant = config_spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  tag = "".join(c if c.isalnum() else "_" for c in variant.replace("=", ""))
  return os.path.join("runs", f"{name}_{tag}" if tag else name)


def check_workdir(workdir: str, must_exist: bool = False) -> None:
  """Rejects, before any work, a workdir that is a bucket URL
  (``gs://...``), a file, a dangling link or a link loop; with
  ``must_exist`` (eval, export) also one that does not exist.

  Checkpoints, TensorBoard events, exports and reports are written with
  local file APIs; a bucket is used through a gcsfuse mount instead.

  Raises:
    SettingError: the URL; WriteError: the rest.
  """
  scheme, sep, _ = workdir.partition("://")
  if sep and scheme.isalnum():
    raise SettingError(
      f"--workdir={workdir}: {scheme}:// workdirs are not supported "
      "(checkpoints, logs and exports use local file APIs); mount the "
      "bucket with gcsfuse and pass the mount path, see launch/tpu_pod.sh"
    )
  if must_exist and not os.path.lexists(workdir):
    raise SettingError(
      f"--workdir={workdir}: no such folder; name the workdir of a training run"
    )
  if os.path.lexists(workdir):
    files.make_output_dir(workdir, "workdir")
