"""Progressive distillation (``--mode=distill``, Salimans & Ho 2022).

A teacher (``distill.teacher``: a model directory, a converted released
checkpoint or a training workdir) decodes with DDIM on its grid of
``distill.teacher_steps``; round r trains a student, initialised from the
teacher of the round, to decode in half its teacher's steps
(``cdc_jax.distill_step``), until ``distill.target_steps``. Each round
runs ``distill.steps_per_round`` steps of training's loop
(``train.run_steps``: logging, evaluation at its end, Orbax checkpoints,
preemption), then exports its student to ``workdir/model_s<S>``; the
last is also ``workdir/model``. The next round's teacher and student
both start from the student's EMA params, with a fresh optimizer and EMA.

The Orbax state (``DistillState``) holds the round, the student's state
and its teacher, and the step counts on across rounds, so a run resumes
mid-round exactly where it stopped (the same batches: the loader is a
function of the step). A teacher that is itself a student continues its
rounds on its base grid, in its parameterisation.

A student's model.json records its decoder (``samplers.Student``: base
grid, S, parameterisation) and its teacher's bitstream fingerprint: it
decodes every file its teacher's encoder writes, in its own S steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp

from cdc_jax import (
  checkpoint,
  diffusion,
  distill_target,
  files,
  model_check,
  model_dir,
  preemption,
  samplers,
  sharding,
  train,
)
from cdc_jax.distill_step import DistillState, make_distill_step
from cdc_jax.eval import during_training
from cdc_jax.imageio import write_atomic
from cdc_jax.models.cdc import from_config, to_config
from cdc_jax.optim import make_optimizer
from cdc_jax.train_config import TrainingError, validate_config
from cdc_jax.train_state import decoding_params

logger = logging.getLogger(__name__)

# The family's own U-Net output (docs/distillation.md: a student whose
# output changes meaning did not learn it in a 500-step round).
DEFAULT_PARAMETERISATION = {"x": "x0", "eps": "eps"}
ROUNDS_JSON = "rounds.json"  # per round: S, optimizer steps, wall seconds


@dataclasses.dataclass(frozen=True)
class Plan:
  """The rounds of a run: the students, first round first."""

  teacher: model_dir.LoadedModel
  students: tuple  # samplers.Student per round
  teacher_param: str | None  # how round 0 reads its teacher (None: family)
  bitstream: str  # the teacher's bitstream fingerprint (hex)

  def export_dir(self, workdir: str, r: int) -> str:
    return os.path.join(workdir, f"model_s{self.students[r].steps}")


def _bitstream(loaded: model_dir.LoadedModel) -> str:
  from cdc_jax import codec

  return codec.from_loaded(loaded).fingerprint.hex()


def load_teacher(path: str) -> model_dir.LoadedModel:
  if not path:
    raise TrainingError(
      "distill.teacher is not set: --config.distill.teacher=PATH (a model "
      "directory, a converted released checkpoint or a training workdir)"
    )
  try:
    return model_dir.load(path)
  except model_dir.ModelError as e:
    raise TrainingError(f"distill.teacher: {e}") from None


def make_plan(config, teacher: model_dir.LoadedModel) -> Plan:
  """The rounds, from the config and the teacher; TrainingError for a
  plan that cannot be run (named field, value, what it may be)."""
  dc = config.distill
  family = teacher.model_config["family"]
  timesteps = int(teacher.diffusion_config["timesteps"])
  prior = teacher.distilled
  if prior is not None:  # a student: its grid and parameterisation go on
    base, start, teacher_param = (
      prior["base_steps"],
      prior["steps"],
      prior["parameterisation"],
    )
    param = dc.parameterisation or teacher_param
    if param != teacher_param:
      raise TrainingError(
        f"distill.parameterisation = {param!r}: the teacher is a student "
        f"in {teacher_param!r}; distil it further in the same"
      )
  else:
    base, start, teacher_param = dc.teacher_steps, dc.teacher_steps, None
    param = dc.parameterisation or DEFAULT_PARAMETERISATION[family]
  if param not in distill_target.PARAMETERISATIONS:
    raise TrainingError(
      f"distill.parameterisation = {param!r} must be one of "
      f"{', '.join(distill_target.PARAMETERISATIONS)} (or '': the family's)"
    )
  target = dc.target_steps
  if not (isinstance(base, int) and 2 <= base <= timesteps):
    raise TrainingError(
      f"distill.teacher_steps = {base!r} must be an integer in [2, {timesteps}]"
    )
  ratio = start // target if isinstance(target, int) and target >= 1 else 0
  if not ratio or start % target or ratio < 2 or ratio & (ratio - 1):
    raise TrainingError(
      f"distill.target_steps = {target!r}: the teacher decodes in {start} "
      "steps and each round halves them; use one of "
      f"{', '.join(str(start >> k) for k in range(1, start.bit_length()))}"
    )
  students = []
  s = start
  while s > target:
    s //= 2
    students.append(samplers.Student(base, s, param))
  return Plan(teacher, tuple(students), teacher_param, _bitstream(teacher))


def resolve_config(config, plan: Plan) -> None:
  """The model and diffusion sections from the teacher, and the run's
  length (rounds x steps_per_round), written into ``config``."""
  t = plan.teacher
  per = config.distill.steps_per_round
  if not isinstance(per, int) or isinstance(per, bool) or per < 1:
    raise TrainingError(
      f"distill.steps_per_round = {per!r} must be a positive integer"
    )
  with config.unlocked():
    for k, v in t.model_config.items():
      config.model[k] = tuple(v) if isinstance(v, list) else v
    config.diffusion.schedule = t.diffusion_config["schedule"]
    config.diffusion.timesteps = int(t.diffusion_config["timesteps"])
    config.train.num_steps = len(plan.students) * per


def _fresh_state(teacher_params, tx, ema: bool, step=0, round_=0):
  """Round ``round_``'s start: student = teacher = ``teacher_params``."""
  copy = lambda p: jax.tree.map(jnp.copy, p)  # distinct (donated) buffers
  return DistillState(
    jnp.asarray(step, jnp.int32),
    copy(teacher_params),
    tx.init(teacher_params),
    copy(teacher_params) if ema else None,
    copy(teacher_params),
    jnp.asarray(round_, jnp.int32),
  )


