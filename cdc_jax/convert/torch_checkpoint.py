"""Released PyTorch checkpoints <-> cdc_jax params and model directories.

::

  file.pt --load_torch_checkpoint--> {"step", "model"[, "ema"]}
          --select_state_dict------> state dict (EMA weights by default)
          --convert_state_dict-----> Converted (configs, params, LPIPS)
          --model_dir.export-------> model directory (+ lpips_vgg.npz)

``convert_file`` runs all of it; ``to_torch_state_dict`` is the inverse of
``convert_state_dict`` (Flax params -> the released key set, schedule
buffers included), used by the tests. torch is imported only to read a
file; everything else takes numpy arrays or torch tensors alike.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cdc_jax import diffusion, files, model_check, model_dir
from cdc_jax.convert.errors import ConversionError, listing
from cdc_jax.convert.infer import (
  BUFFER_PREFIX,
  RELEASE_DIFFUSION,
  check_buffers,
  detect_family,
  infer_model_config,
)
from cdc_jax.convert.tables import (
  LPIPS_PREFIX,
  checked_table,
  lpips_aliases,
  lpips_table,
)
from cdc_jax.convert.transforms import Row, shape_of, to_numpy
from cdc_jax.models.cdc import to_config

LPIPS_FILE = model_dir.LPIPS_FILE
_EMA_PREFIX = "ema_model."
_EMA_ONLINE_PREFIX = "online_model."
_EMA_BOOKKEEPING = ("initted", "step")


@dataclasses.dataclass
class Converted:
  """The result of a conversion (everything ``model_dir.export`` needs)."""

  model_config: dict[str, Any]
  diffusion_config: dict[str, Any]
  params: dict
  lpips: dict[str, np.ndarray] | None
  source: str


def load_torch_checkpoint(path: str) -> Any:
  """``torch.load(path, map_location="cpu", weights_only=True)``."""
  try:
    import torch
  except ImportError:
    raise ConversionError(
      "converting PyTorch checkpoints needs torch: "
      "pip install -r requirements-torch.txt"
    ) from None
  problem, _ = files.input_problem(path)
  if problem:
    raise ConversionError(f"{path}: {problem}")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many kinds
    raise ConversionError(
      f"{path}: not a PyTorch checkpoint readable with weights_only=True "
      f"({_why_unreadable(e)})"
    ) from None


def load_state_dict(path: str, what: str, error, hint: str = "") -> Mapping:
  """``load_torch_checkpoint``, which must give a state dict (a mapping);
  else ``error`` (an exception class): "WHAT: why[; hint]"."""
  tail = f"; {hint}" if hint else ""
  try:
    state = load_torch_checkpoint(path)
  except ConversionError as e:
    raise error(f"{what}: {e}{tail}") from None
  if not isinstance(state, Mapping):
    raise error(
      f"{what}: {path} is not a state dict (got {type(state).__name__}){tail}"
    )
  return state


def _why_unreadable(e: Exception) -> str:
  """torch's reason, without its advice to unpickle untrusted objects."""
  text = str(e)
  if "Weights only load failed" in text:
    return (
      "it holds pickled Python objects besides tensors, which are never "
      "loaded here; save a plain state dict of tensors instead"
    )
  first = text.strip().splitlines()[0] if text.strip() else ""
  first = re.sub(r"\x1b\[[0-9;]*m", "", first)
  return f"{type(e).__name__}: {first[:200]}"


def select_state_dict(ckpt: Any, use_ema: bool = True) -> tuple[dict, str]:
  """Picks the weights of a released checkpoint; returns (state, source).

  ``ckpt["ema"]``'s ``ema_model.*`` (prefix stripped) when ``use_ema`` and
  present, else ``ckpt["model"]``; a bare state dict (``denoise_fn.*``
  keys at the top level) is accepted as is. EMA bookkeeping (``initted``,
  ``step``, ``online_model.*``) is dropped.
  """
  if not isinstance(ckpt, Mapping):
    raise ConversionError(
      f"not a CDC checkpoint: expected a dict, got {type(ckpt).__name__}"
    )
  if any(str(k).startswith("denoise_fn.") for k in ckpt):
    return dict(ckpt), "state_dict"
  ema = ckpt.get("ema")
  if use_ema and isinstance(ema, Mapping):
    n = len(_EMA_PREFIX)
    state = {k[n:]: v for k, v in ema.items() if k.startswith(_EMA_PREFIX)}
    other = [
      k
      for k in ema
      if not k.startswith((_EMA_PREFIX, _EMA_ONLINE_PREFIX))
      and k not in _EMA_BOOKKEEPING
    ]
    if other:
      raise ConversionError(
        f"unexpected keys in the checkpoint's 'ema' dict: {listing(other)}"
      )
    if state:
      return state, "ema"
  model = ckpt.get("model")
  if not isinstance(model, Mapping):
    raise ConversionError(
      "not a CDC checkpoint: no 'model' state dict (top-level keys: "
      f"{listing(sorted(map(str, ckpt)))})"
    )
  return dict(model), "model"


