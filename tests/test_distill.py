"""Progressive distillation: the grids of a round, the job's resume, and
students decoding their teachers' files (and no others) through the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from cdc_jax import (
  diffusion,
  distill,
  distill_step,
  model_dir,
  preemption,
  samplers,
)
from cdc_jax.models.cdc import from_config
from configs import distill as distill_config

SCHEDULES = {"eps": ("linear", 20000), "x": ("cosine", 8193)}


@pytest.mark.parametrize("family", ["eps", "x"])
@pytest.mark.parametrize("base,steps", [(8, 4), (8, 2), (64, 1)])
def test_a_rounds_teacher_steps_are_its_teachers_decode_steps(
  family, base, steps
):
  """The two teacher steps of every student point are steps of the
  teacher's own decode (the DDIM decode on the base grid for round one):
  same abar pairs and time inputs, and the student's points are every
  other point of its teacher's."""
  schedule = diffusion.make_schedule(*SCHEDULES[family])
  student = samplers.Student(base, steps, "x0")
  teacher = samplers.Student(base, 2 * steps, "x0")
  r = distill_step.round_tables(schedule, family, student)
  if 2 * steps == base:  # the original teacher: its DDIM decode
    t = samplers.tables(schedule, base, family, "ddim")
    t_abar, t_next, t_time = t.abar, t.abar_prev, t.time
  else:
    t = samplers.student_tables(schedule, family, teacher)
    t_abar, t_next, t_time = t.abar, t.abar_next, t.time
  np.testing.assert_array_equal(r.abar, t_abar[0::2])
  np.testing.assert_array_equal(r.abar_mid, t_abar[1::2])
  np.testing.assert_array_equal(r.abar_mid, t_next[0::2])
  np.testing.assert_array_equal(r.abar_next, t_next[1::2])
  np.testing.assert_array_equal(r.time, t_time[0::2])
  np.testing.assert_array_equal(r.time_mid, t_time[1::2])
  s = samplers.student_tables(schedule, family, student)
  np.testing.assert_array_equal(s.abar, r.abar)
  np.testing.assert_array_equal(s.abar_next, r.abar_next)
  assert s.abar_next[-1] == 1.0 and s.abar[0] == t_abar[0]  # T-1 .. x_0


def test_student_positions_keep_every_other_point():
  assert list(samplers.student_positions(8, 4)) == [7, 5, 3, 1]
  assert list(samplers.student_positions(8, 2)) == [7, 3]
  assert list(samplers.student_positions(8, 1)) == [7]
  with pytest.raises(ValueError):
    samplers.student_positions(8, 3)


# -- the job -------------------------------------------------------------------


def _config(teacher: str, **distill_fields):
  c = distill_config.get_config("tiny")
  c.unlock()
  c.distill.update(
    dict(teacher=teacher, teacher_steps=4, target_steps=2, steps_per_round=4)
  )
  c.distill.update(distill_fields)
  c.train.batch_size = 8  # the 8 test devices
  c.log.progress = False
  c.log.every = 1
  c.checkpoint.every = 100
  c.eval.size = 64
  return c


@pytest.fixture(scope="module")
def shallow_teacher(tmp_path_factory):
  """A tiny x model with a two-level U-Net (the distillation step traces
  three U-Nets and a backward pass: fewer levels, a faster test)."""
  from cdc_jax import testing

  config = dict(testing.TINY_MODELS["x"], dim_mults=[1, 2])
  model = from_config(config)
  params = testing.random_params(model, 0)
  calib = testing.photo("chelsea", (128, 128))
  params = testing.calibrate_entropy_model(model, params, calib)
  path = str(tmp_path_factory.mktemp("shallow") / "x")
  model_dir.export(path, config, testing.DIFFUSIONS["x"], params)
  return path


def _preempt_at(monkeypatch, steps):
  """A preemption notice as the loop reaches each step in ``steps``."""
  pending = set(steps)

  def reached(self, step):
    if step in pending:
      pending.discard(step)
      return True
    return False

  monkeypatch.setattr(preemption.Watch, "reached", reached)


