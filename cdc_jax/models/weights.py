"""Converted weight files (``.npz``) -> arrays, checked against a model.

The LPIPS and FID Inception loaders (``models.lpips.load``,
``models.inception.load_variables``) read the plain ``.npz`` that
``python -m cdc_jax.convert`` writes, without torch: arrays under "a/b"
keys, compared key by key and shape by shape with what the model
declares from the members' headers alone (``cdc_jax.npz``), then read with
``allow_pickle=False`` as float32. Every error is one line naming the
file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

from cdc_jax import npz

MAX_LISTED = 8


def listing(keys: Iterable[str], limit: int = MAX_LISTED) -> str:
  """``[a, b, ... (n more)]``: at most ``limit`` keys of a long list."""
  keys = list(keys)
  shown = ", ".join(keys[:limit])
  if len(keys) > limit:
    shown += f", ... ({len(keys) - limit} more)"
  return f"[{shown}]"


def is_npz(path: str) -> bool:
  """True for a numpy archive (a zip of .npy files); a torch zip is not."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
  return bool(names) and all(n.endswith(".npy") for n in names)


def npz_shapes(
  path: str, what: str, error: type[Exception], hint: str = ""
) -> dict[str, tuple[int, ...]]:
  """Key -> shape of every array of the ``.npz`` at ``path``, from the
  members' headers alone (``cdc_jax.npz.headers``: nothing is read), for
  the caller to compare with its model (``mismatches``) before
  ``read_npz``.

  Raises ``error("{what}: not a plain .npz file (...)[; hint]")``: a lone
  ``.npy`` array, text, a damaged archive, object arrays.
  """
  try:
    return {k: m.shape for k, m in npz.headers(path).items()}
  except npz.NpzError as e:
    raise _not_npz(path, what, error, hint, e) from None


def read_npz(
  path: str, what: str, error: type[Exception], hint: str = ""
) -> dict[str, np.ndarray]:
  """Every array of the ``.npz`` at ``path`` as float32, by key (once
  ``npz_shapes`` matched the model; the headers are checked again, as
  ``cdc_jax.npz.read`` wants). Raises as ``npz_shapes``."""
  try:
    npz.headers(path)
    return {k: np.asarray(v, np.float32) for k, v in npz.read(path).items()}
  except npz.NpzError as e:
    raise _not_npz(path, what, error, hint, e) from None


def _not_npz(path, what, error, hint, e) -> Exception:
  reason = str(e).removeprefix(f"{path}: ")
  tail = f"; {hint}" if hint else ""
  return error(f"{what}: not a plain .npz file ({reason}){tail}")


def mismatches(
  found: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
  """The keys of ``found`` (key -> shape) that ``shapes`` does not declare
  and those it lacks (sorted), then those whose shape differs, in
  ``shapes``' order."""
  bad = sorted(set(shapes) ^ set(found))
  bad += [k for k in shapes if k in found and found[k] != tuple(shapes[k])]
  return bad
