"""Training: state, optimizer, schedules, the jitted step, and the loop.

The step is a pure function ``train_step(state, batch) -> (state,
metrics)``, jitted over a device ``Mesh`` with a ``data`` axis: params and
optimizer state are replicated, the batch is split over devices, the state
is donated. Randomness is ``fold_in(seed, step)``, so a resumed run needs no
stored RNG and a step gives the same result on 1 or 8 devices.

Loss (spec §6.2): ``lam(step) * mean(bpp) + diffusion_loss + extra_loss``
where the diffusion loss is L1 on eps (family ``eps``) or the
min(SNR, 5)-weighted L2 on x0 (family ``x``), and the extra loss trains the
hyperprior's medians (its gradient only reaches them).

Initialisation order (``train_and_evaluate``): the latest complete
checkpoint in ``workdir/checkpoints``, else ``train.init_from`` (a model
directory), else from scratch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cdc_jax import checkpoint, data, diffusion, metrics
from cdc_jax.models import cdc as cdc_lib
from cdc_jax.models.cdc import CDC
from cdc_jax.sample import Sampler, initial_noise

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, bad configuration)."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off
  lam: jax.Array  # lambda(step) of the last step, for logs and checkpoints


# -- schedules ----------------------------------------------------------------


def lr_schedule(tc: ml_collections.ConfigDict) -> optax.Schedule:
  """The paper's staircase, or the released code's effective schedule."""
  lr, decay, every, floor = tc.lr, tc.lr_decay, tc.lr_decay_every, tc.lr_min

  if tc.lr_schedule == "paper":

    def sched(step):
      k = jnp.floor_divide(step, every)
      return jnp.maximum(lr * decay ** k.astype(jnp.float32), floor)

  elif tc.lr_schedule == "released":

    def sched(step):
      e = jnp.maximum(step - every + 1, 0).astype(jnp.float32)
      return jnp.maximum(lr * decay**e, floor)

  else:
    raise ValueError(
      f"train.lr_schedule must be 'paper' or 'released', got {tc.lr_schedule!r}"
    )
  return sched


def lambda_schedule(tc: ml_collections.ConfigDict) -> optax.Schedule:
  """Rate weight: ``warmup_lambda`` for ``warmup_steps``, then ``lam``.

  The original needs two runs for this (spec §7.5); here it is one run.
  """
  return optax.join_schedules(
    [
      optax.constant_schedule(tc.warmup_lambda),
      optax.constant_schedule(tc.lam),
    ],
    [tc.warmup_steps],
  )


def make_optimizer(tc: ml_collections.ConfigDict):
  parts = []
  if tc.grad_clip:
    parts.append(optax.clip_by_global_norm(tc.grad_clip))
  parts.append(optax.adam(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps))
  return optax.chain(*parts)


def ema_decay(step, ec: ml_collections.ConfigDict):
  """ema_pytorch 0.2.3's decay at update counter ``step`` (spec §7.3)."""
  n = step + 1
  e = jnp.maximum(n - ec.update_after_step - 1, 0).astype(jnp.float32)
  d = 1.0 - (1.0 + e) ** (-ec.power)
  return jnp.clip(d, 0.0, ec.beta)


def ema_update(ema, params, step, ec: ml_collections.ConfigDict):
  """Every ``update_every`` steps: copy until ``update_after_step``, lerp."""
  d = ema_decay(step, ec)
  copy = step <= ec.update_after_step
  active = (step % ec.update_every) == 0

  def upd(e, p):
    lerp = e + (1.0 - d) * (p - e)
    new = jnp.where(copy, p, lerp)
    return jnp.where(active, new, e)

  return jax.tree.map(upd, ema, params)


# -- model and loss -----------------------------------------------------------


def make_model(config) -> CDC:
  return cdc_lib.from_config(dict(config.model))


def make_schedule(config) -> diffusion.Schedule:
  return diffusion.make_schedule(
    config.diffusion.schedule, config.diffusion.timesteps
  )


