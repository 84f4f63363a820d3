"""What a CDC state dict is: family, model config and diffusion schedule.

Nothing is taken from file names or flags: the family comes from the
context model's downsampling keys, the ``CDC`` kwargs from the tensor
shapes (so other widths and depths of the same architecture convert), and
the schedule from the ``train_*`` buffers, checked against
``cdc_jax.diffusion.reference_buffers``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from cdc_jax import diffusion
from cdc_jax.convert.errors import ConversionError, listing
from cdc_jax.convert.transforms import shape_of

# The released diffusion settings per family (docs/model.md §1).
RELEASE_DIFFUSION = {
  "eps": {"schedule": "linear", "timesteps": 20000},
  "x": {"schedule": "cosine", "timesteps": 8193},
}
BUFFER_PREFIX = "train_"


def detect_family(keys: Iterable[str]) -> str:
  """'eps' or 'x' from the context model's Downsample key
  (docs/model.md §10.4)."""
  keys = set(keys)
  eps = "context_fn.enc.0.2.conv.weight" in keys
  x = "context_fn.enc.0.1.conv.weight" in keys
  if eps == x:
    raise ConversionError(
      "cannot tell the model family: expected exactly one of "
      "context_fn.enc.0.2.conv.weight (eps) and "
      "context_fn.enc.0.1.conv.weight (x)"
    )
  family = "eps" if eps else "x"
  buffers = [k for k in keys if k.startswith(BUFFER_PREFIX)]
  if buffers and (("train_snr" in keys) != (family == "x")):
    raise ConversionError(
      f"inconsistent checkpoint: {family}-family context model keys, but "
      f"train_snr is {'present' if family == 'eps' else 'missing'}"
    )
  return family


def _shape(state: Mapping, key: str) -> tuple[int, ...]:
  if key not in state:
    raise ConversionError(f"missing key {key} (needed to infer the config)")
  shape = shape_of(state[key])
  if shape is None or len(shape) < 2:  # all keys read here are weights
    raise ConversionError(f"{key}: expected a weight tensor, got {shape}")
  return shape


def _mults(state: Mapping, pattern: str, axis: int, dim: int) -> list[int]:
  """Widths of ``pattern.format(i)`` for i = 0, 1, ... divided by dim."""
  out = []
  for i in itertools.count():
    key = pattern.format(i)
    if key not in state:
      break
    width = _shape(state, key)[axis]
    if width % dim:
      raise ConversionError(
        f"{key}: width {width} is not a multiple of dim = {dim}"
      )
    out.append(width // dim)
  if not out:
    raise ConversionError(f"missing key {pattern.format(0)}")
  return out


def infer_model_config(state: Mapping, family: str) -> dict[str, Any]:
  """``CDC`` kwargs from the tensor shapes of a state dict (JSON-able).

  dim: ``time_mlp.2`` output width; dim_mults: ``downs.*.0`` output widths;
  context/hyper mults: the encoders' output widths; context_channels: the
  last context-decoder upsampling's output; x family: the decoder stages'
  input widths give ``reverse_context_dim_mults``.
  """
  u, c = "denoise_fn", "context_fn"
  dim = _shape(state, f"{u}.time_mlp.2.weight")[0]
  channels = _shape(state, f"{u}.final_conv.1.weight")[0]
  dim_mults = _mults(state, u + ".downs.{}.0.block1.block.0.weight", 0, dim)
  ctx_mults = _mults(state, c + ".enc.{}.0.block1.block.0.weight", 0, dim)
  hyper = _mults(state, c + ".hyper_enc.{}.0.weight", 0, dim)
  slot = 2 if family == "eps" else 1
  last = len(ctx_mults) - 1
  context_channels = _shape(state, f"{c}.dec.{last}.{slot}.conv.weight")[1]
  reverse = None
  if family == "x":
    reverse = _mults(state, c + ".dec.{}.0.block1.block.0.weight", 1, dim)
  return {
    "family": family,
    "dim": int(dim),
    "dim_mults": dim_mults,
    "context_dim_mults": ctx_mults,
    "reverse_context_dim_mults": reverse,
    "hyper_dims_mults": hyper,
    "context_channels": int(context_channels),
    "channels": int(channels),
    "dtype": "float32",
  }


def check_buffers(buffers: Mapping[str, np.ndarray], family: str) -> dict:
  """Checks ``train_*`` buffers; returns the diffusion config they imply.

  T is the buffer length (release default when there are none); the
  schedule is linear for eps, cosine for x.
  """
  kind = RELEASE_DIFFUSION[family]["schedule"]
  if not buffers:
    return dict(RELEASE_DIFFUSION[family])
  lengths = {k: int(np.shape(v)[0]) for k, v in buffers.items()}
  if len(set(lengths.values())) != 1:
    raise ConversionError(f"train_* buffers differ in length: {lengths}")
  timesteps = next(iter(lengths.values()))
  ref = diffusion.reference_buffers(kind, timesteps)
  missing = sorted(set(ref) - set(buffers))
  unexpected = sorted(set(buffers) - set(ref))
  if missing or unexpected:
    raise ConversionError(
      f"train_* buffers of a {family} checkpoint: missing "
      f"{listing(missing)}, unexpected {listing(unexpected)}"
    )
  for key, want in ref.items():
    got = np.asarray(buffers[key], np.float64)
    if not np.allclose(got, want, rtol=1e-5, atol=1e-12):
      err = np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30))
      raise ConversionError(
        f"{key} does not match the {kind} schedule with T={timesteps} "
        f"(max relative error {err:.3g}); not a released {family} model?"
      )
  return {"schedule": kind, "timesteps": timesteps}
