"""Damaged checkpoints: readers (the codec, evaluation, export) fall back
to the newest intact step with a warning naming the damaged one; a resume
stops with one line naming the folder to move aside; a checkpoint of
another model is named by the first parameter that differs. Readers do
not print Orbax's notes about read-only managers.
"""

import glob
import json
import logging
import os
import shutil
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cdc_jax import checkpoint, model_dir, optim, train_state
from cdc_jax.models.cdc import from_config, init_params
from cdc_jax.testing import DIFFUSIONS, TINY_MODELS, random_params
from configs import common

MODEL = from_config(TINY_MODELS["eps"])
STEPS = (3, 5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir with intact checkpoints at steps 3 and 5 (params differ)."""
  work = str(tmp_path_factory.mktemp("w") / "run")
  tx = optim.make_optimizer(common.base_config().train)
  params = random_params(MODEL)
  state = jax.device_get(train_state.from_params(params, tx.init(params), True))
  manager = checkpoint.make_manager(work, 3, 1)
  for step in STEPS:
    ema = jax.tree.map(lambda a, s=step: a + s, state.params)
    s = state.replace(step=np.int32(step), ema_params=ema)
    manager.save(step, args=ocp.args.StandardSave(s))
  manager.wait_until_finished()
  manager.close()
  config = {"model": TINY_MODELS["eps"], "diffusion": DIFFUSIONS["eps"]}
  with open(os.path.join(work, model_dir.WORKDIR_CONFIG), "w") as f:
    json.dump(config, f)
  return work, state


@pytest.fixture
def copy(workdir, tmp_path):
  work = str(tmp_path / "run")
  shutil.copytree(workdir[0], work)
  return work


def _abstract():
  return jax.eval_shape(lambda: init_params(MODEL, jax.random.key(0)))


def _array_files(work, step):
  d = os.path.join(checkpoint.checkpoint_dir(work), str(step), "default")
  return glob.glob(f"{d}/**/d/*", recursive=True)


def _truncate(work, step=5):
  for path in _array_files(work, step):
    os.truncate(path, os.path.getsize(path) // 2)


def _zero(work, step=5):
  for path in _array_files(work, step):
    with open(path, "r+b") as f:
      f.write(bytes(os.path.getsize(path)))


def _delete(work, step=5):
  for path in _array_files(work, step):
    os.unlink(path)


DAMAGE = {
  "truncated": _truncate,
  "deleted": _delete,
  "zeroed": _zero,
  "no_metadata": lambda w: os.unlink(
    os.path.join(checkpoint.checkpoint_dir(w), "5", "default", "_METADATA")
  ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_readers_fall_back_to_the_newest_intact_step(
  kind, copy, workdir, caplog
):
  DAMAGE[kind](copy)
  with caplog.at_level(logging.WARNING):
    params, step = checkpoint.restore_params(copy, _abstract())
  assert step == 3
  want = jax.tree.map(lambda a: a + 3, workdir[1].params)
  jax.tree.map(np.testing.assert_array_equal, params, want)
  warned = [r.getMessage() for r in caplog.records if r.levelno >= 30]
  assert len(warned) == 1, warned
  assert "checkpoint step 5 is damaged" in warned[0]
  assert "using step 3, the newest intact one" in warned[0]


def test_a_stray_empty_step_folder_is_skipped(copy, caplog):
  os.makedirs(os.path.join(checkpoint.checkpoint_dir(copy), "7"))
  with caplog.at_level(logging.WARNING):
    _, step = checkpoint.restore_params(copy, _abstract())
  assert step == 5
  assert any("step 7 is damaged" in r.getMessage() for r in caplog.records)


def test_all_damaged_is_one_line(copy):
  for step in STEPS:
    _zero(copy, step)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.restore_params(copy, _abstract())
  msg = str(e.value)
  assert "every checkpoint is damaged" in msg and "\n" not in msg
  assert "step 5: " in msg and "step 3: " in msg


def test_the_codec_path_reads_quietly_and_falls_back(copy, caplog):
  DAMAGE["zeroed"](copy)
  with caplog.at_level(logging.INFO):
    loaded = model_dir.load(copy)
  assert loaded.source.endswith("at step 3")
  absl = [r for r in caplog.records if r.name == "absl"]
  assert absl == [], [r.getMessage() for r in absl]


def test_another_model_width_is_named(copy):
  config = {"model": {**TINY_MODELS["eps"], "dim": 8}}
  config["diffusion"] = DIFFUSIONS["eps"]
  with open(os.path.join(copy, model_dir.WORKDIR_CONFIG), "w") as f:
    json.dump(config, f)
  with pytest.raises(checkpoint.CheckpointError) as e:
    model_dir.load(copy)
  msg = str(e.value)
  assert "the checkpoint is of another model" in msg, msg
  assert "saved (" in msg and "the config's (" in msg and "strict" not in msg


def _trainer_restore(work, abstract_state):
  manager = checkpoint.make_manager(work, 3, 1)
  try:
    return checkpoint.restore_or_none(manager, abstract_state)
  finally:
    manager.close()


def test_resume_from_a_damaged_step_stops_with_one_line(copy, workdir):
  DAMAGE["truncated"](copy)
  abstract = jax.eval_shape(lambda: workdir[1])
  with pytest.raises(checkpoint.CheckpointError) as e:
    _trainer_restore(copy, abstract)
  msg = str(e.value)
  assert "checkpoint step 5 is damaged" in msg and "\n" not in msg
  assert "move that folder aside" in msg and "resume from step 3" in msg
  # Moving it aside, as the message says, resumes from step 3.
  step_dir = os.path.join(checkpoint.checkpoint_dir(copy), "5")
  os.rename(step_dir, step_dir + ".damaged")
  assert int(_trainer_restore(copy, abstract).step) == 3


def test_resume_with_another_width_is_named(copy, workdir):
  wide = from_config({**TINY_MODELS["eps"], "dim": 8})
  tx = optim.make_optimizer(common.base_config().train)

  def state():
    p = init_params(wide, jax.random.key(0))
    return train_state.from_params(p, tx.init(p), True)

  with pytest.raises(checkpoint.CheckpointError, match="another model"):
    _trainer_restore(copy, jax.eval_shape(state))


def test_closed_event_loop_noise_is_dropped(copy, capsys):
  DAMAGE["zeroed"](copy)
  checkpoint.restore_params(copy, _abstract())  # falls back, installs it
  fake = types.SimpleNamespace(
    exc_type=RuntimeError,
    exc_value=RuntimeError("Event loop is closed"),
    exc_traceback=None,
    err_msg=None,
    object=None,
  )
  sys.unraisablehook(fake)
  assert "Event loop is closed" not in capsys.readouterr().err
