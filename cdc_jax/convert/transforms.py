"""Layout transforms between torch tensors and Flax leaves.

A ``Transform`` converts one tensor both ways and maps a Flax leaf shape to
the torch shape it comes from; a ``Row`` of a mapping table pairs a torch
state_dict key with a Flax param path and its transform. ``to_numpy`` and
``shape_of`` read torch tensors (or arrays) without importing torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from cdc_jax.models.weights import listing


@dataclasses.dataclass(frozen=True)
class Transform:
  """A layout change between a torch tensor and a Flax leaf.

  ``to_flax`` / ``to_torch`` convert arrays; ``torch_shape`` gives the torch
  shape that a Flax leaf of a given shape comes from.
  """

  name: str
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]
  torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


# nn.Conv2d weight (O, I, kh, kw) <-> kernel (kh, kw, I, O).
CONV = Transform(
  "conv",
  lambda w: w.transpose(2, 3, 1, 0),
  lambda k: k.transpose(3, 2, 0, 1),
  lambda s: (s[3], s[2], s[0], s[1]),
)
# nn.ConvTranspose2d weight (I, O, kh, kw) <-> spatially flipped HWIO kernel
# (layers.ConvTranspose runs a stride-1 conv over the dilated input).
CONV_T = Transform(
  "conv_transpose",
  lambda w: w.transpose(2, 3, 0, 1)[::-1, ::-1],
  lambda k: k[::-1, ::-1].transpose(2, 3, 0, 1),
  lambda s: (s[2], s[3], s[0], s[1]),
)
# nn.Linear weight (out, in) <-> Dense kernel (in, out).
LINEAR = Transform("linear", lambda w: w.T, lambda k: k.T, lambda s: s[::-1])
# Biases: unchanged.
SAME = Transform("same", lambda w: w, lambda k: k, lambda s: s)
# LayerNorm g/b and the prior's _medians: (1, C, 1, 1) <-> (C,).
CHANNELS = Transform(
  "channels",
  lambda w: w.reshape(-1),
  lambda k: k.reshape(1, -1, 1, 1),
  lambda s: (1, s[0], 1, 1),
)
# FlexiblePrior affine weight: (C, 1, 1, in, out) <-> (C, in, out).
PRIOR_MATRIX = Transform(
  "prior_matrix",
  lambda w: w.reshape(w.shape[0], w.shape[3], w.shape[4]),
  lambda k: k.reshape(k.shape[0], 1, 1, k.shape[1], k.shape[2]),
  lambda s: (s[0], 1, 1, s[1], s[2]),
)
# FlexiblePrior affine bias and factor a: (C, 1, 1, 1, out) <-> (C, out).
PRIOR_VECTOR = Transform(
  "prior_vector",
  lambda w: w.reshape(w.shape[0], w.shape[4]),
  lambda k: k.reshape(k.shape[0], 1, 1, 1, k.shape[1]),
  lambda s: (s[0], 1, 1, 1, s[1]),
)


@dataclasses.dataclass(frozen=True)
class Row:
  """One tensor: torch state_dict key, Flax param path, layout transform."""

  torch_key: str
  flax_path: str
  transform: Transform


def shape_of(v) -> tuple[int, ...] | None:
  """The shape of a tensor or array; None for anything else."""
  shape = getattr(v, "shape", None)
  return None if shape is None else tuple(int(n) for n in shape)


def to_numpy(v) -> np.ndarray:
  """torch.Tensor or array-like -> numpy (floating tensors as float32)."""
  if hasattr(v, "detach"):  # a torch tensor, without importing torch
    v = v.detach().cpu()
    if v.is_floating_point():
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def key_problems(state, table) -> str:
  """ "missing ...; unexpected ..." when ``state``'s keys are not exactly
  the torch keys of ``table`` ((Row, Flax shape) pairs); "" when they
  are."""
  wanted = {r.torch_key for r, _ in table}
  missing = [r.torch_key for r, _ in table if r.torch_key not in state]
  unexpected = sorted(k for k in state if k not in wanted)
  parts = [f"missing {listing(missing)}"] if missing else []
  parts += [f"unexpected {listing(unexpected)}"] if unexpected else []
  return "; ".join(parts)


def convert_table(state, table, what: str, error) -> dict[str, np.ndarray]:
  """Flax path -> float32 array for every (Row, Flax shape) of ``table``
  from the torch ``state`` (keys checked by the caller); ``error`` (an
  exception class) when a tensor's shape is not the row's."""
  out = {}
  for row, shape in table:
    want, got = row.transform.torch_shape(shape), shape_of(state[row.torch_key])
    if got != want:
      raise error(f"{what}: {row.torch_key} has shape {got}, expected {want}")
    a = to_numpy(state[row.torch_key]).astype(np.float32)
    out[row.flax_path] = np.ascontiguousarray(row.transform.to_flax(a))
  return out