def _apply_table(
  state: Mapping[str, Any], table: list[tuple[Row, tuple]], what: str
) -> dict[str, np.ndarray]:
  """Checks keys and shapes against the table, then converts every tensor."""
  missing = [r.torch_key for r, _ in table if r.torch_key not in state]
  wanted = {r.torch_key for r, _ in table}
  unexpected = [k for k in state if k not in wanted]
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} keys {listing(missing)}")
    if unexpected:
      parts.append(f"unexpected {len(unexpected)} keys {listing(unexpected)}")
    raise ConversionError(f"{what}: " + "; ".join(parts))
  bad = []
  for row, shape in table:
    want = row.transform.torch_shape(shape)
    got = shape_of(state[row.torch_key])
    if got != want:
      bad.append(f"{row.torch_key}: expected {want}, got {got}")
  if bad:
    more = f"; ... ({len(bad) - 4} more)" if len(bad) > 4 else ""
    raise ConversionError(f"{what}: wrong shapes: " + "; ".join(bad[:4]) + more)
  out = {}
  for row, _ in table:
    a = to_numpy(state[row.torch_key]).astype(np.float32)
    out[row.flax_path] = np.ascontiguousarray(row.transform.to_flax(a))
  return out


def _convert_lpips(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """LPIPS-VGG weights; the ``lins.{i}`` aliases must equal ``lin{i}``."""
  state = dict(state)
  for alias, key in lpips_aliases().items():
    if alias in state and key in state:
      a, b = to_numpy(state.pop(alias)), to_numpy(state[key])
      if a.shape != b.shape or not np.array_equal(a, b):
        raise ConversionError(f"{alias} differs from {key}")
  return _apply_table(state, lpips_table(), "LPIPS weights (loss_fn_vgg)")


def convert_state_dict(
  state: Mapping[str, Any], family: str | None = None, source: str = ""
) -> Converted:
  """A CDC state dict (numpy arrays or torch tensors) -> ``Converted``.

  ``family`` ('eps' / 'x') is detected when None and checked when given.
  ``train_*`` buffers are checked against the schedule, ``loss_fn_vgg.*``
  (LPIPS) goes to ``Converted.lpips``; every other tensor must map to
  exactly one Flax leaf.
  """
  detected = detect_family(state)
  if family is not None and family != detected:
    raise ConversionError(
      f"--family {family} given, but the checkpoint is a {detected} model"
    )
  buffers = {
    k: to_numpy(v) for k, v in state.items() if k.startswith(BUFFER_PREFIX)
  }
  lpips_state = {k: v for k, v in state.items() if k.startswith(LPIPS_PREFIX)}
  model_state = {
    k: v
    for k, v in state.items()
    if not k.startswith((BUFFER_PREFIX, LPIPS_PREFIX))
  }
  diffusion_config = check_buffers(buffers, detected)
  model_config = infer_model_config(model_state, detected)
  try:
    table = checked_table(model_config)
  except (ValueError, TypeError) as e:  # the model rejects the config
    raise ConversionError(f"inconsistent model shapes: {e}") from None
  flat = _apply_table(model_state, table, f"{detected} model")
  lpips = _convert_lpips(lpips_state) if lpips_state else None
  params = model_dir.unflatten(flat)
  return Converted(model_config, diffusion_config, params, lpips, source)


def convert_checkpoint(
  ckpt: Any, family: str | None = None, use_ema: bool = True
) -> Converted:
  """A loaded checkpoint object (``torch.load`` result) -> ``Converted``."""
  state, source = select_state_dict(ckpt, use_ema)
  return convert_state_dict(state, family, source)


def convert_file(
  path: str,
  out_dir: str,
  family: str | None = None,
  use_ema: bool = True,
  overwrite: bool = False,
) -> tuple[Converted, str]:
  """Converts ``path`` into the model directory ``out_dir`` (with
  ``out_dir/lpips_vgg.npz`` when the checkpoint has LPIPS weights).

  ``out_dir`` must be new or empty, or (``overwrite``) a model directory,
  of which only the model's files are replaced (``model_dir.export``);
  that is checked before the checkpoint is read. Returns the conversion
  and the model fingerprint.
  """
  model_dir.check_export_target(out_dir, overwrite)
  conv = convert_checkpoint(load_torch_checkpoint(path), family, use_ema)
  flat = model_dir.flatten(conv.params)
  flat |= {f"lpips/{k}": v for k, v in (conv.lpips or {}).items()}
  model_check.check_finite(
    path, flat, ConversionError, "the checkpoint's weights are not usable"
  )
  desc = f"{os.path.basename(path)} ({conv.source} weights)"
  fp = model_dir.export(
    out_dir,
    conv.model_config,
    conv.diffusion_config,
    conv.params,
    source=f"cdc_jax.convert: {desc}",
    overwrite=overwrite,
    extra={LPIPS_FILE: conv.lpips} if conv.lpips is not None else None,
  )
  return conv, fp


def to_torch_state_dict(
  params, model_config, diffusion_config: Mapping | None = None
) -> dict[str, np.ndarray]:
  """Flax params -> the released torch state_dict (numpy, released order).

  ``diffusion_config`` ({"schedule", "timesteps"}) defaults to the release
  of ``model_config["family"]``; its ``train_*`` buffers come first, as in
  the released files.
  """
  family = to_config(model_config)["family"]
  dcfg = diffusion_config or RELEASE_DIFFUSION[family]
  buffers = diffusion.reference_buffers(dcfg["schedule"], dcfg["timesteps"])
  order = ["train_snr"] if "train_snr" in buffers else []
  order += [k for k in buffers if k != "train_snr"]
  out = {k: buffers[k] for k in order}
  flat = model_dir.flatten(params)
  for row, shape in checked_table(model_config):
    a = np.asarray(flat[row.flax_path], np.float32)
    if a.shape != shape:
      raise ValueError(f"{row.flax_path}: expected {shape}, got {a.shape}")
    out[row.torch_key] = np.ascontiguousarray(row.transform.to_torch(a))
  return out
