"""Tests of cdc_jax.train: schedules, EMA, the data-parallel step, the loop.

Compiles dominate the cost, so one tiny x-family config (``TRAIN``) is
shared by every test that runs the real step: the 8-device step compiled
by the ``tiny`` fixture is the same program ``train_and_evaluate`` builds,
and the persistent compile cache (tests/conftest.py) serves it again.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cdc_jax import checkpoint, data, train
from cdc_jax.models.cdc import CDC
from cdc_jax.train import TrainingError
from configs import common, x_cosine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The shared tiny training config (x family: EMA and clipping on). The lr
# steps down and lambda switches at step 5, so a resumed run's schedules
# are visible in its metrics. Adam's eps is 1e-5, not 1e-8: with 1e-8,
# elements whose gradient nearly cancels (|g| ~ 1e-9) get +-lr updates
# decided by rounding noise, and 1- and 8-device runs (different reduction
# orders) then differ by up to ~0.3 lr after two steps.
TRAIN = dict(
  batch_size=8,
  lr=2e-3,
  eps=1e-5,
  lr_schedule="paper",
  lr_decay_every=5,
  lr_decay=0.8,
  lr_min=1.6e-3,
  warmup_steps=5,
  seed=0,
)


def _config(**train_overrides) -> ml_collections.ConfigDict:
  c = x_cosine.get_config("tiny")
  c.unlock()
  c.train.update({**TRAIN, **train_overrides})
  c.log.progress = False
  c.log.log_every = 1
  c.log.eval_every = 10**6
  return c


def _tc(**kw) -> ml_collections.ConfigDict:
  tc = common.base_config().train
  tc.update(kw)
  return tc


# -- (a) learning-rate schedules (spec §7.2) ----------------------------------


def test_lr_paper_staircase():
  sched = train.lr_schedule(
    _tc(lr_schedule="paper", lr=5e-5, lr_decay=0.8, lr_min=2e-5)
  )
  steps = [0, 99_999, 100_000, 199_999, 250_000, 10**6]
  want = [5e-5, 5e-5, 4e-5, 4e-5, 5e-5 * 0.8**2, 2e-5]
  got = [float(sched(jnp.int32(s))) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_lr_released_eps_numbers():
  sched = train.lr_schedule(
    _tc(lr_schedule="released", lr=4e-5, lr_decay=0.9, lr_min=2e-5)
  )
  lr = lambda s: float(sched(jnp.int32(s)))
  np.testing.assert_allclose(lr(0), 4e-5, rtol=1e-6)
  np.testing.assert_allclose(lr(99_999), 4e-5, rtol=1e-6)
  np.testing.assert_allclose(lr(100_000), 4e-5 * 0.9, rtol=1e-6)
  np.testing.assert_allclose(lr(100_001), 4e-5 * 0.81, rtol=1e-6)
  # Still above the floor at 100005, at it from 100006 on (spec §7.2).
  np.testing.assert_allclose(lr(100_005), 4e-5 * 0.9**6, rtol=1e-6)
  assert lr(100_005) > 2e-5
  for s in (100_006, 100_007, 500_000, 10**6):
    np.testing.assert_allclose(lr(s), 2e-5, rtol=1e-6)


def test_lr_released_x_numbers():
  sched = train.lr_schedule(
    _tc(lr_schedule="released", lr=5e-5, lr_decay=0.8, lr_min=1e-5)
  )
  assert float(sched(jnp.int32(100_006))) > 1e-5 * 1.01
  np.testing.assert_allclose(float(sched(jnp.int32(100_007))), 1e-5, rtol=1e-6)


def test_lr_schedule_unknown_name():
  with pytest.raises(ValueError, match="lr_schedule"):
    train.lr_schedule(_tc(lr_schedule="cosine"))


# -- (b) lambda schedule ------------------------------------------------------


def test_lambda_schedule():
  sched = train.lambda_schedule(_tc(lam=0.0032, warmup_steps=700_000))
  lam = lambda s: float(sched(jnp.int32(s)))
  np.testing.assert_allclose([lam(0), lam(699_999)], 1e-6, rtol=1e-6)
  np.testing.assert_allclose([lam(700_000), lam(10**6)], 0.0032, rtol=1e-6)


# -- (c) EMA (spec §7.3) ------------------------------------------------------


def test_ema_decay_values():
  ec = common.base_config().train.ema
  d = lambda s: float(train.ema_decay(jnp.int32(s), ec))
  assert d(0) == 0.0 and d(100) == 0.0
  np.testing.assert_allclose(d(110), 1 - 11**-0.75, rtol=1e-6)
  np.testing.assert_allclose(d(110), 0.8344, atol=1e-4)
  np.testing.assert_allclose(d(200), 1 - 101**-0.75, rtol=1e-6)
  np.testing.assert_allclose(d(10**6), 0.999, rtol=1e-7)  # capped at beta


def test_ema_update_copies_skips_and_lerps():
  ec = common.base_config().train.ema  # every 10, after step 100
  ema = {"w": jnp.zeros(3), "b": {"c": jnp.full(2, 4.0)}}
  params = {"w": jnp.ones(3), "b": {"c": jnp.full(2, 2.0)}}

  def upd(step):
    return jax.tree.map(
      np.asarray, train.ema_update(ema, params, jnp.int32(step), ec)
    )

  for step in (0, 50, 100):  # copies up to update_after_step
    out = upd(step)
    np.testing.assert_array_equal(out["w"], 1.0)
    np.testing.assert_array_equal(out["b"]["c"], 2.0)
  for step in (55, 105, 111):  # not a multiple of update_every
    out = upd(step)
    np.testing.assert_array_equal(out["w"], 0.0)
    np.testing.assert_array_equal(out["b"]["c"], 4.0)
  out = upd(110)  # first lerp: ema + (1 - d)(p - ema), 1 - d = 11^-0.75
  np.testing.assert_allclose(out["w"], 11**-0.75, rtol=1e-6)
  np.testing.assert_allclose(out["b"]["c"], 4.0 - 2.0 * 11**-0.75, rtol=1e-6)


# -- (h) config validation and batch checks -----------------------------------


def test_validate_config():
  c = _config()
  train.validate_config(c)
  c.diffusion.aux_weight = 0.9
  with pytest.raises(TrainingError, match="aux_weight"):
    train.validate_config(c)
  c = _config()
  c.data.crop_size = 96
  with pytest.raises(TrainingError, match="multiple of 64"):
    train.validate_config(c)


def test_check_batch():
  mesh = train.make_mesh()
  assert mesh.devices.size == 8  # tests/conftest.py
  train.check_batch(8, mesh)
  train.check_batch(16, mesh)
  with pytest.raises(TrainingError) as e:
    train.check_batch(6, mesh)
  msg = str(e.value)
  assert "batch_size=6" in msg and "8 devices" in msg
  assert "--config.train.batch_size=8" in msg
  train.check_batch(6, train.make_mesh(jax.devices()[:2]))


# -- the real step (shared compile) -------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  """The shared config, a host copy of its initial state, the 8-device
  step, and two batches: 8 different crops, and one crop 8 times."""
  config = _config()
  model = train.make_model(config)
  tx = train.make_optimizer(config.train)
  state = train.init_state(config, model, tx, jax.random.key(0))
  host = jax.device_get(state)
  mesh = train.make_mesh()
  step, batch_sharding = train.make_train_step(
    config, model, tx, mesh, train.replicated(mesh, host)
  )
  loader = data.Loader(data.EmbeddedSource(), 8, 64, seed=0)
  crops = loader.batch_at(0)
  img = dict(data.embedded_images())["astronaut"]
  one = np.repeat(img[None, 200:264, 200:264], 8, axis=0)
  return dict(
    config=config,
    model=model,
    tx=tx,
    host=host,
    mesh=mesh,
    step=step,
    batch_sharding=batch_sharding,
    crops=crops,
    one=one,
  )


def _run(step, batch_sharding, mesh, host_state, batch, n):
  """n steps from a fresh device copy of host_state (the step donates)."""
  state = jax.device_put(host_state, train.replicated(mesh, host_state))
  batch = jax.device_put(batch, batch_sharding)
  metrics = []
  for _ in range(n):
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def test_one_device_equals_eight_devices(tiny):
  t = tiny
  run8 = (t["step"], t["batch_sharding"], t["mesh"])
  st8, m8 = _run(*run8, t["host"], t["crops"], 2)
  mesh1 = train.make_mesh(jax.devices()[:1])
  step1, bs1 = train.make_train_step(
    t["config"], t["model"], t["tx"], mesh1, train.replicated(mesh1, t["host"])
  )
  st1, m1 = _run(step1, bs1, mesh1, t["host"], t["crops"], 2)
  assert int(st1.step) == int(st8.step) == 2
  for a, b in zip(m1, m8, strict=True):
    for k in ("loss", "diffusion_loss", "bpp", "extra_loss", "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for name in ("params", "ema_params", "opt_state"):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      getattr(st1, name),
      getattr(st8, name),
    )
  # The step moved the params (the comparison is not vacuous).
  moved = jax.tree.map(
    lambda a, b: np.abs(a - b).max(), st8.params, t["host"].params
  )
  assert max(jax.tree.leaves(moved)) > 1e-3


def test_tiny_model_overfits_one_crop(tiny):
  # Checked locally with seeds 0, 1, 2 (init and step): first-10 / last-10
  # ratios 6.9, 5.3 and 19 after 36 steps.
  t = tiny
  _, ms = _run(
    t["step"], t["batch_sharding"], t["mesh"], t["host"], t["one"], 40
  )
  loss = np.array([float(m["diffusion_loss"]) for m in ms])
  assert np.all(np.isfinite(loss))
  first, last = loss[:10].mean(), loss[-10:].mean()
  assert first > 3 * last, (first, last, loss.round(4).tolist())
  # Schedules seen by the step: lr steps down and lambda switches at 5.
  lrs = [float(m["lr"]) for m in ms]
  lams = [float(m["lam"]) for m in ms]
  np.testing.assert_allclose(lrs[:5], 2e-3, rtol=1e-6)
  np.testing.assert_allclose(lrs[5:], 1.6e-3, rtol=1e-6)
  np.testing.assert_allclose(lams[:5], 1e-6, rtol=1e-6)
  np.testing.assert_allclose(lams[5:], 0.0032, rtol=1e-6)


# -- (f) train_and_evaluate, resume -------------------------------------------


def _loop_config(num_steps):
  c = _config()
  c.train.num_steps = num_steps
  c.log.checkpoint_every = 2
  c.log.keep_checkpoints = 5
  return c


def _spy_steps(monkeypatch):
  """Records state.step at every call of the loop's step function."""
  seen = []
  real = train.make_train_step

  def spy(*args, **kwargs):
    fn, batch_sharding = real(*args, **kwargs)

    def wrapped(state, batch):
      seen.append(int(state.step))
      return fn(state, batch)

    return wrapped, batch_sharding

  monkeypatch.setattr(train, "make_train_step", spy)
  return seen


