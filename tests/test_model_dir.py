"""Model directories: export/load, fingerprints, and training workdirs."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cdc_jax import checkpoint, entropy_tables, model_dir, optim, train_state
from cdc_jax.models.cdc import from_config, to_config
from cdc_jax.testing import DIFFUSIONS, TINY_MODELS, random_params
from configs import eps_linear

MODEL_CONFIG = TINY_MODELS["eps"]
DIFFUSION = DIFFUSIONS["eps"]


@pytest.fixture(scope="module")
def params():
  return random_params(from_config(MODEL_CONFIG))


def test_flatten_unflatten_round_trip(params):
  flat = model_dir.flatten(params)
  assert all("/" in k for k in flat)
  assert list(flat) == sorted(flat)
  back = model_dir.unflatten(flat)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_export_and_load_round_trip(params, tmp_path):
  out = str(tmp_path / "m")
  fp = model_dir.export(out, MODEL_CONFIG, DIFFUSION, params, source="t")
  assert sorted(os.listdir(out)) == [
    "entropy_tables.npz",
    "model.json",
    "params.npz",
  ]
  loaded = model_dir.load(out)
  assert loaded.fingerprint == fp and len(fp) == 64
  assert loaded.model_config == to_config(MODEL_CONFIG)
  assert loaded.diffusion_config == DIFFUSION
  assert loaded.source == "t"
  jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
  want = entropy_tables.build(from_config(MODEL_CONFIG), params)
  assert sorted(loaded.tables) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(loaded.tables[k], v, err_msg=k)
  # No temporary folders left beside it.
  assert os.listdir(tmp_path) == ["m"]


def test_fingerprint_depends_on_every_param_and_the_config(params):
  fp = model_dir.fingerprint(MODEL_CONFIG, DIFFUSION, params)
  flat = model_dir.flatten(params)
  key = sorted(flat)[len(flat) // 2]
  flat[key] = flat[key].copy()
  flat[key].flat[0] += 1e-3
  other = model_dir.unflatten(flat)
  assert model_dir.fingerprint(MODEL_CONFIG, DIFFUSION, other) != fp
  diff = {**DIFFUSION, "timesteps": 1000}
  assert model_dir.fingerprint(MODEL_CONFIG, diff, params) != fp


def test_modified_params_are_rejected(params, tmp_path):
  out = str(tmp_path / "m")
  model_dir.export(out, MODEL_CONFIG, DIFFUSION, params)
  flat = model_dir.flatten(params)
  key = sorted(flat)[0]
  flat[key] = flat[key] + 1.0
  np.savez(os.path.join(out, model_dir.PARAMS), **flat)
  with pytest.raises(model_dir.ModelError, match="fingerprint"):
    model_dir.load(out)


def test_export_replaces_an_existing_model(params, tmp_path):
  out = str(tmp_path / "m")
  model_dir.export(out, MODEL_CONFIG, DIFFUSION, params, source="one")
  model_dir.export(
    out, MODEL_CONFIG, DIFFUSION, params, source="two", overwrite=True
  )
  assert model_dir.load(out).source == "two"
  assert os.listdir(tmp_path) == ["m"]


@pytest.mark.parametrize(
  "make,expect",
  [
    (lambda p: None, "does not exist"),
    (lambda p: os.makedirs(p), "neither a model directory"),
    (
      lambda p: (os.makedirs(p), open(f"{p}/model.json", "w").write("{")),
      "unreadable model.json",
    ),
    (
      lambda p: (
        os.makedirs(p),
        open(f"{p}/model.json", "w").write(
          json.dumps({"format": model_dir.FORMAT, "version": 99})
        ),
      ),
      "newer than this",
    ),
  ],
  ids=["missing", "empty", "bad_json", "newer_version"],
)
def test_bad_model_dirs_name_the_problem(make, expect, tmp_path):
  path = str(tmp_path / "m")
  make(path)
  with pytest.raises(model_dir.ModelError, match=expect) as e:
    model_dir.load(path)
  assert path in str(e.value)


def test_load_workdir_reads_the_latest_decoding_params(params, tmp_path):
  config = eps_linear.get_config("tiny")
  config.unlock()
  config.model.update(MODEL_CONFIG)
  work = tmp_path / "w"
  work.mkdir()
  (work / model_dir.WORKDIR_CONFIG).write_text(config.to_json_best_effort())
  with pytest.raises(model_dir.ModelError, match="no complete checkpoint"):
    model_dir.load(str(work))
  tx = optim.make_optimizer(config.train)
  other = jax.tree.map(lambda a: a - 1.0, params)
  st = train_state.from_params(other, tx.init(other), ema=True, step=4)
  st = jax.device_get(st).replace(ema_params=params)
  manager = checkpoint.make_manager(str(work), 2, 1)
  manager.save(4, args=ocp.args.StandardSave(st))
  manager.wait_until_finished()
  manager.close()
  loaded = model_dir.load(str(work))
  assert "step 4" in loaded.source
  jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
  out = model_dir.export_workdir(str(work))
  assert out == os.path.join(str(work), "model")
  assert model_dir.load(out).fingerprint == loaded.fingerprint
