"""Model directories: what decoding, evaluation, fine-tuning and the torch
converter exchange, and the one way to read a training workdir's params.

::

  model.json          {"format": "cdc_jax-model", "version": 1,
                       "model": CDC kwargs, "diffusion": {...},
                       "fingerprint": hex, "source": str,
                       a student's "distilled": {base_steps, steps,
                       parameterisation, teacher_bitstream}}
  params.npz          flat float32 arrays, keys "context_fn/enc_0_0/..."
  entropy_tables.npz  integer coding tables (``cdc_jax.entropy_tables``)
  lpips_vgg.npz       (converted rho > 0 checkpoints only) LPIPS weights

Plain JSON and ``.npz`` read with ``allow_pickle=False``: a model directory
is data, never code. ``load`` validates it before building anything
(``cdc_jax.model_check``: every model.json field against bounds, the
``.npz`` members' names, shapes and dtypes from their headers, no NaN or
inf, the entropy tables); ``load`` also takes a training workdir
(``config.json`` + Orbax checkpoints): its newest intact step's decoding
params (EMA where present).

``export`` never removes what it did not write: a new directory is built
beside the target and renamed into place; an existing empty directory is
filled; an existing model directory is replaced only with
``overwrite=True``, file by file (model.json last), and then only the
files above are touched; any other directory, or a file, is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from cdc_jax import (
  checkpoint,
  entropy_tables,
  files,
  model_check,
  npz,
  output_dirs,
)
from cdc_jax.errors import UserError
from cdc_jax.models.cdc import from_config, init_params, to_config

FORMAT = model_check.FORMAT
VERSION = model_check.VERSION
MODEL_JSON = "model.json"
PARAMS = "params.npz"
TABLES = "entropy_tables.npz"
LPIPS_FILE = "lpips_vgg.npz"
# What a model directory consists of: all export writes, or removes.
MODEL_FILES = (MODEL_JSON, PARAMS, TABLES, LPIPS_FILE)
WORKDIR_CONFIG = "config.json"
EXPORT_DIR = "model"  # a training workdir's exported model
MAX_JSON_BYTES = 1 << 20


class ModelError(UserError, ValueError):
  """A model directory that is missing, incomplete or malformed."""


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dicts -> {"a/b/c": array}, keys sorted."""
  out = {}
  for k in sorted(tree):
    v = tree[k]
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(flatten(dict(v), key))
    else:
      out[key] = np.asarray(v)
  return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def fingerprint(
  model_config: dict, diffusion_config: dict, params, distilled=None
) -> str:
  """sha256 over the configs (canonical JSON; a student's ``distilled``
  section too) and every param's bytes."""
  h = hashlib.sha256()
  meta = {"model": model_config, "diffusion": diffusion_config}
  if distilled is not None:
    meta["distilled"] = distilled
  h.update(json.dumps(meta, sort_keys=True).encode())
  for key, v in flatten(params).items():
    a = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    h.update(key.encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model directory (or a workdir's latest step) in memory."""

  model_config: dict
  diffusion_config: dict
  params: dict
  tables: dict[str, np.ndarray]
  fingerprint: str
  path: str
  source: str = ""
  distilled: dict | None = None  # a student's decoder (model.json)


def export(
  directory: str,
  model_config,
  diffusion_config: dict,
  params,
  source: str = "",
  tables: dict[str, np.ndarray] | None = None,
  overwrite: bool = False,
  extra: dict[str, dict[str, np.ndarray]] | None = None,
  distilled: dict | None = None,
) -> str:
  """Writes a model directory (the rules above); returns its fingerprint.

  The entropy tables are computed from the params unless given. ``extra``:
  more ``.npz`` files of ``MODEL_FILES`` (``{LPIPS_FILE: arrays}``).
  ``distilled``: a student's decoder (``model_check.DISTILLED_KEYS``).

  Raises:
    WriteError: ``directory`` is a file, a directory that is not a model
      directory and not empty, or a model directory and not ``overwrite``;
      nothing is written then.
  """
  how = check_export_target(directory, overwrite)
  model_config = to_config(model_config)
  diffusion_config = dict(diffusion_config)
  params = {k: v for k, v in dict(params).items()}
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  model_check.check_finite(directory, flat, ModelError, "nothing was written")
  if tables is None:
    tables = entropy_tables.build(from_config(model_config), params)
  fp = fingerprint(model_config, diffusion_config, params, distilled)
  meta = {
    "format": FORMAT,
    "version": VERSION,
    "model": model_config,
    "diffusion": diffusion_config,
    "fingerprint": fp,
    "source": source,
  }
  if distilled is not None:
    meta["distilled"] = model_check.check_distilled(
      dict(distilled), diffusion_config["timesteps"], directory, ModelError
    )
  payloads = {PARAMS: _npz(flat), TABLES: _npz(tables)}
  payloads |= {name: _npz(arrays) for name, arrays in (extra or {}).items()}
  payloads[MODEL_JSON] = json.dumps(meta, indent=2, sort_keys=True).encode()
  output_dirs.write_dir(directory, payloads, MODEL_FILES, how)
  return fp


def _npz(arrays: dict[str, np.ndarray]):
  return lambda f: np.savez(f, **arrays)


def check_export_target(directory: str, overwrite: bool = False) -> str:
  """How ``export`` would write ``directory`` (``output_dirs``:
  "new", "fill" or "replace"); raises ``files.WriteError`` where it must not
  write. Cheap: callers check before any work."""
  return output_dirs.check_output_dir(
    directory, _is_exported, overwrite, "model directory"
  )


def _is_exported(directory: str) -> bool:
  """Whether ``directory`` holds a model.json this format wrote."""
  path = os.path.join(directory, MODEL_JSON)
  try:
    meta = json.loads(files.read_input(path, MODEL_JSON, MAX_JSON_BYTES))
  except (files.ReadError, ValueError):
    return False
  return isinstance(meta, dict) and meta.get("format") == FORMAT


def is_model_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_JSON))