def _tree_equal(a, b):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b
  )


def test_train_and_evaluate_resume(tiny, tmp_path, monkeypatch):
  seen = _spy_steps(monkeypatch)
  work = str(tmp_path / "run")
  first = train.train_and_evaluate(_loop_config(4), work)
  assert seen == [0, 1, 2, 3]
  assert first["lr"] == pytest.approx(2e-3)
  assert first["lam"] == pytest.approx(1e-6)
  assert math.isfinite(first["eval_psnr"]) and first["eval_bpp"] > 0
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "4"]

  seen.clear()
  resumed = train.train_and_evaluate(_loop_config(6), work)
  assert seen == [4, 5]  # continues at step 4
  tc = _loop_config(6).train
  np.testing.assert_allclose(
    resumed["lr"], float(train.lr_schedule(tc)(5)), rtol=1e-6
  )
  assert resumed["lr"] == pytest.approx(1.6e-3)
  assert resumed["lam"] == pytest.approx(float(train.lambda_schedule(tc)(5)))
  assert resumed["lam"] == pytest.approx(0.0032)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == [
    "2",
    "4",
    "6",
  ]
  final = train._restore_latest(_loop_config(6), work)
  assert int(final.step) == 6
  assert float(final.lam) == pytest.approx(0.0032)

  # Files: config, TensorBoard events, metrics, the exported model.
  with open(os.path.join(work, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == 6
  assert any(
    n.startswith("events.out.tfevents")
    for n in os.listdir(os.path.join(work, "tb"))
  )
  with open(os.path.join(work, "metrics.json")) as f:
    assert json.load(f)["loss"] == pytest.approx(resumed["loss"])
  model_dir = os.path.join(work, "model")
  for name in ("model.json", "params.npz", "entropy_tables.npz"):
    assert os.path.isfile(os.path.join(model_dir, name)), name
  loaded = checkpoint.load_model(model_dir)
  assert loaded.model_config["family"] == "x"
  assert loaded.tables is not None
  _tree_equal(loaded.params, final.ema_params)  # EMA weights exported

  # Steps 4 and 5 redone from checkpoint 4 with the same program and the
  # loader's batches 4 and 5 (a pure function of the step) end in the
  # same state: the resumed run neither replays nor skips anything.
  t = tiny
  at4 = _restore(work, 4, t)
  assert int(at4.step) == 4
  loader = data.Loader(data.EmbeddedSource(), 8, 64, seed=tc.seed)
  state = jax.device_put(at4, train.replicated(t["mesh"], at4))
  for k in (4, 5):
    batch = jax.device_put(loader.batch_at(k), t["batch_sharding"])
    state, m = t["step"](state, batch)
  assert float(m["loss"]) == pytest.approx(resumed["loss"], rel=1e-6)
  state6 = jax.device_get(state)
  _tree_equal(state6.params, final.params)
  _tree_equal(state6.ema_params, final.ema_params)
  _tree_equal(state6.opt_state, final.opt_state)


def _restore(workdir, step, t):
  import orbax.checkpoint as ocp

  abstract = jax.eval_shape(lambda: t["host"])
  manager = checkpoint.make_manager(workdir, 5, 2)
  try:
    out = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  finally:
    manager.close()
  return jax.device_get(out)


# -- (g) non-finite loss ------------------------------------------------------


def test_nan_loss_names_the_step(tiny, tmp_path):
  """A diverged checkpoint (NaN params) at step 7: the real step's loss is
  NaN and the loop stops with a TrainingError naming the step."""
  t = tiny
  work = str(tmp_path / "nan")
  bad = t["host"].replace(
    step=np.int32(7),
    params=jax.tree.map(lambda a: np.full_like(a, np.nan), t["host"].params),
  )
  manager = checkpoint.make_manager(work, 3, 1)
  manager.save(7, args=train._save_args(bad))
  manager.wait_until_finished()
  manager.close()
  config = _loop_config(10)
  with pytest.raises(TrainingError, match="step 7") as e:
    train.train_and_evaluate(config, work)
  assert "nan" in str(e.value).lower()
  assert not os.path.exists(os.path.join(work, "model"))


# -- (i) the command line -----------------------------------------------------


@pytest.mark.parametrize(
  "override,expect",
  [
    ("--config.diffusion.aux_weight=0.9", "aux_weight"),
    ("--config.train.lr=abc", "lr"),
    ("--config.train.lrr=1", "lrr"),
    ("--config=configs/eps_linear.py:tinyy", "tinyy"),
  ],
  ids=["aux_weight", "not_a_number", "misspelled_key", "unknown_variant"],
)
def test_main_user_error_is_one_line(tmp_path, override, expect):
  cmd = [
    sys.executable,
    "-m",
    "cdc_jax.main",
    "--config=configs/eps_linear.py:tiny",
    f"--workdir={tmp_path / 'w'}",
    override,
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  res = subprocess.run(
    cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert res.returncode != 0
  assert "Traceback" not in res.stderr, res.stderr
  lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
  errors = [ln for ln in lines if "error" in ln.lower()]
  assert len(errors) == 1 and expect in errors[0], res.stderr


def test_rate_noise_shapes_follow_the_model():
  # y and z widths differ when hyper_dims_mults does not end in the last
  # context mult; the train step's rate noise must match both.
  model = CDC(family="eps", dim=4, hyper_dims_mults=(2, 2, 2))
  x = jnp.zeros((1, 64, 128, 3))
  out = jax.eval_shape(
    lambda: model.init_with_output(
      jax.random.key(0), x, method=CDC.compress_context
    )[0]
  )
  y_ch, z_ch = train.latent_channels(model)
  assert out["q_latent"].shape == (1, 4, 8, y_ch)
  assert out["q_hyper_latent"].shape == (1, 1, 2, z_ch)
  assert y_ch != z_ch
