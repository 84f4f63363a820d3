"""Checkpoints: Orbax training state, and params-only model directories.

A *model directory* is what decoding, evaluation, fine-tuning
(``--config.init_from``) and the torch converter exchange::

  model.json          {"format": "cdc_jax-model", "version": 1,
                       "model": CDC kwargs, "diffusion": {...},
                       "fingerprint": hex, "source": str}
  params.npz          flat float32 arrays, keys "context_fn/enc_0_0/..."
  entropy_tables.npz  integer coding tables (``cdc_jax.bitstream``)

Plain JSON and ``.npz`` read with ``allow_pickle=False``: a model directory
is data, never code. Files are written to a temporary directory and renamed
into place, so a failed export never leaves a half-written model.

The Orbax part (training state) is ``make_manager`` / ``restore_or_none``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

FORMAT = "cdc_jax-model"
VERSION = 1


class ModelError(ValueError):
  """A model directory that is missing, incomplete or malformed."""


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
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
  model_config: dict
  diffusion_config: dict
  params: dict
  tables: dict[str, np.ndarray] | None
  fingerprint: str
  path: str


def export_model(
  directory: str,
  model_config: dict,
  diffusion_config: dict,
  params,
  tables: dict[str, np.ndarray] | None = None,
  source: str = "",
) -> str:
  """Writes a model directory atomically; returns its fingerprint."""
  params = {k: v for k, v in dict(params).items()}
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
    np.savez(os.path.join(tmp, "params.npz"), **flat)
    if tables is not None:
      np.savez(os.path.join(tmp, "entropy_tables.npz"), **tables)
    with open(os.path.join(tmp, "model.json"), "w") as f:
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
  return os.path.isfile(os.path.join(path, "model.json"))


def load_model(directory: str, verify: bool = True) -> LoadedModel:
  """Reads a model directory; ``ModelError`` names what is wrong."""
  meta_path = os.path.join(directory, "model.json")
  if not os.path.isdir(directory):
    raise ModelError(f"{directory}: model directory does not exist")
  if not os.path.isfile(meta_path):
    raise ModelError(
      f"{directory}: not a cdc_jax model directory (no model.json); export "
      "one with `python -m cdc_jax.main --mode=export` or convert released "
      "weights with `python -m cdc_jax.convert_torch`"
    )
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
  params_path = os.path.join(directory, "params.npz")
  try:
    with np.load(params_path, allow_pickle=False) as z:
      flat = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise ModelError(f"{params_path}: cannot read parameters ({e})") from None
  params = unflatten(flat)
  tables = None
  tables_path = os.path.join(directory, "entropy_tables.npz")
  if os.path.isfile(tables_path):
    try:
      with np.load(tables_path, allow_pickle=False) as z:
        tables = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
      raise ModelError(f"{tables_path}: cannot read tables ({e})") from None
  fp = meta.get("fingerprint", "")
  if verify:
    actual = fingerprint(meta["model"], meta["diffusion"], params)
    if actual != fp:
      raise ModelError(
        f"{directory}: parameters do not match the fingerprint in "
        "model.json (the files were modified or mixed up)"
      )
  return LoadedModel(
    meta["model"], meta["diffusion"], params, tables, fp, directory
  )


# -- Orbax training checkpoints -----------------------------------------------


def make_manager(workdir: str, max_to_keep: int, interval: int):
  """One CheckpointManager per workdir (Orbax: one live writer per dir)."""
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=interval, create=True
    ),
  )


def restore_or_none(manager, abstract_state: Any):
  """Restores the latest complete checkpoint, or returns None."""
  import orbax.checkpoint as ocp

  step = manager.latest_step()
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
