"""The device mesh and the global batch checks."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cdc_jax import sharding


def test_check_batch():
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8  # tests/conftest.py
  sharding.check_batch(8, mesh)
  sharding.check_batch(16, mesh)
  with pytest.raises(sharding.ShardingError) as e:
    sharding.check_batch(6, mesh)
  msg = str(e.value)
  assert "batch_size=6" in msg and "8 devices" in msg
  assert "--config.train.batch_size=8" in msg
  sharding.check_batch(6, sharding.make_mesh(jax.devices()[:2]))


def test_global_batch_splits_rows_over_devices():
  mesh = sharding.make_mesh()
  local = np.arange(8 * 2 * 3, dtype=np.uint8).reshape(8, 2, 3)
  arr = sharding.global_batch(local, sharding.batch_sharding(mesh))
  assert arr.shape == (8, 2, 3)
  np.testing.assert_array_equal(np.asarray(arr), local)
  shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == 8
  for i, s in enumerate(shards):
    np.testing.assert_array_equal(np.asarray(s.data), local[i : i + 1])


def test_replicated_tree():
  mesh = sharding.make_mesh()
  tree = {"a": np.zeros(3), "b": {"c": np.ones(2)}}
  shardings = sharding.replicated(mesh, tree)
  placed = jax.device_put(tree, shardings)
  assert placed["b"]["c"].sharding.is_fully_replicated
