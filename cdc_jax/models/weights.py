"""Converted weight files (``.npz``) -> arrays, checked against a model.

The LPIPS and FID Inception loaders (``models.lpips.load``,
``models.inception.load_variables``) read the plain ``.npz`` that
``python -m cdc_jax.convert`` writes, without torch: arrays under "a/b"
keys, read with ``allow_pickle=False`` as float32, then compared key by
key and shape by shape with what the model declares. Every error is one
line naming the file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

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


def read_npz(
  path: str, what: str, error: type[Exception], hint: str = ""
) -> dict[str, np.ndarray]:
  """Every array of the ``.npz`` at ``path`` as float32, by key.

  Raises ``error("{what}: not a plain .npz file (...)[; hint]")`` for
  anything else (a lone ``.npy`` array, text, a damaged archive).
  """
  try:
    z = np.load(path, allow_pickle=False)
    if not hasattr(z, "files"):  # a lone .npy array
      raise ValueError("one array, not an archive")
    with z:
      return {k: np.asarray(z[k], np.float32) for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    tail = f"; {hint}" if hint else ""
    raise error(
      f"{what}: not a plain .npz file ({type(e).__name__}){tail}"
    ) from None


def mismatches(
  flat: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
  """The keys of ``flat`` that ``shapes`` does not declare and those it
  lacks (sorted), then those whose shape differs, in ``shapes``' order."""
  bad = sorted(set(shapes) ^ set(flat))
  bad += [k for k in shapes if k in flat and flat[k].shape != shapes[k]]
  return bad