def is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, WORKDIR_CONFIG))


def load(path: str, verify: bool = True) -> LoadedModel:
  """A model directory or a training workdir -> ``LoadedModel``.

  Raises:
    ModelError: the path is neither, or its files are missing, unreadable
      or do not match their fingerprint; the message says which and what to
      do.
  """
  if not os.path.isdir(path):
    raise ModelError(f"{path}: model directory does not exist")
  if is_model_dir(path):
    return _load_model_dir(path, verify)
  if is_workdir(path):
    return load_workdir(path)
  raise ModelError(
    f"{path}: neither a model directory ({MODEL_JSON}) nor a training "
    f"workdir ({WORKDIR_CONFIG} + checkpoints/); export one with "
    "`python -m cdc_jax.main --mode=export` or convert released weights "
    "with `python -m cdc_jax.convert checkpoint`"
  )


def _read_meta(path: str) -> dict:
  try:
    text = files.read_input(path, MODEL_JSON, MAX_JSON_BYTES)
    meta = json.loads(text)
  except files.ReadError as e:
    raise ModelError(str(e)) from None
  except ValueError as e:
    raise ModelError(f"{path}: unreadable model.json ({e})") from None
  return model_check.check_meta(meta, path, ModelError)


def _read_params(directory: str, model_config: dict) -> dict:
  """params.npz: member headers against the model, then the arrays."""
  where = os.path.join(directory, MODEL_JSON)
  shapes = model_check.expected_params(model_config, where, ModelError)
  path = os.path.join(directory, PARAMS)
  found = npz.headers(path, ModelError)
  model_check.check_param_headers(path, found, shapes, ModelError)
  return npz.read(path, ModelError)


def _read_tables(path: str, model_config: dict) -> dict[str, np.ndarray]:
  model = from_config(model_config)
  f = model.downsampling_factor
  z_channels = model.latent_shapes(1, f, f)["z"][-1]
  found = npz.headers(path, ModelError)
  model_check.check_table_headers(path, found, z_channels, ModelError)
  arrays = npz.read(path, ModelError)
  model_check.check_tables(path, arrays, ModelError)
  return arrays


