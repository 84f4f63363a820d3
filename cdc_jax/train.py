"""The training loop: restore or initialise, step, log, checkpoint, export.

Initialisation order: the latest complete checkpoint in
``workdir/checkpoints``, else ``train.init_from`` (a model directory or a
training workdir), else from scratch. The step itself lives in
``train_step`` (pure, jitted over the mesh); this file only drives it.

Every ``log.every`` steps the metrics go to TensorBoard (``workdir/tb``)
and the progress bar; every ``eval.every`` steps the held-out photo is
reconstructed and logged; every ``checkpoint.every`` steps and at the end
Orbax saves the state. A non-finite loss is checked one step late (no
per-step device stall) and always before a save or an evaluation. At the
end, ``workdir/model`` is exported (decoding params, entropy tables) and
the final metrics written to ``workdir/metrics.json``. Only process 0
writes logs, reports and the model; every process takes part in saves.

A preemption notice (``cdc_jax.preemption``) makes every process save the
current step and raise ``Preempted``; a rerun resumes there exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np

from cdc_jax import (
  checkpoint,
  files,
  model_check,
  model_dir,
  preemption,
  sharding,
)
from cdc_jax.data.pipeline import BatchIterator, make_loader
from cdc_jax.eval import during_training
from cdc_jax.imageio import write_atomic
from cdc_jax.models import lpips
from cdc_jax.models.cdc import CDC, from_config, to_config
from cdc_jax.optim import make_optimizer
from cdc_jax.train_config import TrainingError, validate_config
from cdc_jax.train_state import TrainState, decoding_params, from_params
from cdc_jax.train_state import init_state as fresh_state
from cdc_jax.train_step import make_train_step

logger = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"


def export(config, state: TrainState, directory: str, source: str) -> str:
  """Writes a model directory from a train state; returns its fingerprint."""
  return model_dir.export(
    directory,
    to_config(config.model),
    model_check.diffusion_config(config),
    jax.device_get(decoding_params(state)),
    source=source,
    overwrite=True,  # the run's own export folder
  )


def _init_rng(config):
  return jax.random.fold_in(jax.random.key(config.train.seed), 0xC0DEC)


def _from_init_from(config, model: CDC, tx, state_sharding) -> TrainState:
  """A step-0 state around the params of ``train.init_from``."""
  path = config.train.init_from
  loaded = model_dir.load(path)
  abstract = jax.eval_shape(
    lambda: fresh_state(model, tx, _init_rng(config), False)
  )
  want = jax.tree.map(lambda a: a.shape, abstract.params)
  got = jax.tree.map(np.shape, loaded.params)
  if want != got:
    raise TrainingError(
      f"{path}: its parameters do not fit this config's model "
      "(different family or sizes); use the matching config"
    )
  ema = config.train.ema.enabled
  params = loaded.params
  if state_sharding is not None:  # each process from its own host copy
    # (device_put would compare every leaf across processes first)
    params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, x.__getitem__),
      params,
      state_sharding.params,
    )
  build = jax.jit(
    lambda p: from_params(p, tx.init(p), ema), out_shardings=state_sharding
  )
  return build(params)


def initial_state(
  config, model: CDC, tx, manager, mesh=None
) -> tuple[TrainState, str]:
  """(state, where it came from): checkpoint, init_from, or scratch;
  created or restored replicated over ``mesh`` (no later ``device_put``,
  which compares every leaf across processes)."""
  ema = config.train.ema.enabled
  abstract = jax.eval_shape(
    lambda: fresh_state(model, tx, _init_rng(config), ema)
  )
  state_sharding = None if mesh is None else sharding.replicated(mesh, abstract)
  state = checkpoint.restore_or_none(manager, abstract, state_sharding)
  if state is not None:
    return state, f"checkpoint step {int(state.step)}"
  if config.train.init_from:
    return _from_init_from(config, model, tx, state_sharding), (
      config.train.init_from
    )
  # The key is made inside the jit: nothing crosses processes.
  init = jax.jit(
    lambda: fresh_state(model, tx, _init_rng(config), ema),
    out_shardings=state_sharding,
  )
  return init(), "scratch"


@dataclasses.dataclass
class _Outputs:
  """Process 0's writers (None elsewhere)."""

  writer: Any = None
  bar: Any = None

  def close(self):
    for x in (self.bar, self.writer):
      if x is not None:
        x.close()


def _open_outputs(config, workdir: str, start: int) -> _Outputs:
  if jax.process_index() != 0:
    return _Outputs()
  from tensorboardX import SummaryWriter

  out = _Outputs(writer=SummaryWriter(os.path.join(workdir, "tb")))
  if config.log.progress:
    from tqdm import tqdm

    out.bar = tqdm(
      total=config.train.num_steps, initial=start, dynamic_ncols=True
    )
  return out


def save_run_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    payload = config.to_json_best_effort(indent=2).encode()
    write_atomic(os.path.join(workdir, model_dir.WORKDIR_CONFIG), payload)


def _check_finite(pending, manager) -> None:
  """Raises if the loss of ``pending = (step, loss)`` is not finite."""
  if pending is None:
    return
  step, loss = pending
  loss = float(loss)
  if not math.isfinite(loss):
    raise TrainingError(
      f"loss became {loss} at step {step}; last checkpoint: "
      f"{manager.latest_step()}. Lower train.lr or check the data."
    )