def loss_fn(params, model: CDC, sched_arrays, x0, t, noise, rate_noise, lam):
  """Total loss and metrics for images x0 [B,H,W,3] in [-1, 1].

  ``t`` [B] int training indices, ``noise`` like x0, ``rate_noise`` the
  (u_z, u_y) uniform noise of the rate term; all explicit so parity tests
  can inject the original's draws. Gradients of the total equal the
  original's ``loss.backward(); extra_loss.backward()``.
  """
  sqrt_abar, sqrt_1m_abar, snr = sched_arrays
  variables = {"params": params}
  ctx = model.apply(
    variables,
    x0,
    train=True,
    rate_noise=rate_noise,
    method=CDC.compress_context,
  )
  x_t = diffusion.q_sample(x0, sqrt_abar[t], sqrt_1m_abar[t], noise)
  timesteps = sqrt_abar.shape[0]
  time = (t.astype(jnp.float32) / timesteps)[:, None]
  out = model.apply(variables, x_t, time, ctx["output"], method=CDC.denoise)
  if model.family == "eps":
    diff = diffusion.eps_l1_loss(noise, out)
  else:
    diff = diffusion.x0_weighted_l2_loss(x0, out, diffusion.loss_weight(snr[t]))
  bpp = jnp.mean(ctx["bpp"])
  loss = lam * bpp + diff
  extra = model.apply(variables, method=CDC.extra_loss)
  return loss + extra, {
    "loss": loss,
    "bpp": bpp,
    "diffusion_loss": diff,
    "extra_loss": extra,
  }


def train_step(
  state: TrainState, batch, *, model, tx, config, sched_arrays, rng
):
  """One optimisation step on a uint8 batch [B,H,W,3] (global)."""
  tc = config.train
  x0 = batch.astype(jnp.float32) / 255.0 * 2.0 - 1.0
  b, h, w, _ = x0.shape
  timesteps = sched_arrays[0].shape[0]
  kt, kz, ky, kn = jax.random.split(jax.random.fold_in(rng, state.step), 4)
  t = jax.random.randint(kt, (b,), 0, timesteps)
  y_ch, z_ch = latent_channels(model)
  zshape = (b, h // 64, w // 64, z_ch)
  yshape = (b, h // 16, w // 16, y_ch)
  rate_noise = (
    jax.random.uniform(kz, zshape, jnp.float32, -0.5, 0.5),
    jax.random.uniform(ky, yshape, jnp.float32, -0.5, 0.5),
  )
  noise = jax.random.normal(kn, x0.shape, jnp.float32)
  lam = jnp.asarray(lambda_schedule(tc)(state.step), jnp.float32)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, aux), grads = grad_fn(
    state.params, model, sched_arrays, x0, t, noise, rate_noise, lam
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = ema_update(ema, params, state.step, tc.ema)
  aux = dict(aux)
  aux["lam"] = lam
  aux["lr"] = lr_schedule(tc)(state.step)
  aux["grad_norm"] = optax.tree.norm(grads)
  new = TrainState(state.step + 1, params, opt_state, ema, lam)
  new = jax.tree.map(_keep_dtype, new, state)
  return new, aux


def _keep_dtype(new, old):
  # Keeps the step signature fixed (no weak types), so jit compiles once.
  return jnp.asarray(new, old.dtype)


def latent_channels(model: CDC) -> tuple[int, int]:
  """Channels of y (last g_a stage) and of z (last h_a stage)."""
  return (
    model.dim * model.context_dim_mults[-1],
    model.dim * model.hyper_dims_mults[-1],
  )


def init_state(config, model: CDC, tx, rng) -> TrainState:
  """A fresh state; one jitted init (eager init of 50M params dispatches
  thousands of small ops, minutes on a GPU)."""

  @jax.jit
  def init(rng):
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    params = model.init(rng, x, jnp.zeros((1, 1)))["params"]
    return params, tx.init(params)

  params, opt_state = init(rng)
  # A copy, not the same arrays: the jitted step donates the state, and
  # donating one buffer twice crashes the runtime.
  ema = jax.tree.map(jnp.copy, params) if config.train.ema.enabled else None
  return TrainState(
    jnp.zeros((), jnp.int32),
    params,
    opt_state,
    ema,
    jnp.zeros((), jnp.float32),
  )


# -- data parallelism ---------------------------------------------------------


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), ("data",))