def _load_model_dir(directory: str, verify: bool) -> LoadedModel:
  meta = _read_meta(os.path.join(directory, MODEL_JSON))
  flat = _read_params(directory, meta["model"])
  params = unflatten(flat)
  fp = meta["fingerprint"]
  if verify:
    distilled = meta.get("distilled")
    actual = fingerprint(meta["model"], meta["diffusion"], params, distilled)
    if actual != fp:
      raise ModelError(
        f"{directory}: parameters do not match the fingerprint in "
        "model.json (the files were modified or mixed up)"
      )
  model_check.check_finite(os.path.join(directory, PARAMS), flat, ModelError)
  tables_path = os.path.join(directory, TABLES)
  if os.path.lexists(tables_path):
    tables = _read_tables(tables_path, meta["model"])
  else:  # an older export without tables: compute them
    tables = entropy_tables.build(from_config(meta["model"]), params)
  return LoadedModel(
    meta["model"],
    meta["diffusion"],
    params,
    tables,
    fp,
    directory,
    meta.get("source", ""),
    meta.get("distilled"),
  )


def read_workdir_config(workdir: str):
  """The run config saved in a training workdir (``config.json``), its
  model and diffusion sections checked as model.json's are."""
  import ml_collections

  path = os.path.join(workdir, WORKDIR_CONFIG)
  try:
    text = files.read_input(path, "run config", MAX_JSON_BYTES)
    config = ml_collections.ConfigDict(json.loads(text))
  except files.ReadError as e:
    raise ModelError(str(e)) from None
  except (ValueError, TypeError, AttributeError) as e:
    raise ModelError(f"{path}: unreadable run config ({e})") from None
  for section in ("model", "diffusion"):
    if section not in config:
      raise ModelError(
        f"{path}: the run config has no '{section}' section; is this a "
        "cdc_jax training workdir?"
      )
  model_check.check_model(to_config(config.model.to_dict()), path, ModelError)
  model_check.check_diffusion(
    model_check.diffusion_config(config), path, ModelError
  )
  return config


def load_workdir(workdir: str) -> LoadedModel:
  """The newest intact checkpoint of a training workdir, params only."""
  import jax

  config = read_workdir_config(workdir)
  if "distill" in config:  # its checkpoints hold a student mid-round
    raise ModelError(
      f"{workdir}: a distillation workdir; its students are model directories "
      f"in it: {os.path.join(workdir, EXPORT_DIR)} (the last) and model_s<S>"
    )
  model_config = to_config(config.model.to_dict())
  diffusion_config = model_check.diffusion_config(config)
  where = os.path.join(workdir, WORKDIR_CONFIG)
  model_check.expected_params(model_config, where, ModelError)
  model = from_config(model_config)
  abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  try:
    params, step = checkpoint.restore_params(workdir, abstract)
  except FileNotFoundError:
    raise ModelError(
      f"{workdir}: the workdir has no complete checkpoint yet"
    ) from None
  params = jax.tree.map(np.asarray, params)
  model_check.check_finite(
    f"{workdir} step {step}", flatten(params), ModelError
  )
  return LoadedModel(
    model_config,
    diffusion_config,
    params,
    entropy_tables.build(model, params),
    fingerprint(model_config, diffusion_config, params),
    workdir,
    f"{workdir} at step {step}",
  )


def export_workdir(workdir: str, directory: str | None = None) -> str:
  """``--mode=export``: writes ``workdir/model`` from the newest intact
  step, replacing the model directory an earlier export or training
  wrote there (any other content there is refused)."""
  out = directory or os.path.join(workdir, EXPORT_DIR)
  check_export_target(out, overwrite=True)
  loaded = load_workdir(workdir)
  export(
    out,
    loaded.model_config,
    loaded.diffusion_config,
    loaded.params,
    source=f"exported from {loaded.source}",
    tables=loaded.tables,
    overwrite=True,
  )
  return out
