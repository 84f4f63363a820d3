"""A model's integer coding tables, computed once and stored with it.

z: for each channel, the factorized prior's bin probabilities on the
integer grid around its median, from the tail_mass/2 to the
1 - tail_mass/2 quantile; y: zero-mean Gaussian tables for 64 log-spaced
scales from 0.1 (the model's scale floor) to 256. The integer tables
(``cdc_jax.coding.tables``) are the contract between encoder and decoder:
both sides read the same stored integers.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cdc_jax.coding import scale_index
from cdc_jax.coding import tables as coding_tables
from cdc_jax.models.cdc import CDC
from cdc_jax.models.context_model import SCALE_MIN, h_s_layers

Z_TAIL_MASS = 1e-9
Z_SEARCH = 2048  # the hyperprior's support is searched in +-Z_SEARCH


def build(model: CDC, params) -> dict[str, np.ndarray]:
  """The tables of ``model`` with ``params`` as plain arrays (``.npz``)."""
  z_tables = factorized_z_tables(model, params)
  scale_table = coding_tables.gaussian_scale_table()
  y_tables = coding_tables.gaussian_tables(scale_table)
  out = {}
  out.update(z_tables.to_arrays("z_"))
  out.update(y_tables.to_arrays("y_"))
  out["y_scale_table"] = scale_table
  return out


def factorized_z_tables(model: CDC, params) -> coding_tables.TableSet:
  """One table per channel of z, on the integer grid about its median."""
  variables = {"params": params}
  med = np.asarray(model.apply(variables, method=CDC.medians), np.float64)
  c = med.shape[0]
  grid = np.arange(-Z_SEARCH, Z_SEARCH + 1, dtype=np.float32)  # [G]
  u = (med[None, :] + grid[:, None]).astype(np.float32)  # [G, C]

  def cdf(v):
    logits = model.apply(variables, jnp.asarray(v), method=CDC.z_logits_cdf)
    return _sigmoid(np.asarray(logits, np.float64))

  cdf_hi = cdf(u + 0.5)  # P(z < m + k + 0.5)
  cdf_lo = cdf(u - 0.5)
  lo = np.empty(c, np.int64)
  hi = np.empty(c, np.int64)
  for ch in range(c):
    below = np.flatnonzero(cdf_lo[:, ch] < Z_TAIL_MASS / 2)
    above = np.flatnonzero(cdf_hi[:, ch] > 1 - Z_TAIL_MASS / 2)
    lo[ch] = below[-1] if below.size else 0
    hi[ch] = above[0] if above.size else len(grid) - 1
  width = int(np.max(hi - lo) + 1)
  pmfs = np.zeros((c, width))
  offsets = np.zeros(c, np.int32)
  for ch in range(c):
    start = min(lo[ch], len(grid) - width)
    rows = slice(start, start + width)
    pmfs[ch] = np.abs(cdf_hi[rows, ch] - cdf_lo[rows, ch])
    offsets[ch] = int(grid[start])
  return coding_tables.factorized_tables(pmfs, offsets)


def _sigmoid(v):
  return 0.5 * (1.0 + np.tanh(0.5 * v))


def table_sets(arrays):
  """(z tables, y tables, y scale table) from stored arrays."""
  return (
    coding_tables.TableSet.from_arrays(arrays, "z_"),
    coding_tables.TableSet.from_arrays(arrays, "y_"),
    np.asarray(arrays["y_scale_table"], np.float64),
  )


def scale_indexer(params, scale_table) -> scale_index.ScaleIndexer:
  """The exact integer version of h_s's sigma branch for ``params``
  (``coding.scale_index``): what picks each y symbol's table. A
  ValueError if the weights, medians or scale table are unusable."""
  cf = params["context_fn"]
  *hidden, last = h_s_layers(cf)
  c = last[0].shape[-1] // 2  # the channels after mu's are sigma's
  return scale_index.ScaleIndexer(
    [scale_index.IntConv.quantize(*layer) for layer in hidden],
    scale_index.IntConv.quantize(last[0][..., c:], last[1][c:], *last[2:]),
    np.asarray(cf["prior"]["medians"]),
    scale_table,
    SCALE_MIN,
  )