def _params(path):
  return model_dir.flatten(model_dir.load(path).params)


def _straight_through(config, teacher_path: str):
  """The run's EMA params after all its steps, stepped by hand from the
  job's initial state with the job's jitted step and batches: no
  checkpoint, no preemption."""
  import jax

  from cdc_jax import diffusion as diff
  from cdc_jax import sharding
  from cdc_jax.data.pipeline import make_loader
  from cdc_jax.models.cdc import from_config
  from cdc_jax.optim import make_optimizer

  plan = distill.make_plan(config, distill.load_teacher(teacher_path))
  distill.resolve_config(config, plan)
  model, tx = from_config(config.model), make_optimizer(config.train)
  mesh = sharding.make_mesh()
  ema = config.train.ema.enabled
  build = lambda p: distill._fresh_state(p, tx, ema)
  abstract = jax.eval_shape(build, plan.teacher.params)
  state_sharding = sharding.replicated(mesh, abstract)
  state = jax.jit(build, out_shardings=state_sharding)(plan.teacher.params)
  schedule = diff.make_schedule(
    config.diffusion.schedule, config.diffusion.timesteps
  )
  (student,) = plan.students
  step, batch_sharding = distill_step.make_distill_step(
    config, model, tx, mesh, state_sharding, schedule, student, None, 0
  )
  loader = make_loader(config, 0, 1)
  for k in range(config.train.num_steps):
    batch = sharding.global_batch(loader.batch_at(k), batch_sharding)
    state, _ = step(state, batch)
  return model_dir.flatten(jax.device_get(state.ema_params))