def check_batch(global_batch: int, mesh: Mesh):
  n = mesh.devices.size
  if global_batch % n:
    raise TrainingError(
      f"train.batch_size={global_batch} is not divisible by the {n} devices; "
      f"use a multiple of {n} (e.g. --config.train.batch_size="
      f"{max(n, global_batch // n * n)})"
    )
  if global_batch % jax.process_count():
    raise TrainingError(
      f"train.batch_size={global_batch} is not divisible by the "
      f"{jax.process_count()} processes"
    )


def make_train_step(config, model, tx, mesh: Mesh, state_sharding):
  """The jitted, data-parallel step."""
  sched = make_schedule(config)
  sched_arrays = (
    jnp.asarray(sched.sqrt_alphas_cumprod),
    jnp.asarray(sched.sqrt_one_minus_alphas_cumprod),
    jnp.asarray(sched.snr),
  )
  rng = jax.random.key(config.train.seed)
  step = functools.partial(
    train_step,
    model=model,
    tx=tx,
    config=config,
    sched_arrays=sched_arrays,
    rng=rng,
  )
  batch_sharding = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  return jax.jit(
    step,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, repl),
    donate_argnums=0,
  ), batch_sharding


def replicated(mesh: Mesh, tree):
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


# -- the loop -----------------------------------------------------------------


def validate_config(config):
  if config.diffusion.aux_weight:
    raise TrainingError(
      "diffusion.aux_weight (rho) > 0 needs the LPIPS-VGG loss, which is "
      "not available yet; set --config.diffusion.aux_weight=0"
    )
  if config.data.crop_size % 64:
    raise TrainingError(
      f"data.crop_size={config.data.crop_size} must be a multiple of 64 "
      "(the model downsamples by 64)"
    )