def _initial_state(config, plan: Plan, tx, manager, mesh):
  ema = config.train.ema.enabled
  params = plan.teacher.params
  abstract = jax.eval_shape(lambda: _fresh_state(params, tx, ema))
  state_sharding = sharding.replicated(mesh, abstract)
  state = checkpoint.restore_or_none(manager, abstract, state_sharding)
  if state is not None:
    return state, f"checkpoint step {int(state.step)}"
  # Each process from its own host copy, as training's init_from (a
  # device_put would compare every leaf across processes first).
  params = jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, x.__getitem__),
    params,
    state_sharding.params,
  )
  build = jax.jit(
    lambda p: _fresh_state(p, tx, ema), out_shardings=state_sharding
  )
  return build(params), plan.teacher.path


def _next_round(state: DistillState, tx, ema: bool, state_sharding):
  nxt = jax.jit(
    lambda s: _fresh_state(decoding_params(s), tx, ema, s.step, s.round + 1),
    out_shardings=state_sharding,
  )
  return nxt(state)


def export_student(plan: Plan, config, state, r: int, directory: str) -> str:
  student = plan.students[r]
  distilled = dict(student._asdict(), teacher_bitstream=plan.bitstream)
  return model_dir.export(
    directory,
    to_config(config.model),
    model_check.diffusion_config(config),
    jax.device_get(decoding_params(state)),
    source=f"distilled from {plan.teacher.path}, round {r + 1}",
    tables=plan.teacher.tables,  # the teacher's bitstream, unchanged
    overwrite=True,  # the run's own export folders
    distilled=distilled,
  )


def _check_outputs(plan: Plan, workdir: str) -> None:
  """Every folder and file the run writes, before it starts."""
  files.make_output_dir(workdir, "workdir")
  for r in range(len(plan.students)):
    model_dir.check_export_target(plan.export_dir(workdir, r), True)
  model_dir.check_export_target(
    os.path.join(workdir, model_dir.EXPORT_DIR), True
  )
  files.check_output(os.path.join(workdir, train.METRICS_JSON))
  files.check_output(os.path.join(workdir, ROUNDS_JSON))