def _log(metrics, done: int, rate: float, out: _Outputs) -> dict:
  last = {k: float(v) for k, v in jax.device_get(metrics).items()}
  last["steps_per_sec"] = rate
  if out.writer is not None:
    for k, v in last.items():
      out.writer.add_scalar(f"train/{k}", v, done)
  shown = {"loss": ".4f", "bpp": ".3f", "lam": ".2g"}  # those a job has
  shown = {k: f for k, f in shown.items() if k in last}
  if out.bar is not None:
    out.bar.set_postfix(
      **{k: format(last[k], f) for k, f in shown.items()}, sps=f"{rate:.2f}"
    )
  elif out.writer is not None:  # process 0 without a bar: one line
    keys = (*shown, "steps_per_sec")
    logger.info(
      "step %d: %s", done, ", ".join(f"{k} {last[k]:.4g}" for k in keys)
    )
  return last


@dataclasses.dataclass
class Run:
  """What the loop drives: the jitted step, its input, saves and evals."""

  config: Any
  workdir: str
  step_fn: Any
  batch_sharding: Any
  loader: BatchIterator
  manager: Any
  evaluate: during_training.SetEvaluator
  watch: preemption.Watch
  end: int = 0  # the step to stop at (0: train.num_steps)


def run_steps(run: Run, state):
  """Runs steps ``state.step .. run.end``; returns (state, last metrics).
  The loop of every job (training, each distillation round): log,
  evaluate, checkpoint, preemption. ``state``: a TrainState or any struct
  with its step, params and ema_params (``distill_step.DistillState``)
  that ``run.step_fn`` advances.

  Raises:
    preemption.Preempted: after a preemption notice, once every process
      has saved (and finalised) the checkpoint of the step it names.
  """
  import orbax.checkpoint as ocp

  config, manager = run.config, run.manager
  num_steps, last, pending = run.end or config.train.num_steps, {}, None
  start = int(state.step)
  out = _open_outputs(config, run.workdir, start)
  t0, n0 = time.time(), start
  try:
    for step in range(start, num_steps):
      batch = sharding.global_batch(next(run.loader), run.batch_sharding)
      state, metrics = run.step_fn(state, batch)
      # The previous step's loss is ready by now: checking it does not
      # stall the device, which already runs this step.
      _check_finite(pending, manager)
      pending, done = (step, metrics["loss"]), step + 1
      # Asked at every step on every process (JAX's sync point needs it).
      stop = done < num_steps and run.watch.reached(done)
      is_ckpt = stop or done % config.checkpoint.every == 0
      is_ckpt = is_ckpt or done == num_steps
      is_eval = done % config.eval.every == 0 or done == num_steps
      is_eval = is_eval and not stop
      if is_ckpt or is_eval:
        _check_finite(pending, manager)  # never save or show a NaN state
      if done % config.log.every == 0 or done == num_steps:
        rate = (done - n0) / max(time.time() - t0, 1e-9)
        t0, n0 = time.time(), done
        last = _log(metrics, done, rate, out)
      if out.bar is not None:
        out.bar.update(1)
      if is_ckpt:
        saved = ocp.args.StandardSave(checkpoint.savable(state))
        manager.save(done, args=saved, force=True)
      if stop:
        manager.wait_until_finished()
        raise preemption.Preempted(done, str(manager.directory))
      if is_eval:
        params = decoding_params(state)
        last.update(run.evaluate.log(params, done, out.writer))
  finally:
    out.close()
    manager.wait_until_finished()
  return state, last


def _load_lpips(config):
  """The frozen LPIPS params of ``diffusion.lpips_weights`` (None when
  unset), read once for the rho > 0 loss term and the held-out
  evaluation; LPIPS-VGG when rho > 0, any trunk otherwise."""
  dc = config.diffusion
  if not dc.lpips_weights:
    return None
  try:
    return lpips.load(dc.lpips_weights, "vgg" if dc.aux_weight else None)
  except lpips.LPIPSWeightsError as e:
    raise TrainingError(f"--config.diffusion.lpips_weights: {e}") from None


def make_checked_loader(config) -> BatchIterator:
  """This process's loader; fails here, before the model is built, when
  the data holds no usable image (one decode on a healthy dataset)."""
  loader = make_loader(config, jax.process_index(), jax.process_count())
  loader.require_usable()
  return loader


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per ``config`` in ``workdir``; returns the final metrics."""
  validate_config(config)
  files.make_output_dir(workdir, "workdir")
  # The outputs a run writes at its end, checked before it starts.
  model_dir.check_export_target(
    os.path.join(workdir, model_dir.EXPORT_DIR), True
  )
  files.check_output(os.path.join(workdir, METRICS_JSON))
  mesh = sharding.make_mesh()
  sharding.check_batch(config.train.batch_size, mesh)
  loader = make_checked_loader(config)
  model = from_config(config.model)
  tx = make_optimizer(config.train)
  ck = config.checkpoint
  manager = checkpoint.make_manager(workdir, ck.keep, ck.every)
  state, origin = initial_state(config, model, tx, manager, mesh)
  state_sharding = sharding.replicated(mesh, state)
  save_run_config(config, workdir)
  lpips_params = _load_lpips(config)
  step_fn, batch_sharding = make_train_step(
    config, model, tx, mesh, state_sharding, lpips_params
  )
  loader.step = start = int(state.step)  # before the first batch
  logger.info(
    "training from %s, step %d of %d", origin, start, config.train.num_steps
  )
  evaluate = during_training.from_config(config, model, lpips_params)
  watch = preemption.Watch(manager)
  run = Run(
    config, workdir, step_fn, batch_sharding, loader, manager, evaluate, watch
  )
  try:
    with watch:
      state, last = run_steps(run, state)
  finally:
    loader.close()
    manager.close()
  if jax.process_index() == 0:
    done = int(state.step)
    source = f"trained in {workdir} to step {done}"
    export(config, state, os.path.join(workdir, model_dir.EXPORT_DIR), source)
    payload = json.dumps(last, indent=2).encode()
    write_atomic(os.path.join(workdir, METRICS_JSON), payload)
  return last
