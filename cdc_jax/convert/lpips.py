"""LPIPS weights from local torch files -> ``cdc_jax.models.lpips`` params.

Sources (nothing is downloaded): the ``lpips`` package's linear layers,
``lpips/weights/v0.1/{vgg,alex}.pth`` (shipped inside ``pip install
lpips``; ``lin{i}.model.1.weight``), plus a torchvision-format trunk state
dict that the user supplies (``features.{k}.{weight,bias}``;
``classifier.*`` is ignored; lpips's own ``net.slice{s}.{k}.*`` naming is
accepted too), see ``TORCHVISION_FILES``. ``save_params`` writes the
result as an ``.npz``, which ``models.lpips.load`` reads without torch
(as it reads the ``lpips_vgg.npz`` that ``python -m cdc_jax.convert
checkpoint`` writes for rho > 0 CDC checkpoints).

``.pth`` files are read with ``torch.load(weights_only=True)``. A missing
or wrong file raises ``models.lpips.LPIPSWeightsError`` whose one-line
message names the file and how to get it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cdc_jax import files, model_dir
from cdc_jax.convert.torch_checkpoint import load_state_dict
from cdc_jax.convert.transforms import (
  CONV,
  SAME,
  Row,
  convert_table,
  key_problems,
)
from cdc_jax.models import lpips as lp
from cdc_jax.models.lpips import LPIPSWeightsError

# torchvision's ImageNet weights of the trunks (named here as text only).
TORCHVISION_FILES = {
  "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
  "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}
LPIPS_VERSION = "0.1"


def _fetch_hint(net: str) -> str:
  url = TORCHVISION_FILES[net]
  return (
    f"download {url} (torchvision's ImageNet {os.path.basename(url)}) "
    "yourself and pass its path; cdc_jax never downloads"
  )


def trunk_table(net: str) -> list[tuple[Row, tuple[int, ...]]]:
  """torchvision ``features.{k}.*`` keys -> Flax paths, with Flax shapes."""
  out = []
  for c in lp.trunk_convs(net):
    t, f = f"features.{c.index}", f"features_{c.index}"
    shape = (c.kernel, c.kernel, c.cin, c.cout)
    out.append((Row(f"{t}.weight", f"{f}/kernel", CONV), shape))
    out.append((Row(f"{t}.bias", f"{f}/bias", SAME), (c.cout,)))
  return out


def lin_table(net: str) -> list[tuple[Row, tuple[int, ...]]]:
  """The lpips package's ``lin{i}.model.1.weight`` keys -> ``lin_{i}``."""
  return [
    (Row(f"lin{i}.model.1.weight", f"lin_{i}/kernel", CONV), (1, 1, c, 1))
    for i, c in enumerate(lp.widths(net))
  ]


def _apply(state: Mapping[str, Any], table, what: str) -> dict:
  """Checks ``state`` has exactly the table's keys and shapes; converts."""
  problems = key_problems(state, table)
  if problems:
    raise LPIPSWeightsError(f"{what}: {problems}")
  return convert_table(state, table, what, LPIPSWeightsError)


_SLICE_KEY = re.compile(r"^(?:net\.)?slice\d+\.(\d+)\.(weight|bias)$")


def trunk_from_state_dict(state: Mapping[str, Any], net: str, what: str):
  """A torchvision ``vgg16``/``alexnet`` state dict -> flat Flax leaves.

  ``classifier.*`` (the ImageNet head) is dropped; lpips-style
  ``[net.]slice{s}.{k}.*`` keys are renamed to ``features.{k}.*``.
  """
  lp.check_net(net)
  trunk = {}
  for k, v in state.items():
    k = str(k).removeprefix("module.")
    m = _SLICE_KEY.match(k)
    if m:
      k = f"features.{m.group(1)}.{m.group(2)}"
    if not k.startswith("classifier."):
      trunk[k] = v
  if not trunk:
    raise LPIPSWeightsError(
      f"{what}: no trunk weights (features.*) in it; {_fetch_hint(net)}"
    )
  return _apply(trunk, trunk_table(net), what)


def lins_from_state_dict(state: Mapping[str, Any], net: str, what: str):
  """The lpips package's ``{net}.pth`` state dict -> flat Flax leaves."""
  lp.check_net(net)
  return _apply(dict(state), lin_table(net), what)


def _scaling() -> dict[str, np.ndarray]:
  return {
    "scaling_layer/shift": np.asarray(lp.SHIFT, np.float32),
    "scaling_layer/scale": np.asarray(lp.SCALE, np.float32),
  }


def package_lins_file(net: str = "vgg") -> str:
  """``lpips/weights/v0.1/{net}.pth`` of the installed ``lpips`` package."""
  lp.check_net(net)
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise LPIPSWeightsError(
      f"LPIPS {net} linear layers: no file given and the lpips package is "
      f"not installed; pip install lpips==0.1.4 (it ships "
      f"lpips/weights/v{LPIPS_VERSION}/{net}.pth) or pass the file"
    )
  root = list(spec.submodule_search_locations)[0]
  return os.path.join(root, "weights", f"v{LPIPS_VERSION}", f"{net}.pth")


def _load_pth(path: str, what: str, hint: str) -> Mapping[str, Any]:
  if not os.path.isfile(path):
    raise LPIPSWeightsError(f"{what}: {path}: no such file; {hint}")
  return load_state_dict(path, what, LPIPSWeightsError)


def params_from_torch(backbone: str, net: str = "vgg", lins: str | None = None):
  """LPIPS params from a torchvision trunk file and lpips lin weights.

  ``backbone``: torchvision ``vgg16`` / ``alexnet`` state dict (``.pth``,
  e.g. ``vgg16-397923af.pth``). ``lins``: the lpips package's v0.1
  ``{net}.pth``; by default the one inside the installed ``lpips``.
  """
  lp.check_net(net)
  what = f"LPIPS {net} trunk (torchvision format)"
  state = _load_pth(backbone, what, _fetch_hint(net))
  flat = trunk_from_state_dict(state, net, f"{what} {backbone}")
  lins = package_lins_file(net) if lins is None else lins
  what = f"LPIPS {net} linear layers"
  hint = f"it ships in pip install lpips as weights/v{LPIPS_VERSION}/{net}.pth"
  flat |= lins_from_state_dict(_load_pth(lins, what, hint), net, what)
  flat |= _scaling()
  return model_dir.unflatten(flat)


def save_params(path: str, params, inputs=()) -> None:
  """Writes LPIPS params as an ``.npz`` of "a/b" keys (no pickle),
  refusing to write over one of ``inputs``."""
  flat = model_dir.flatten(params)
  arrays = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  files.write_atomic(path, lambda f: np.savez(f, **arrays), inputs)