def _held_out_image(size: int) -> np.ndarray:
  """The embedded held-out photo, center-cropped to a 64-multiple square."""
  name = data.HELD_OUT
  img = dict(data.embedded_images())[name]
  h, w, _ = img.shape
  s = min(size, h // 64 * 64, w // 64 * 64)
  top, left = (h - s) // 2, (w - s) // 2
  return img[top : top + s, left : left + s]


def reconstruct(sampler, params, img_u8, steps, gamma, seed=0):
  """(reconstruction uint8, estimated bpp, PSNR) of one uint8 image."""
  x = jnp.asarray(metrics.to_float(img_u8))[None]
  x_init = initial_noise(seed, x.shape, gamma)
  rec, bpp = sampler.reconstruct(params, x, x_init, steps)
  rec_u8 = metrics.to_uint8(rec[0])
  return rec_u8, float(bpp[0]), metrics.psnr(img_u8, rec_u8)


def export_params(config, state: TrainState):
  """Params for decoding: the EMA copy where present."""
  return state.ema_params if state.ema_params is not None else state.params


def export(config, state, directory: str, source: str = "") -> str:
  from cdc_jax import codec  # codec imports train helpers lazily

  params = jax.device_get(export_params(config, state))
  model = make_model(config)
  tables = codec.build_entropy_tables(model, params)
  return checkpoint.export_model(
    directory,
    model_config=model_config_dict(config),
    diffusion_config={
      "schedule": config.diffusion.schedule,
      "timesteps": int(config.diffusion.timesteps),
    },
    params=params,
    tables=tables,
    source=source,
  )


def model_config_dict(config) -> dict:
  out = {}
  for k, v in dict(config.model).items():
    out[k] = list(v) if isinstance(v, tuple) else v
  return out


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per ``config``; returns the final metrics. Only process 0 writes."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = make_mesh()
  tc = config.train
  check_batch(tc.batch_size, mesh)

  model = make_model(config)
  tx = make_optimizer(tc)
  init_rng = jax.random.fold_in(jax.random.key(tc.seed), 0xC0DEC)
  abstract = jax.eval_shape(lambda: init_state(config, model, tx, init_rng))
  state_sharding = replicated(mesh, abstract)

  manager = checkpoint.make_manager(
    workdir, config.log.keep_checkpoints, config.log.checkpoint_every
  )
  state = checkpoint.restore_or_none(manager, abstract)
  if state is not None:
    logger.info("resumed from %s at step %d", workdir, int(state.step))
    origin = f"checkpoint step {int(state.step)}"
  else:
    state = init_state(config, model, tx, init_rng)
    origin = "scratch"
    if tc.init_from:
      loaded = checkpoint.load_model(tc.init_from)
      params = jax.tree.map(jnp.asarray, loaded.params)
      want = jax.tree.map(jnp.shape, state.params)
      got = jax.tree.map(jnp.shape, params)
      if want != got:
        raise TrainingError(
          f"{tc.init_from}: its parameters do not fit this config's model "
          "(different family or sizes); use the matching config"
        )
      ema = None
      if state.ema_params is not None:
        ema = jax.tree.map(jnp.copy, params)  # distinct buffers (donation)
      state = TrainState(state.step, params, tx.init(params), ema, state.lam)
      origin = f"init_from {tc.init_from}"
  state = jax.device_put(state, state_sharding)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  step_fn, batch_sharding = make_train_step(
    config, model, tx, mesh, state_sharding
  )
  source = data.make_source(config.data)
  per_process = tc.batch_size // jax.process_count()
  start = int(state.step)
  loader = data.Loader(
    source,
    per_process,
    config.data.crop_size,
    seed=tc.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    start_step=start,
  )
  writer = None
  if is_main:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(os.path.join(workdir, "tb"))
  sampler = Sampler(model, make_schedule(config))
  held_out = _held_out_image(config.log.eval_size)

  bar = None
  if is_main and config.log.progress:
    from tqdm import tqdm

    bar = tqdm(total=tc.num_steps, initial=start, dynamic_ncols=True)
  logger.info("training from %s, step %d of %d", origin, start, tc.num_steps)
  last = {}
  t0, n0 = time.time(), start
  try:
    pending = None  # (step, loss on device): checked one step late
    for step in range(start, tc.num_steps):
      local = next(loader)
      batch = jax.make_array_from_process_local_data(batch_sharding, local)
      state, m = step_fn(state, batch)
      # The previous step's loss is ready by now: checking it does not
      # stall the device, which already runs this step.
      _check_finite(pending, manager)
      pending = (step, m["loss"])
      done = step + 1
      is_ckpt = done % config.log.checkpoint_every == 0 or done == tc.num_steps
      if is_ckpt or done % config.log.eval_every == 0:
        _check_finite(pending, manager)  # never save or show a NaN state
      if done % config.log.log_every == 0 or done == tc.num_steps:
        last = {k: float(v) for k, v in jax.device_get(m).items()}
        rate = (done - n0) / max(time.time() - t0, 1e-9)
        t0, n0 = time.time(), done
        last["steps_per_sec"] = rate
        if writer is not None:
          for k, v in last.items():
            writer.add_scalar(f"train/{k}", v, done)
        if bar is not None:
          bar.set_postfix(
            loss=f"{last['loss']:.4f}",
            bpp=f"{last['bpp']:.3f}",
            lam=f"{last['lam']:.2g}",
            sps=f"{rate:.2f}",
          )
      if bar is not None:
        bar.update(1)
      if is_ckpt:
        manager.save(done, args=_save_args(state), force=True)
      if done % config.log.eval_every == 0 or done == tc.num_steps:
        rec, bpp, psnr = reconstruct(
          sampler,
          export_params(config, state),
          held_out,
          config.log.eval_steps,
          config.log.eval_gamma,
        )
        last.update(eval_bpp=bpp, eval_psnr=psnr)
        if writer is not None:
          writer.add_scalar("eval/bpp", bpp, done)
          writer.add_scalar("eval/psnr", psnr, done)
          writer.add_image(
            "eval/original_vs_reconstruction",
            np.concatenate([held_out, rec], axis=1),
            done,
            dataformats="HWC",
          )
  finally:
    loader.close()
    if bar is not None:
      bar.close()
    manager.wait_until_finished()
    if writer is not None:
      writer.close()

  if is_main:
    export(
      config,
      state,
      os.path.join(workdir, "model"),
      source=f"trained in {workdir} to step {int(state.step)}",
    )
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(last, f, indent=2)
  return last


def _check_finite(pending, manager):
  if pending is None:
    return
  step, loss = pending
  loss = float(loss)
  if not math.isfinite(loss):
    raise TrainingError(
      f"loss became {loss} at step {step}; last checkpoint: "
      f"{manager.latest_step()}. Lower train.lr or check the data."
    )


def _save_args(state):
  import orbax.checkpoint as ocp

  return ocp.args.StandardSave(state)


def is_main_process() -> bool:
  return jax.process_index() == 0


def _restore_latest(config, workdir: str):
  model = make_model(config)
  tx = make_optimizer(config.train)
  rng = jax.random.key(0)
  abstract = jax.eval_shape(lambda: init_state(config, model, tx, rng))
  manager = checkpoint.make_manager(
    workdir, config.log.keep_checkpoints, config.log.checkpoint_every
  )
  try:
    return checkpoint.restore_or_none(manager, abstract)
  finally:
    manager.close()


def restore_export_params(config, workdir: str):
  """The decoding params (EMA where present) of the latest checkpoint."""
  state = _restore_latest(config, workdir)
  return None if state is None else export_params(config, state)


def export_latest(config, workdir: str) -> str:
  """``--mode=export``: workdir/model from the latest checkpoint."""
  state = _restore_latest(config, workdir)
  if state is None:
    raise TrainingError(f"{workdir}: no complete checkpoint to export")
  out = os.path.join(workdir, "model")
  export(
    config,
    state,
    out,
    source=f"exported from {workdir} at step {int(state.step)}",
  )
  print(f"exported {out} (step {int(state.step)})")
  return out


def final_report(config, workdir: str) -> dict:
  """Compresses the held-out photo with the exported model to a real file.

  Prints real and estimated bpp and PSNR; writes ``held_out.cdcj`` and a
  side-by-side ``reconstruction.png`` (original | decoded) in workdir.
  """
  from cdc_jax import codec

  cm = codec.load(os.path.join(workdir, "model"))
  name = data.HELD_OUT
  img = dict(data.embedded_images())[name]
  res = codec.compress_image(
    cm, img, steps=config.log.eval_steps, gamma=config.log.eval_gamma
  )
  path = os.path.join(workdir, "held_out.cdcj")
  codec._write_atomic(path, res.data)
  rec = codec.decompress(cm, res.data)
  psnr = metrics.psnr(img, rec)
  side = os.path.join(workdir, "reconstruction.png")
  codec._write_atomic(side, image=np.concatenate([img, rec], axis=1))
  report = {
    "image": f"{name} {img.shape[0]}x{img.shape[1]} (held out)",
    "file_bytes": len(res.data),
    "bpp": res.bpp,
    "estimated_bpp": res.estimated_bpp,
    "psnr_db": psnr,
    "decode_steps": config.log.eval_steps,
  }
  print(
    f"held-out '{name}' ({img.shape[1]}x{img.shape[0]}): {len(res.data)} "
    f"bytes = {res.bpp:.4f} bpp (estimate {res.estimated_bpp:.4f}), "
    f"PSNR {psnr:.2f} dB, {config.log.eval_steps} DDIM steps\n"
    f"  file: {path}\n  side by side: {side}"
  )
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report
