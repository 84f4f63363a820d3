"""The main job's modes, one function each (``cdc_jax.main`` calls them).

``train``: trains, exports ``workdir/model`` and prints the held-out
report made through the real file codec. ``distill``: distils a teacher
by rounds (``cdc_jax.distill``), exports each round's student and prints
the last one's report. ``eval``: that report alone.
``export``: ``workdir/model``
from the latest checkpoint (params only; no optimizer is built).
"""

from __future__ import annotations

import logging
import os
import sys

import jax

from cdc_jax import cli_errors, files, model_dir, train
from cdc_jax.data.sources import EmbeddedSource
from cdc_jax.errors import SettingError

logger = logging.getLogger(__name__)

REPORT_DIR = "eval"  # a workdir's held-out report
TOY_NOTE = (
  "  Trained on the embedded photos only: a demonstration, not a codec; real "
  "quality needs the full configs trained on Vimeo-90k or the released "
  "weights (README, 'Released weights')."
)


@cli_errors.user_errors(None)
def run(
  mode: str,
  config,
  workdir: str | None,
  spec: str,
  processes: tuple = (None, None, None),
  compile_cache_on: bool = True,
) -> int:
  """``cdc_jax.main``'s work: ``mode`` (train, distill, eval, export; None:
  ``default_mode``) in ``workdir`` (None: ``default_workdir(spec)``,
  printed); ``processes`` = (coordinator, count, id) for multi-process
  runs. Returns the exit status: 0, 2 (a user error, one line), 75
  (preempted: rerun to resume).
  """
  from cdc_jax import compile_cache, distributed, preemption

  mode = check_mode(mode, config)
  if workdir is None:
    workdir = default_workdir(spec)
    print(f"workdir: {workdir} (the default; --workdir=DIR chooses)")
  # Before anything touches a device; a no-op for one process.
  check_workdir(workdir, must_exist=mode in ("eval", "export"))
  distributed.initialize(*processes, log=True)
  compile_cache.enable(disabled=not compile_cache_on)
  try:
    if mode == "export":
      export_job(workdir)
    elif mode == "eval":
      eval_job(config, workdir)
    elif mode == "distill":
      distill_job(config, workdir)
    else:
      train_job(config, workdir)
  except preemption.Preempted as e:
    print(f"{e} (exit status {preemption.EXIT_CODE})", file=sys.stderr)
    return preemption.EXIT_CODE
  return 0


def train_job(config, workdir: str) -> dict:
  """Trains in ``workdir``; process 0 then prints the held-out report
  (``held_out_report``)."""
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
    held_out_report(config, workdir)
  return metrics


def check_mode(mode: str | None, config) -> str:
  """The mode to run: ``mode``, or by the config (distill for one with a
  ``distill`` section, else train); SettingError where they disagree."""
  distilling = "distill" in config
  if mode is None:
    return "distill" if distilling else "train"
  if distilling and mode != "distill":
    raise SettingError(
      f"--mode={mode}: the config is a distillation config; run it with "
      "--mode=distill (the default for it); decode or evaluate its students "
      "in workdir/model_s<S> with python -m cdc_jax.codec or cdc_jax.evaluate"
    )
  if mode == "distill" and not distilling:
    raise SettingError(
      "--mode=distill needs a distillation config: "
      "--config=configs/distill.py --config.distill.teacher=PATH"
    )
  return mode


def distill_job(config, workdir: str) -> dict:
  """Distils ``config.distill.teacher`` round by round in ``workdir``;
  process 0 then prints the last student's held-out report."""
  from cdc_jax import distill

  metrics = distill.distill_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    model = os.path.join(workdir, model_dir.EXPORT_DIR)
    held_out_report(config, workdir, model)
  return metrics


def eval_job(config, workdir: str) -> dict | None:
  """``--mode=eval``: the held-out report of the workdir's latest
  checkpoint (EMA params where present, no optimizer built). Multi-process
  runs: process 0 alone writes it (None elsewhere)."""
  if jax.process_index() != 0:
    return None
  return held_out_report(config, workdir)


def held_out_report(config, workdir: str, model: str | None = None) -> dict:
  """The held-out photo through the evaluation pipeline
  (``cdc_jax.eval.pipeline``, as ``evaluate --dataset held_out``): a real
  file per ``config.eval`` setting, PSNR, MS-SSIM (LPIPS when
  ``config.diffusion.lpips_weights`` is set; FID/KID when
  ``config.eval.inception_weights`` is, not meaningful on one photo: the
  report says so) beside JPEG/WebP/AVIF at the nearest bpp; the report,
  the file and the grid in ``workdir/eval``."""
  from cdc_jax import codec
  from cdc_jax.eval import datasets, pipeline

  opts = pipeline.Options(
    steps=(config.eval.steps,),
    samplers=(config.eval.sampler,),
    gammas=(config.eval.gamma,),
    progress=config.log.progress,
    title="held-out photo",
    lpips_weights=config.diffusion.lpips_weights,
    inception_weights=config.eval.inception_weights,
    save_reconstructions=True,
  )
  # Bad weight files fail before decoding.
  lpips_fn = pipeline.lpips_of(opts)
  extractor = pipeline.inception_of(opts)
  cm = codec.load(model or workdir)
  out = os.path.join(workdir, REPORT_DIR)
  result = pipeline.evaluate(
    {"model": cm}, datasets.held_out(), out, opts, lpips_fn, extractor
  )
  print("\n".join(pipeline.summary_lines(result)))
  if config.data.name == "embedded":
    print(TOY_NOTE)
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
