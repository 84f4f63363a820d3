"""Model directories: what decoding, evaluation, fine-tuning and the torch
converter exchange, and the one way to read a training workdir's params.

::

  model.json          {"format": "cdc_jax-model", "version": 1,
                       "model": CDC kwargs, "diffusion": {...},
                       "fingerprint": hex, "source": str}
  params.npz          flat float32 arrays, keys "context_fn/enc_0_0/..."
  entropy_tables.npz  integer coding tables (``cdc_jax.entropy_tables``)

Plain JSON and ``.npz`` read with ``allow_pickle=False``: a model directory
is data, never code. ``export`` writes a temporary directory and renames
it into place, so a failed export never leaves a half-written model.
``load`` also takes a training workdir (``config.json`` + Orbax
checkpoints): its latest step's decoding params (EMA where present).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from cdc_jax import checkpoint, entropy_tables
from cdc_jax.models.cdc import from_config, init_params, to_config

FORMAT = "cdc_jax-model"
VERSION = 1
MODEL_JSON = "model.json"
PARAMS = "params.npz"
TABLES = "entropy_tables.npz"
WORKDIR_CONFIG = "config.json"


class ModelError(ValueError):
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


def fingerprint(model_config: dict, diffusion_config: dict, params) -> str:
  """sha256 over the configs (canonical JSON) and every param's bytes."""
  h = hashlib.sha256()
  h.update(
    json.dumps(
      {"model": model_config, "diffusion": diffusion_config}, sort_keys=True
    ).encode()
  )
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


def export(
  directory: str,
  model_config,
  diffusion_config: dict,
  params,
  source: str = "",
  tables: dict[str, np.ndarray] | None = None,
) -> str:
  """Writes a model directory atomically; returns its fingerprint.

  The entropy tables are computed from the params unless given.
  """
  model_config = to_config(model_config)
  diffusion_config = dict(diffusion_config)
  params = {k: v for k, v in dict(params).items()}
  if tables is None:
    tables = entropy_tables.build(from_config(model_config), params)
  fp = fingerprint(model_config, diffusion_config, params)
  meta = {
    "format": FORMAT,
    "version": VERSION,
    "model": model_config,
    "diffusion": diffusion_config,
    "fingerprint": fp,
    "source": source,
  }
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-model-", dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    np.savez(os.path.join(tmp, PARAMS), **flat)
    np.savez(os.path.join(tmp, TABLES), **tables)
    with open(os.path.join(tmp, MODEL_JSON), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    if os.path.isdir(directory):
      old = directory + ".old-" + os.path.basename(tmp)
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return fp


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
    "with `python -m cdc_jax.convert`"
  )


def _read_npz(path: str, what: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise ModelError(f"{path}: cannot read {what} ({e})") from None


def _load_model_dir(directory: str, verify: bool) -> LoadedModel:
  meta_path = os.path.join(directory, MODEL_JSON)
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ModelError(f"{meta_path}: unreadable model.json ({e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ModelError(f"{meta_path}: not a cdc_jax model description")
  if meta.get("version", 0) > VERSION:
    raise ModelError(
      f"{meta_path}: model format v{meta.get('version')} is newer than this "
      f"cdc_jax reads (v{VERSION}); upgrade cdc_jax"
    )
  params = unflatten(_read_npz(os.path.join(directory, PARAMS), "parameters"))
  fp = meta.get("fingerprint", "")
  if verify:
    actual = fingerprint(meta["model"], meta["diffusion"], params)
    if actual != fp:
      raise ModelError(
        f"{directory}: parameters do not match the fingerprint in "
        "model.json (the files were modified or mixed up)"
      )
  tables_path = os.path.join(directory, TABLES)
  if os.path.isfile(tables_path):
    tables = _read_npz(tables_path, "tables")
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
  )


def read_workdir_config(workdir: str):
  """The run config saved in a training workdir (``config.json``)."""
  import ml_collections

  path = os.path.join(workdir, WORKDIR_CONFIG)
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError, TypeError) as e:
    raise ModelError(f"{path}: unreadable run config ({e})") from None
  for section in ("model", "diffusion"):
    if section not in config:
      raise ModelError(
        f"{path}: the run config has no '{section}' section; is this a "
        "cdc_jax training workdir?"
      )
  return config


def load_workdir(workdir: str) -> LoadedModel:
  """The latest complete checkpoint of a training workdir, params only."""
  import jax

  config = read_workdir_config(workdir)
  model_config = to_config(config.model)
  diffusion_config = {
    "schedule": config.diffusion.schedule,
    "timesteps": int(config.diffusion.timesteps),
  }
  model = from_config(model_config)
  abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  try:
    params, step = checkpoint.restore_params(workdir, abstract)
  except FileNotFoundError:
    raise ModelError(
      f"{workdir}: the workdir has no complete checkpoint yet"
    ) from None
  params = jax.tree.map(np.asarray, params)
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
  """``--mode=export``: writes ``workdir/model`` from the latest step."""
  loaded = load_workdir(workdir)
  out = directory or os.path.join(workdir, "model")
  export(
    out,
    loaded.model_config,
    loaded.diffusion_config,
    loaded.params,
    source=f"exported from {loaded.source}",
    tables=loaded.tables,
  )
  return out
