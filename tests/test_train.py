"""The training loop: resume, checkpoints, exports, the NaN guard, config
validation. The step itself is tested in test_train_step.py."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
import tiny_training

from cdc_jax import checkpoint, model_dir, optim, sharding, train, train_config
from cdc_jax.data.loader import Loader
from cdc_jax.data.sources import EmbeddedSource
from cdc_jax.train_config import TrainingError


@pytest.fixture(scope="module")
def tiny():
  return tiny_training.build()


def test_validate_config():
  c = tiny_training.config()
  train_config.validate_config(c)
  c.diffusion.aux_weight = 0.9
  with pytest.raises(TrainingError, match="aux_weight"):
    train_config.validate_config(c)
  c = tiny_training.config()
  c.data.crop_size = 96
  with pytest.raises(TrainingError, match="multiple of 64"):
    train_config.validate_config(c)


def _loop_config(num_steps):
  c = tiny_training.config()
  c.train.num_steps = num_steps
  c.checkpoint.every = 2
  c.checkpoint.keep = 5
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
    resumed["lr"], float(optim.lr_schedule(tc)(5)), rtol=1e-6
  )
  assert resumed["lr"] == pytest.approx(1.6e-3)
  assert resumed["lam"] == pytest.approx(float(optim.lambda_schedule(tc)(5)))
  assert resumed["lam"] == pytest.approx(0.0032)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == [
    "2",
    "4",
    "6",
  ]
  assert checkpoint.latest_step(work) == 6

  # Files: config, TensorBoard events, metrics, the exported model.
  with open(os.path.join(work, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == 6
  assert any(
    n.startswith("events.out.tfevents")
    for n in os.listdir(os.path.join(work, "tb"))
  )
  with open(os.path.join(work, "metrics.json")) as f:
    assert json.load(f)["loss"] == pytest.approx(resumed["loss"])
  exported = os.path.join(work, "model")
  for name in ("model.json", "params.npz", "entropy_tables.npz"):
    assert os.path.isfile(os.path.join(exported, name)), name
  loaded = model_dir.load(exported)
  assert loaded.model_config["family"] == "x"
  assert loaded.tables is not None

  # Steps 4 and 5 redone from checkpoint 4 with the same program and the
  # loader's batches 4 and 5 (a pure function of the step) give the
  # resumed run's last loss and its exported EMA params: the resumed run
  # neither replays nor skips anything.
  t = tiny
  at4 = _restore(work, 4, t)
  assert int(at4.step) == 4
  loader = Loader(EmbeddedSource(), 8, 64, seed=tc.seed)
  state = jax.device_put(at4, sharding.replicated(t["mesh"], at4))
  for k in (4, 5):
    batch = jax.device_put(loader.batch_at(k), t["batch_sharding"])
    state, m = t["step"](state, batch)
  assert float(m["loss"]) == pytest.approx(resumed["loss"], rel=1e-6)
  state6 = jax.device_get(state)
  assert float(state6.lam) == pytest.approx(0.0032)
  # The exported model holds the EMA params of step 6 (one restore of
  # step 6 would cost as much as the rest of the test).
  _tree_equal(loaded.params, state6.ema_params)


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
  import orbax.checkpoint as ocp

  """A diverged checkpoint (NaN params) at step 7: the real step's loss is
  NaN and the loop stops with a TrainingError naming the step."""
  t = tiny
  work = str(tmp_path / "nan")
  bad = t["host"].replace(
    step=np.int32(7),
    params=jax.tree.map(lambda a: np.full_like(a, np.nan), t["host"].params),
  )
  manager = checkpoint.make_manager(work, 3, 1)
  manager.save(7, args=ocp.args.StandardSave(bad))
  manager.wait_until_finished()
  manager.close()
  config = _loop_config(10)
  with pytest.raises(TrainingError, match="step 7") as e:
    train.train_and_evaluate(config, work)
  assert "nan" in str(e.value).lower()
  assert not os.path.exists(os.path.join(work, "model"))
