"""Malformed model directories: each tampered file is one ``ModelError``
line naming the file, the field and the value (no numpy, zipfile or flax
traceback), and the codec CLI reports it as one line with exit status 2.

The tampering recomputes model.json's fingerprint where a change would
otherwise be caught by it: the fingerprint is a plain hash anyone can
recompute, so the validator must not rely on it.
"""

import json
import os
import shutil
import zipfile

import numpy as np
import pytest

from cdc_jax import model_dir
from cdc_jax.codec import cli as codec_cli


@pytest.fixture
def copy(model_path, tmp_path):
  path = str(tmp_path / "m")
  shutil.copytree(model_path, path)
  return path


def _meta(path):
  with open(os.path.join(path, model_dir.MODEL_JSON)) as f:
    return json.load(f)


def _write_meta(path, meta, params=None):
  """model.json with its fingerprint recomputed (as an attacker would)."""
  if params is not None and isinstance(meta.get("model"), dict):
    meta["fingerprint"] = model_dir.fingerprint(
      meta["model"], meta.get("diffusion"), params
    )
  with open(os.path.join(path, model_dir.MODEL_JSON), "w") as f:
    json.dump(meta, f)


def _load_error(path) -> str:
  with pytest.raises(model_dir.ModelError) as e:
    model_dir.load(path)
  msg = str(e.value)
  assert "\n" not in msg and "Traceback" not in msg
  return msg


def _set(meta, dotted, value):
  node = meta
  *parents, leaf = dotted.split(".")
  for p in parents:
    node = node[p]
  if value is _DELETE:
    del node[leaf]
  else:
    node[leaf] = value


_DELETE = object()
META_CASES = {
  # dotted key, value, a phrase of the message
  "no_model": ("model", _DELETE, "the key 'model' is missing"),
  "version_text": ("version", "2", 'version = "2" is not an integer'),
  "unknown_field": ("model.wibble", 1, "unknown model field 'wibble'"),
  "dim_zero": ("model.dim", 0, "model.dim = 0 must be an integer in"),
  "dim_huge": ("model.dim", 100000, "model.dim = 100000 must be"),
  "family": ("model.family", "z", 'model.family = "z" must be one of'),
  "dtype": ("model.dtype", "int8", 'model.dtype = "int8" must be one of'),
  "mults": ("model.dim_mults", [1, 0], "model.dim_mults = [1, 0] must be"),
  "channels": ("model.channels", 4, "model.channels = 4 must be 3"),
  "schedule": ("diffusion.schedule", "sigmoid", "diffusion.schedule"),
  "timesteps": ("diffusion.timesteps", 0, "diffusion.timesteps = 0"),
  "unknown_key": ("extra", 1, "unknown key 'extra'"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_model_json_fields_are_checked(case, copy):
  key, value, phrase = META_CASES[case]
  params = model_dir.load(copy).params
  meta = _meta(copy)
  _set(meta, key, value)
  _write_meta(copy, meta, params)
  msg = _load_error(copy)
  assert phrase in msg and model_dir.MODEL_JSON in msg, msg


def test_model_fields_that_do_not_fit_together(copy):
  params = model_dir.load(copy).params
  meta = _meta(copy)
  meta["model"]["family"] = "x"  # x needs reverse_context_dim_mults
  _write_meta(copy, meta, params)
  assert "the model fields do not fit together" in _load_error(copy)


# -- params.npz ----------------------------------------------------------------


def _params_path(path):
  return os.path.join(path, model_dir.PARAMS)


def test_nan_params_are_refused(copy):
  loaded = model_dir.load(copy)
  flat = model_dir.flatten(loaded.params)
  key = sorted(flat)[3]
  flat[key] = flat[key].copy()
  flat[key].flat[0] = np.nan
  np.savez(_params_path(copy), **flat)
  params = model_dir.unflatten(flat)
  _write_meta(copy, _meta(copy), params)
  msg = _load_error(copy)
  assert f"parameter {key} contains NaN" in msg, msg


@pytest.mark.parametrize("name", [model_dir.PARAMS, model_dir.TABLES])
def test_truncated_archives(name, copy):
  path = os.path.join(copy, name)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  msg = _load_error(copy)
  assert path in msg and ("truncated" in msg or "damaged" in msg), msg


def test_random_bytes_are_not_offered_to_pickle(copy):
  with open(_params_path(copy), "wb") as f:
    f.write(np.random.default_rng(0).bytes(4096))
  msg = _load_error(copy)
  assert "not an .npz archive" in msg and "pickle" not in msg, msg


def test_member_shapes_and_names_come_from_the_model(copy):
  flat = dict(np.load(_params_path(copy)))
  key = sorted(flat)[0]
  flat[key] = np.zeros((7, 7), np.float32)
  np.savez(_params_path(copy), **flat)
  msg = _load_error(copy)
  assert f"{key} is float32 (7, 7)" in msg and "needs float32" in msg, msg
  del flat[key]
  flat["stray/param"] = np.zeros(3, np.float32)
  np.savez(_params_path(copy), **flat)
  assert "do not fit model.json's model" in _load_error(copy)


def test_object_arrays_are_refused_from_the_header(copy):
  flat = dict(np.load(_params_path(copy)))
  key = sorted(flat)[0]
  with zipfile.ZipFile(_params_path(copy), "w") as z:
    for k, v in flat.items():
      with z.open(k + ".npy", "w") as f:
        obj = np.array([{"x": 1}], dtype=object) if k == key else v
        np.lib.format.write_array(f, obj, allow_pickle=True)
  msg = _load_error(copy)
  assert "holds object values" in msg and "refused" in msg, msg


# -- entropy_tables.npz --------------------------------------------------------


def _tables(path):
  with np.load(os.path.join(path, model_dir.TABLES)) as z:
    return dict(z)


def _save_tables(path, tables):
  np.savez(os.path.join(path, model_dir.TABLES), **tables)


TABLE_CASES = {
  "nan_scale": (
    lambda t: t["y_scale_table"].__setitem__(3, np.nan),
    "y_scale_table must be finite positive",
  ),
  "reversed_scale": (
    lambda t: t.__setitem__("y_scale_table", t["y_scale_table"][::-1].copy()),
    "not strictly increasing",
  ),
  "zero_counts": (
    lambda t: t["z_counts"].__setitem__((0, 0), 0),
    "the z tables are invalid",
  ),
  "missing_key": (lambda t: t.pop("y_offsets"), "missing member 'y_offsets'"),
  "wrong_rows": (
    lambda t: t.__setitem__("z_counts", t["z_counts"][:1]),
    "z_counts has shape",
  ),
}


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_entropy_tables_are_checked(case, copy):
  tamper, phrase = TABLE_CASES[case]
  tables = _tables(copy)
  tamper(tables)
  _save_tables(copy, tables)
  msg = _load_error(copy)
  assert phrase in msg and model_dir.TABLES in msg, msg


# -- through the codec CLI -----------------------------------------------------


def test_the_codec_cli_reports_one_line(copy, tmp_path, capsys):
  meta = _meta(copy)
  meta["model"]["dim"] = 0
  _write_meta(copy, meta)
  src = tmp_path / "in.cdcj"
  src.write_bytes(b"CDCJ")
  rc = codec_cli.main(
    ["decompress", "--model", copy, str(src), str(tmp_path / "o.png")]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert err[0].startswith("error: ") and "model.dim = 0" in err[0]
  assert not (tmp_path / "o.png").exists()
