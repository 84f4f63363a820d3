"""Orbax checkpoints of a workdir: the trainer's manager, and the
params-only restore the codec, evaluation and export use."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cdc_jax import checkpoint, optim, train_state
from cdc_jax.models.cdc import from_config, init_params
from cdc_jax.testing import TINY_MODELS, random_params
from configs import common

MODEL = from_config(TINY_MODELS["eps"])


@pytest.fixture(scope="module")
def states():
  """A host train state with EMA (ema != params) and one without."""
  tx = optim.make_optimizer(common.base_config().train)
  params = random_params(MODEL)  # the same compile as test_model_dir's
  st = jax.device_get(train_state.from_params(params, tx.init(params), True))
  ema = jax.tree.map(lambda a: a + 1.0, st.params)
  with_ema = st.replace(step=np.int32(3), ema_params=ema)
  without = st.replace(step=np.int32(5), ema_params=None)
  return with_ema, without


def _save(workdir, state):
  manager = checkpoint.make_manager(str(workdir), 3, 1)
  manager.save(int(state.step), args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()


def _abstract_params():
  return jax.eval_shape(lambda: init_params(MODEL, jax.random.key(0)))


def _assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_restore_params_reads_ema_where_present(states, tmp_path):
  with_ema, without = states
  _save(tmp_path / "a", with_ema)
  params, step = checkpoint.restore_params(
    str(tmp_path / "a"), _abstract_params()
  )
  assert step == 3
  _assert_tree_equal(params, with_ema.ema_params)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))

  _save(tmp_path / "b", without)
  params, step = checkpoint.restore_params(
    str(tmp_path / "b"), _abstract_params()
  )
  assert step == 5
  _assert_tree_equal(params, without.params)


def test_restore_or_none_and_latest_step(states, tmp_path):
  with_ema, _ = states
  work = str(tmp_path / "w")
  assert checkpoint.latest_step(work) is None
  manager = checkpoint.make_manager(work, 3, 1)
  abstract = jax.eval_shape(lambda: with_ema)
  assert checkpoint.restore_or_none(manager, abstract) is None
  manager.save(3, args=ocp.args.StandardSave(with_ema))
  manager.wait_until_finished()
  restored = checkpoint.restore_or_none(manager, abstract)
  manager.close()
  assert int(restored.step) == 3
  _assert_tree_equal(jax.device_get(restored.opt_state), with_ema.opt_state)
  assert checkpoint.latest_step(work) == 3


def test_unfinished_save_is_never_restored(states, tmp_path):
  with_ema, _ = states
  work = tmp_path / "w"
  _save(work, with_ema)
  # A save cut off mid-write leaves a temporary step folder behind.
  tmp_step = os.path.join(
    checkpoint.checkpoint_dir(str(work)), "9.orbax-checkpoint-tmp-1"
  )
  os.makedirs(tmp_step)
  assert checkpoint.latest_step(str(work)) == 3
  _, step = checkpoint.restore_params(str(work), _abstract_params())
  assert step == 3


def test_restore_params_without_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    checkpoint.restore_params(str(tmp_path), _abstract_params())