def distill_and_evaluate(config, workdir: str) -> dict:
  """Distils ``distill.teacher`` per ``config`` in ``workdir``; returns
  the last round's final metrics."""
  plan = make_plan(config, load_teacher(config.distill.teacher))
  resolve_config(config, plan)
  validate_config(config)
  _check_outputs(plan, workdir)
  mesh = sharding.make_mesh()
  sharding.check_batch(config.train.batch_size, mesh)
  loader = train.make_checked_loader(config)
  model = from_config(config.model)
  tx = make_optimizer(config.train)
  ck = config.checkpoint
  manager = checkpoint.make_manager(workdir, ck.keep, ck.every)
  state, origin = _initial_state(config, plan, tx, manager, mesh)
  state_sharding = sharding.replicated(mesh, state)
  train.save_run_config(config, workdir)
  loader.step = int(state.step)
  rounds = " -> ".join(str(s.steps) for s in plan.students)
  logger.info(
    "distilling from %s, step %d of %d (S %d -> %s)",
    origin,
    int(state.step),
    config.train.num_steps,
    2 * plan.students[0].steps,
    rounds,
  )
  schedule = diffusion.make_schedule(
    config.diffusion.schedule, config.diffusion.timesteps
  )
  job = _Job(
    config,
    workdir,
    plan,
    model,
    tx,
    mesh,
    state_sharding,
    schedule,
    loader,
    manager,
    preemption.Watch(manager),
  )
  last: dict = {}
  try:
    with job.watch:
      for r in range(int(state.round), len(plan.students)):
        state, last = _round(job, r, state)
        if r + 1 < len(plan.students):
          ema = config.train.ema.enabled
          state = _next_round(state, tx, ema, state_sharding)
  finally:
    loader.close()
    manager.close()
  if jax.process_index() == 0:
    _finish(plan, config, state, workdir, last)
  return last


def _finish(plan: Plan, config, state, workdir: str, last: dict) -> None:
  """The last student as ``workdir/model``; the last metrics."""
  final = len(plan.students) - 1
  out = os.path.join(workdir, model_dir.EXPORT_DIR)
  export_student(plan, config, state, final, out)
  write_atomic(
    os.path.join(workdir, train.METRICS_JSON),
    json.dumps(last, indent=2).encode(),
  )


@dataclasses.dataclass
class _Job:
  """What every round of a run shares."""

  config: object
  workdir: str
  plan: Plan
  model: object
  tx: object
  mesh: object
  state_sharding: object
  schedule: diffusion.Schedule
  loader: object
  manager: object
  watch: preemption.Watch


def _round(job: _Job, r: int, state):
  """Round ``r``'s steps (from wherever ``state`` is in it), its
  evaluation and export."""
  config, plan = job.config, job.plan
  per = config.distill.steps_per_round
  student = plan.students[r]
  teacher_param = plan.teacher_param if r == 0 else student.parameterisation
  step_fn, batch_sharding = make_distill_step(
    config,
    job.model,
    job.tx,
    job.mesh,
    job.state_sharding,
    job.schedule,
    student,
    teacher_param,
    r * per,
  )
  evaluate = during_training.from_config(
    config, job.model, None, student=student
  )
  logger.info("round %d: S %d -> %d", r + 1, 2 * student.steps, student.steps)
  run = train.Run(
    config,
    job.workdir,
    step_fn,
    batch_sharding,
    job.loader,
    job.manager,
    evaluate,
    job.watch,
    end=(r + 1) * per,
  )
  start, t0 = int(state.step), time.perf_counter()
  record = functools.partial(record_round, job.workdir, r, student.steps)
  try:
    state, last = train.run_steps(run, state)
  except preemption.Preempted as e:  # what this run did of the round counts
    if jax.process_index() == 0:
      record(e.step - start, time.perf_counter() - t0)
    raise
  if jax.process_index() == 0:
    export_student(plan, config, state, r, plan.export_dir(job.workdir, r))
    record(int(state.step) - start, time.perf_counter() - t0)
  return state, last


def record_round(workdir: str, r: int, steps: int, done: int, seconds: float):
  """Adds this run's part of round ``r`` to ``workdir/rounds.json``
  (optimizer steps and wall seconds, summed over the runs of a resumed
  round; compiles included)."""
  path = os.path.join(workdir, ROUNDS_JSON)
  rounds = []
  if os.path.isfile(path):
    with open(path) as f:
      rounds = json.load(f)
  mine = [x for x in rounds if x["round"] == r + 1]
  if not mine:
    mine = [
      {"round": r + 1, "steps": steps, "optimizer_steps": 0, "seconds": 0}
    ]
    rounds.append(mine[0])
  mine[0]["optimizer_steps"] += done
  mine[0]["seconds"] += seconds
  write_atomic(path, json.dumps(rounds, indent=1).encode())
