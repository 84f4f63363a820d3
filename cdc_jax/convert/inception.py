"""FID InceptionV3 weights (a local ``.pth``) -> ``models.inception`` vars.

The weights of the FID literature are the TF 2015 graph converted to
PyTorch: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
and pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (one sha256
prefix in both names, as torch.hub names files: the same weights; see
``models.inception.WEIGHTS_URLS``). Both use torchvision's ``Inception3``
key names::

  <block>[.<branch>].conv.weight        (O, I, kh, kw) -> .../conv/kernel
  <block>[.<branch>].bn.weight / bias   (O,)  -> params/.../bn/scale, bias
  <block>[.<branch>].bn.running_mean/var (O,) -> batch_stats/.../bn/mean, var
  fc.weight (1008, 2048), fc.bias       the logits head: checked, dropped
  *.num_batches_tracked, "module." prefixes: ignored

The mapping is one table (``table``) generated from the Flax model's
variables, every row used once. Nothing is downloaded: a missing or wrong
file raises ``models.inception.InceptionWeightsError`` with one line
naming the file and where to get it. ``.pth`` files are read with
``torch.load(weights_only=True)`` (torch needed only for them); the
``.npz`` this module writes is plain arrays, which
``models.inception.load_variables`` reads without torch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from cdc_jax import files
from cdc_jax.convert.torch_checkpoint import load_state_dict
from cdc_jax.convert.transforms import (
  CONV,
  SAME,
  Row,
  convert_table,
  key_problems,
  shape_of,
)
from cdc_jax.models import inception as inc
from cdc_jax.models.inception import InceptionWeightsError, fetch_hint
from cdc_jax.models.weights import is_npz

FID_CLASSES = 1008  # the 2015 graph's logits; torchvision's ImageNet has 1000
# torch BatchNorm2d / Conv2d names <-> Flax leaf names.
_LEAVES = {
  "conv/kernel": ("conv.weight", CONV),
  "bn/scale": ("bn.weight", SAME),
  "bn/bias": ("bn.bias", SAME),
  "bn/mean": ("bn.running_mean", SAME),
  "bn/var": ("bn.running_var", SAME),
}


def torch_key(flax_key: str) -> tuple[str, Any]:
  """``params/Mixed_5b/branch1x1/conv/kernel`` -> (torch key, transform)."""
  _, *path = flax_key.split("/")
  leaf, transform = _LEAVES["/".join(path[-2:])]
  return ".".join(path[:-2] + [leaf]), transform


@functools.lru_cache(maxsize=1)
def table() -> tuple[tuple[Row, tuple[int, ...]], ...]:
  """Rows (torch key, Flax variable key, transform) with Flax shapes."""
  rows = []
  for key, shape in inc.variable_shapes().items():
    tkey, transform = torch_key(key)
    rows.append((Row(tkey, key, transform), shape))
  return tuple(rows)


def _clean(state: Mapping[str, Any], what: str) -> dict[str, Any]:
  """Drops the logits head and bookkeeping after checking they fit."""
  out = {}
  for k, v in state.items():
    k = str(k).removeprefix("module.")
    if k.endswith("num_batches_tracked"):
      continue
    if k.startswith("AuxLogits."):
      raise InceptionWeightsError(
        f"{what}: has AuxLogits.*, so it is torchvision's ImageNet "
        f"InceptionV3, not the FID weights; {fetch_hint()}"
      )
    if k in ("fc.weight", "fc.bias"):
      if shape_of(v) not in ((FID_CLASSES, inc.FEATURES), (FID_CLASSES,)):
        raise InceptionWeightsError(
          f"{what}: {k} has shape {shape_of(v)}, not the FID graph's "
          f"{FID_CLASSES} classes; {fetch_hint()}"
        )
      continue
    out[k] = v
  return out


def variables_from_state_dict(
  state: Mapping[str, Any], what: str = "state dict"
) -> dict[str, np.ndarray]:
  """A torch-fidelity / pytorch-fid state dict -> flat Flax variables.

  Keys ``"params/..."`` and ``"batch_stats/..."`` (``model_dir.unflatten``
  gives the ``variables`` of ``InceptionV3.apply``); every table row is
  used once and no other tensor is left.
  """
  state = _clean(state, what)
  rows = table()
  problems = key_problems(state, rows)
  if problems:
    raise InceptionWeightsError(
      f"{what}: not the FID InceptionV3 weights ({problems}); {fetch_hint()}"
    )
  out = convert_table(state, rows, what, InceptionWeightsError)
  inc.check_finite(out, what)
  return out


def to_torch_state_dict(flat: Mapping[str, np.ndarray]) -> dict:
  """The inverse of ``variables_from_state_dict`` (without ``fc``)."""
  return {
    r.torch_key: np.ascontiguousarray(r.transform.to_torch(flat[r.flax_path]))
    for r, _ in table()
  }


def _read_pth(path: str) -> dict[str, np.ndarray]:
  what = f"InceptionV3 weights {path}"
  state = load_state_dict(path, what, InceptionWeightsError, fetch_hint())
  return variables_from_state_dict(state, what)


def load_variables(path: str) -> dict[str, np.ndarray]:
  """Flat InceptionV3 variables from an ``.npz`` (``save_variables``;
  ``models.inception.load_variables`` reads it) or from the
  torch-fidelity / pytorch-fid ``.pth`` (needs torch).

  The format is read from the file's contents, not its name.
  """
  path = os.fspath(path)
  if os.path.isfile(path) and not is_npz(path):
    return _read_pth(path)
  return inc.load_variables(path)  # the .npz, or the missing file's error


def save_variables(path: str, flat: Mapping[str, np.ndarray]) -> None:
  """Writes flat variables as an ``.npz`` of plain float32 arrays."""
  arrays = _float32(flat)
  files.write_atomic(path, lambda f: np.savez(f, **arrays))


def _float32(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def convert_file(src: str, out: str) -> int:
  """``src`` (.pth or .npz) -> ``out`` (.npz); returns the value count.
  The output is checked first (``files.check_output``: its folder exists,
  it is not ``src``)."""
  files.check_output(out, inputs=[src])
  flat = load_variables(src)
  files.write_atomic(out, lambda f: np.savez(f, **_float32(flat)), inputs=[src])
  return sum(v.size for v in flat.values())
