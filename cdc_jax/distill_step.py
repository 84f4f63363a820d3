"""One progressive-distillation step: pure, jitted data-parallel as training.

A round teaches the student to do in one DDIM step what its teacher does
in two (``cdc_jax.distill_target``). Per example of a uint8 batch: a
student grid point j (uniform), x_t = alpha_j x0 + sigma_j eps from the
forward process, two teacher steps j -> mid -> next on the teacher's
grid (``RoundTables``), the x0 that takes x_t there in one step, and the
student's x0 (its output read in its parameterisation) against it with
the truncated-SNR weight max(SNR_j, 1): ``mean(w * mean((x0_s - x0~)^2))``.

Frozen: the entropy model (g_a, h_a, h_s, priors; the student's context
comes from the teacher's y_hat, its entropy params get no gradient and
Adam leaves them bit-identical, so the student writes and reads the
teacher's bitstream) and, unless ``distill.train_context``, g_s (the
student then uses the teacher's context maps). The teacher reads its
output as its family's DDIM decode does (``teacher_param`` None: x
clipped, eps derived) or, from the second round on, as the student it
was (its parameterisation, unclipped).

The optimiser update, EMA and step counter are training's
(``train_step.apply_gradients``); randomness is ``fold_in(seed, step)``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdc_jax import distill_target, samplers, sharding
from cdc_jax.models.cdc import CDC
from cdc_jax.optim import lr_schedule
from cdc_jax.train_step import apply_gradients


@flax.struct.dataclass
class DistillState:
  """The student's training state, its teacher and the round: one pytree,
  checkpointed whole (a resumed run needs the teacher of its round)."""

  step: jax.Array
  params: Any  # the student's
  opt_state: Any
  ema_params: Any  # None when EMA is off
  teacher: Any  # the teacher's params
  round: jax.Array  # 0 = distilling the original teacher


class RoundTables(NamedTuple):
  """Per student grid point (first step first) of a round: the point, the
  teacher's midpoint and the student's next point (abar 1 after the last),
  with the U-Net time inputs at the first two."""

  abar: np.ndarray
  abar_mid: np.ndarray
  abar_next: np.ndarray
  time: np.ndarray
  time_mid: np.ndarray


def round_tables(schedule, family: str, student: samplers.Student):
  """The tables of the round that makes ``student`` from its teacher at
  twice its S, on the same base grid."""
  base = samplers.ddim_tables(schedule, student.base_steps, family)
  pos = samplers.student_positions(student.base_steps, student.steps)
  half = student.base_steps // student.steps // 2
  mid = pos - half
  nxt = pos - 2 * half
  one = np.float32(1.0)
  return RoundTables(
    base.abar[pos],
    base.abar[mid],
    np.where(nxt >= 0, base.abar[np.maximum(nxt, 0)], one).astype(np.float32),
    base.time[pos],
    base.time[mid],
  )


def _x0(out, x, abar, param: str | None, family: str):
  if param is None:
    return distill_target.teacher_x0(out, x, abar, family)
  return distill_target.from_output(x, out, abar, param)


def distill_loss(
  params,
  teacher,
  model: CDC,
  x0,
  j,
  noise,
  tables: RoundTables,
  param: str,
  teacher_param: str | None,
  train_context: bool,
):
  """Loss and metrics of the student ``params`` at grid points ``j`` [B]."""
  b = x0.shape[0]
  abar, abar_mid, abar_next = (
    a[j].reshape(b, 1, 1, 1)
    for a in (tables.abar, tables.abar_mid, tables.abar_next)
  )
  time, time_mid = tables.time[j][:, None], tables.time_mid[j][:, None]
  apply = lambda p, *a, method: model.apply({"params": p}, *a, method=method)
  ctx = jax.lax.stop_gradient(apply(teacher, x0, method=CDC.context_model))
  x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise

  def teacher_x0(x, t, a):
    out = apply(teacher, x, t, ctx["context"], method=CDC.denoise)
    return _x0(out, x, a, teacher_param, model.family)

  x_mid = distill_target.ddim_from_x0(
    x_t, teacher_x0(x_t, time, abar), abar, abar_mid
  )
  x_next = distill_target.ddim_from_x0(
    x_mid, teacher_x0(x_mid, time_mid, abar_mid), abar_mid, abar_next
  )
  target = jax.lax.stop_gradient(
    distill_target.target_x0(x_t, x_next, abar, abar_next)
  )
  context = ctx["context"]
  if train_context:
    context = apply(params, ctx["y_hat"], method=CDC.g_s)
  out = apply(params, x_t, time, context, method=CDC.denoise)
  x0_student = distill_target.from_output(x_t, out, abar, param)
  weight = distill_target.weight(abar).reshape(b)
  per = jnp.mean(jnp.square(x0_student - target), axis=(1, 2, 3))
  loss = jnp.mean(weight * per)
  return loss, {"loss": loss, "x0_mse": jnp.mean(per)}


def distill_step(
  state: DistillState,
  batch,
  *,
  model,
  tx,
  config,
  tables: RoundTables,
  rng,
  param: str,
  teacher_param: str | None,
  round_start: int,
):
  """One student update on a uint8 batch [B,H,W,3] (global)."""
  x0 = batch.astype(jnp.float32) / 255.0 * 2.0 - 1.0
  kj, kn = jax.random.split(jax.random.fold_in(rng, state.step))
  j = jax.random.randint(kj, (x0.shape[0],), 0, tables.abar.shape[0])
  noise = jax.random.normal(kn, x0.shape, jnp.float32)
  grad_fn = jax.value_and_grad(distill_loss, has_aux=True)
  (_, metrics), grads = grad_fn(
    state.params,
    state.teacher,
    model,
    x0,
    j,
    noise,
    tables,
    param,
    teacher_param,
    config.distill.train_context,
  )
  tc = config.train
  # EMA counts from the round's start: each round's average begins anew.
  new = apply_gradients(state, grads, tx, tc.ema, state.step - round_start)
  metrics = dict(metrics)
  metrics["lr"] = lr_schedule(tc)(state.step)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return new, metrics


def make_distill_step(
  config,
  model,
  tx,
  mesh,
  state_sharding,
  schedule,
  student: samplers.Student,
  teacher_param: str | None,
  round_start: int,
):
  """The jitted, data-parallel ``step(state, batch)`` of the round that
  makes ``student`` (a ``samplers.Student``), and the batch's sharding."""
  tables = round_tables(schedule, model.family, student)
  step = functools.partial(
    distill_step,
    model=model,
    tx=tx,
    config=config,
    tables=RoundTables(*(jnp.asarray(a) for a in tables)),
    rng=jax.random.key(config.train.seed),
    param=student.parameterisation,
    teacher_param=teacher_param,
    round_start=round_start,
  )
  batch_sharding = sharding.batch_sharding(mesh)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(
    step,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, repl),
    donate_argnums=0,
  )
  return jitted, batch_sharding