def test_resume_mid_round_is_bit_identical(
  shallow_teacher, tmp_path, monkeypatch
):
  """Preempted mid-round and rerun, a run exports the student of the same
  steps taken straight through, bit for bit; the entropy model stays the
  teacher's (its params bit-identical: the same bitstream fingerprint)."""
  cut = str(tmp_path / "cut")
  _preempt_at(monkeypatch, {2})
  with pytest.raises(preemption.Preempted):
    distill.distill_and_evaluate(_config(shallow_teacher), cut)
  assert not os.path.exists(os.path.join(cut, "model"))
  assert sorted(os.listdir(os.path.join(cut, "checkpoints"))) == ["2"]
  metrics = distill.distill_and_evaluate(_config(shallow_teacher), cut)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["eval_psnr"])
  with open(os.path.join(cut, "rounds.json")) as f:
    (r,) = json.load(f)
  assert r["optimizer_steps"] == 4 and r["steps"] == 2  # both runs' parts

  a = _straight_through(_config(shallow_teacher), shallow_teacher)
  b = _params(os.path.join(cut, "model"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  teacher = _params(shallow_teacher)
  moved = [k for k in a if not np.array_equal(a[k], teacher[k])]
  assert moved and all(k.startswith("denoise_fn/") for k in moved), moved
  with pytest.raises(model_dir.ModelError, match="a distillation workdir"):
    model_dir.load(cut)  # its checkpoints are not a model to decode with
  with open(os.path.join(cut, "model", "model.json")) as f:
    meta = json.load(f)
  assert (
    meta["distilled"]["steps"] == 2 and meta["distilled"]["base_steps"] == 4
  )
  assert meta["distilled"]["parameterisation"] == "x0"


def test_plan_errors_name_the_field(x_model_path, tmp_path):
  teacher = model_dir.load(x_model_path)
  for fields, words in [
    (dict(target_steps=3), "distill.target_steps = 3"),
    (dict(teacher_steps=1), "distill.teacher_steps = 1"),
    (dict(parameterisation="w"), "distill.parameterisation = 'w'"),
  ]:
    with pytest.raises(distill.TrainingError, match=words):
      distill.make_plan(_config(x_model_path, **fields), teacher)
  with pytest.raises(distill.TrainingError, match="distill.teacher"):
    distill.load_teacher(str(tmp_path / "missing"))
  plan = distill.make_plan(_config(x_model_path, teacher_steps=64), teacher)
  assert [s.steps for s in plan.students] == [32, 16, 8, 4, 2]


# -- students decode their teachers' files ----------------------------------


def _student_dir(teacher_path: str, out: str, perturb_entropy=False) -> str:
  """A student model directory of the teacher (its params with a moved
  U-Net, as a round would leave them), exported as the job does."""
  from cdc_jax import codec

  loaded = model_dir.load(teacher_path)
  flat = model_dir.flatten(loaded.params)
  for k in flat:
    if k.startswith("denoise_fn/") or (perturb_entropy and "enc_" in k):
      flat[k] = flat[k] * np.float32(1.01)
  bits = codec.from_loaded(loaded).fingerprint.hex()
  model_dir.export(
    out,
    loaded.model_config,
    loaded.diffusion_config,
    model_dir.unflatten(flat),
    tables=loaded.tables,
    distilled=dict(
      base_steps=4, steps=2, parameterisation="x0", teacher_bitstream=bits
    ),
  )
  return out


def _cli(*args):
  from cdc_jax.codec import cli

  return cli.main(list(args))


def test_a_teachers_file_decodes_with_its_student(
  x_model_path, tiny_models, tmp_path, capsys
):
  from cdc_jax import codec, imageio, testing

  student = _student_dir(x_model_path, str(tmp_path / "student"))
  img = testing.photo("astronaut", (64, 64))
  src = str(tmp_path / "photo.png")
  imageio.save_png(src, img)
  f = str(tmp_path / "photo.cdcj")
  assert _cli("compress", "--model", x_model_path, src, f, "--steps", "8") == 0
  out_s, out_t = str(tmp_path / "s.png"), str(tmp_path / "t.png")
  assert _cli("decompress", "--model", student, f, out_s) == 0
  assert _cli("decompress", "--model", x_model_path, f, out_t) == 0
  by_student = imageio.load_image(out_s)
  assert not np.array_equal(by_student, imageio.load_image(out_t))
  # The student's own two steps, not the file's eight DDIM steps.
  cm = codec.load(student)
  assert cm.student == samplers.Student(4, 2, "x0")
  with open(f, "rb") as fh:
    np.testing.assert_array_equal(codec.decompress(cm, fh.read()), by_student)

  other = str(tmp_path / "other")
  testing.export_tiny(other, "x", seed=5)
  g = str(tmp_path / "other.cdcj")
  assert _cli("compress", "--model", other, src, g) == 0
  capsys.readouterr()
  assert _cli("decompress", "--model", student, g, str(tmp_path / "o.png")) == 2
  assert "made with another model" in capsys.readouterr().err


def test_a_student_with_another_entropy_model_is_refused(
  x_model_path, tmp_path
):
  from cdc_jax import codec

  path = _student_dir(x_model_path, str(tmp_path / "s"), perturb_entropy=True)
  with pytest.raises(
    codec.CodecError, match="entropy model is not its teacher"
  ):
    codec.load(path)


def test_model_json_distilled_section_is_checked(x_model_path, tmp_path):
  path = str(tmp_path / "s")
  shutil.copytree(_student_dir(x_model_path, str(tmp_path / "s0")), path)
  meta_path = os.path.join(path, "model.json")
  with open(meta_path) as f:
    meta = json.load(f)
  for bad, words in [
    (dict(steps=3), "must divide base_steps"),
    (dict(steps=4), "not a power of two"),
    (dict(parameterisation="w"), "parameterisation"),
    (dict(teacher_bitstream="xyz"), "32 hex digits"),
  ]:
    m = json.loads(json.dumps(meta))
    m["distilled"].update(bad)
    with open(meta_path, "w") as f:
      json.dump(m, f)
    with pytest.raises(model_dir.ModelError, match=words):
      model_dir.load(path)
