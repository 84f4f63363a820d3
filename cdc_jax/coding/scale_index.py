"""Exact scale indexes: the scale branch of h_s in integer arithmetic.

Each y symbol is coded with the Gaussian table of the smallest table scale
>= sigma, and sigma comes from the hyper-decoder h_s. Computed in float32
on a device, sigma differs in its last bits between backends, CPU ISAs,
XLA flags and device counts, and one element whose sigma lands on the
other side of a table boundary desynchronises the range decoder. Here the
indexes are computed from z's integer symbols by an integer version of the
same network, exact by construction, so encoder and decoder agree on every
machine (format v3, docs/bitstream.md; mu stays on the float path: it only
shifts y_hat, never a symbol).

The arithmetic (constants below)::

  activations   int64 A, the value A * 2**-ACT_FRAC, |A| <= ACT_MAX
                (saturating)
  weights       per output channel c: W = rint(w * 2**e_c), the exponent
                e_c in [0, EXP_MAX] chosen so that |W| <= 2**WEIGHT_BITS
  a layer       acc_c = sum(A * W) + B_c, B_c = rint(b_c * 2**(ACT_FRAC +
                e_c)): per kernel tap and per block of <= BLOCK input
                channels a float64 matmul, exact because every partial
                sum is an integer of magnitude <= BLOCK * ACT_MAX *
                2**WEIGHT_BITS = 2**52 (IEEE doubles hold such integers
                exactly, in any summation order, with or without FMA),
                then summed in int64
  hidden        A' = clip(leaky(round(acc_c / 2**e_c)), +-ACT_MAX), leaky
                (v) = v if v >= 0 else -round(-v / 5)   (slope 0.2)
  scales        index = #{j : table_j < max(acc_c * 2**-(ACT_FRAC + e_c),
                scale_min)}, clamped to the last table, as integer
                comparisons: acc > t  <=>  acc > floor(t) for integer acc

Numpy only (float64 BLAS for the matmuls); no jax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import numpy as np

ACT_FRAC = 16  # fractional bits of an activation
ACT_MAX = 2**30  # activations saturate at +-ACT_MAX (+-16384.0)
WEIGHT_BITS = 14  # |integer weight| <= 2**WEIGHT_BITS
EXP_MAX = 40  # largest weight exponent (weights below 2**-26 lose bits)
BLOCK = 256  # input channels per exact float64 matmul
Z_MAX = 2**13  # z symbols saturate at +-Z_MAX
_BIAS_MAX = 2**60
_THRESHOLD_MAX = 2**62
_MAX_TAPS_X_BLOCKS = 256  # keeps the int64 accumulator below 2**62
assert BLOCK * ACT_MAX * 2**WEIGHT_BITS <= 2**53  # exact float64 sums
VERSION = 1  # of this arithmetic; part of the digest


@dataclasses.dataclass(frozen=True)
class IntConv:
  """A convolution of a dilated, padded input, in integers.

  ``out[s * a + lo - k] += x[a] @ kernel[k]`` along each spatial axis
  (``lax.conv_general_dilated`` with ``lhs_dilation=s``, padding ``(lo,
  hi)``: a stride-1 conv when s = 1, a transposed conv when s > 1).
  """

  kernel: np.ndarray  # float64 holding integers, [k, k, Cin, Cout]
  bias: np.ndarray  # int64 [Cout], at scale 2**-(ACT_FRAC + exponent)
  exponent: np.ndarray  # int64 [Cout]
  dilation: int
  padding: tuple[int, int]

  @classmethod
  def quantize(cls, kernel, bias, dilation: int, padding) -> IntConv:
    """A float conv (HWIO kernel, bias) -> its integer version."""
    kernel = np.asarray(kernel, np.float64)
    bias = np.asarray(bias, np.float64)
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
      raise ValueError(f"expected a [k, k, Cin, Cout] kernel: {kernel.shape}")
    if bias.shape != kernel.shape[-1:]:
      raise ValueError(f"bias {bias.shape} does not match {kernel.shape}")
    k, cin = kernel.shape[0], kernel.shape[2]
    if k * k * math.ceil(cin / BLOCK) > _MAX_TAPS_X_BLOCKS:
      raise ValueError(f"a {k}x{k} kernel over {cin} channels is too large")
    if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
      raise ValueError("the hyper-decoder's weights are not all finite")
    _, x = np.frexp(np.max(np.abs(kernel), axis=(0, 1, 2)))
    e = np.clip(WEIGHT_BITS - x.astype(np.int64), 0, EXP_MAX)
    w = np.clip(np.rint(np.ldexp(kernel, e)), -(2**WEIGHT_BITS), 2**WEIGHT_BITS)
    b = np.clip(np.rint(np.ldexp(bias, ACT_FRAC + e)), -_BIAS_MAX, _BIAS_MAX)
    lo, hi = (int(p) for p in padding)
    return cls(w, b.astype(np.int64), e, int(dilation), (lo, hi))

  def __call__(self, a: np.ndarray) -> np.ndarray:
    """int64 activations [B, H, W, Cin] -> int64 accumulators."""
    b, h, w, cin = a.shape
    k, cout = self.kernel.shape[0], self.kernel.shape[-1]
    s, (lo, hi) = self.dilation, self.padding
    oh = s * (h - 1) + 1 + lo + hi - k + 1
    ow = s * (w - 1) + 1 + lo + hi - k + 1
    out = np.empty((b, oh, ow, cout), np.int64)
    out[...] = self.bias
    rows = a.reshape(-1, cin).astype(np.float64)
    for c0 in range(0, cin, BLOCK):
      block = rows[:, c0 : c0 + BLOCK]
      for ky in range(k):
        ys = _span(h, s, lo - ky, oh)
        for kx in range(k):
          xs = _span(w, s, lo - kx, ow)
          if ys is None or xs is None:
            continue
          p = block @ self.kernel[ky, kx, c0 : c0 + BLOCK]
          p = p.reshape(b, h, w, cout)[:, ys[0] : ys[1], xs[0] : xs[1]]
          out[:, ys[2] : ys[3] : s, xs[2] : xs[3] : s] += p.astype(np.int64)
    return out


def _span(n: int, s: int, off: int, out: int):
  """Inputs a in [a0, a1) whose output s * a + off is in [0, out), and
  their outputs' range [i0, i1); None if none."""
  a0 = max(0, -(off // s))  # ceil(-off / s)
  a1 = min(n, (out - 1 - off) // s + 1)
  if a1 <= a0:
    return None
  return a0, a1, s * a0 + off, s * (a1 - 1) + off + 1


def _round_shift(acc: np.ndarray, e: np.ndarray) -> np.ndarray:
  """round(acc / 2**e) (halves up), per channel (last axis)."""
  half = np.where(e > 0, np.left_shift(np.int64(1), np.maximum(e - 1, 0)), 0)
  return np.right_shift(acc + half, e)


def _leaky(v: np.ndarray) -> np.ndarray:
  return np.where(v >= 0, v, -((2 - v) // 5))


class ScaleIndexer:
  """z symbols -> the y coding tables' indexes, exactly.

  ``hidden`` are h_s's layers before the last (each followed by the
  leaky ReLU), ``scale`` the last layer restricted to the scale channels;
  ``medians`` z's per-channel medians (z_hat = z_sym + median).
  """

  def __init__(
    self,
    hidden: Sequence[IntConv],
    scale: IntConv,
    medians,
    scale_table,
    scale_min: float,
  ):
    medians = np.asarray(medians, np.float64)
    table = np.asarray(scale_table, np.float64)
    if not (np.all(np.isfinite(medians)) and np.all(np.isfinite(table))):
      raise ValueError("the medians or the scale table are not all finite")
    if table.ndim != 1 or table.size < 1 or np.any(np.diff(table) <= 0):
      raise ValueError("the scale table must increase strictly")
    self.hidden, self.scale = list(hidden), scale
    m = np.rint(np.ldexp(medians, ACT_FRAC))
    self.medians = np.clip(m, -ACT_MAX, ACT_MAX).astype(np.int64)
    shift = ACT_FRAC + scale.exponent[:, None]  # [C, 1]
    t = np.floor(np.ldexp(table[None, :], shift))  # [C, n]
    t = np.clip(t, -_THRESHOLD_MAX, _THRESHOLD_MAX)
    self.thresholds = t.astype(np.int64)
    self.n_tables = table.size
    # sigma = max(raw, scale_min) in float32, as the float path clamps.
    floor = np.float64(np.float32(scale_min))
    self.floor_index = int(np.searchsorted(table, floor, side="left"))

  def __call__(self, z_sym) -> np.ndarray:
    """int z symbols [B, h, w, Cz] -> int32 table indexes [B, H, W, C]."""
    z = np.clip(np.asarray(z_sym, np.int64), -Z_MAX, Z_MAX)
    a = np.clip(np.left_shift(z, ACT_FRAC) + self.medians, -ACT_MAX, ACT_MAX)
    for layer in self.hidden:
      a = _leaky(_round_shift(layer(a), layer.exponent))
      a = np.clip(a, -ACT_MAX, ACT_MAX)
    acc = self.scale(a)
    idx = np.empty(acc.shape, np.int32)
    for c in range(acc.shape[-1]):
      idx[..., c] = np.searchsorted(self.thresholds[c], acc[..., c], "left")
    np.maximum(idx, self.floor_index, out=idx)
    return np.minimum(idx, self.n_tables - 1, out=idx)

  def digest(self) -> bytes:
    """16 bytes naming this exact function (arithmetic and integers)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(
      f"scale_index v{VERSION} {ACT_FRAC} {ACT_MAX} {WEIGHT_BITS} {EXP_MAX} "
      f"{BLOCK} {Z_MAX} {self.floor_index} {self.n_tables}".encode()
    )
    for layer in (*self.hidden, self.scale):
      h.update(f"{layer.dilation} {layer.padding}".encode())
      for arr in (layer.kernel.astype(np.int64), layer.bias, layer.exponent):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr, "<i8").tobytes())
    for arr in (self.medians, self.thresholds):
      h.update(np.ascontiguousarray(arr, "<i8").tobytes())
    return h.digest()
