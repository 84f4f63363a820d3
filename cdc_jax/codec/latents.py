"""The latents of one image: symbols, their tables, and back.

::

  x --g_a--> y --h_a--> z;  z_sym = Q(z - medians)    per-channel tables
  mu = h_s(z_sym + medians)                           float32, jitted
  y_sym = Q(y - mu)       the Gaussian table of index scales(z_sym): h_s's
                          sigma in exact integer arithmetic (format v3)

``encode_latents`` computes them, ``entropy_encode`` range-codes them into
one stream (z, then y), ``decode_symbols`` reads them back from a file's
stream and ``decode_latents`` gives y_hat = y_sym + mu.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import cdc_jax.codec.tiled_analysis as tiled_analysis
from cdc_jax.codec.errors import CodecError
from cdc_jax.codec.geometry import padded_size
from cdc_jax.codec.model import CodecModel
from cdc_jax.coding import container, range_coder
from cdc_jax.coding import tables as coding_tables
from cdc_jax.coding.errors import BitstreamError

# -- latents ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Latents:
  """What the range coder codes: symbols and the indexes of their tables."""

  z_sym: np.ndarray  # int32 [1, H/64, W/64, Cz]
  y_sym: np.ndarray  # int32 [1, H/16, W/16, Cy]
  y_indexes: np.ndarray  # int32, like y_sym: the y coding tables
  estimated_bits: float  # the model's -log2 likelihood of the symbols


def encode_latents(
  cm: CodecModel, x, tile=None, version: int = container.FORMAT_VERSION
) -> Latents:
  """x [1, H, W, 3] in [-1, 1] (padded) -> symbols: g_a, h_a, Q, h_s, Q,
  and y's tables as a file of ``version`` chooses them. With ``tile``
  (core height, width in pixels) g_a runs in tiles of bounded memory
  (``codec.tiled_analysis``), the rest on the whole y."""
  if tile is None:
    y, z_sym = cm.analyze(cm.params, jnp.asarray(x))
  else:
    y, z_sym = tiled_analysis.analyze(cm, x, tile)
  mu, sigma = cm.hyper(cm.params, z_sym)
  y_sym = cm.y_symbols(y, offset=mu)
  bits = cm.estimate_bits(cm.params, z_sym, y_sym, mu, sigma)
  z_sym = np.asarray(z_sym)
  idx = cm.y_indexes(z_sym, sigma, version)
  return Latents(z_sym, np.asarray(y_sym), idx, float(bits))


def entropy_encode(cm: CodecModel, latents: Latents) -> np.ndarray:
  """One range-coded stream (uint32 words): z, then y."""
  enc = range_coder.Encoder()
  z = latents.z_sym
  enc.encode(z, coding_tables.channel_indexes(z.shape), cm.z_tables)
  enc.encode(latents.y_sym, latents.y_indexes, cm.y_tables)
  return enc.get_words()


def decode_symbols(cm: CodecModel, header: container.Header, stream: bytes):
  """The stream of one file -> (z_sym, y_sym, mu): the symbols (numpy,
  the same on every machine for a v3 file) and y's float32 means."""
  f = cm.downsampling_factor
  hp, wp = padded_size(header.height, header.width, f)
  zshape = cm.model.latent_shapes(1, hp, wp)["z"]
  try:
    dec = range_coder.Decoder(stream)
    z_sym = dec.decode(coding_tables.channel_indexes(zshape), cm.z_tables)
    mu, sigma = cm.hyper(cm.params, jnp.asarray(z_sym))
    idx = cm.y_indexes(z_sym, sigma, header.version)
    y_sym = dec.decode(idx, cm.y_tables)
  except BitstreamError as e:
    raise CodecError(str(e)) from None
  return z_sym, y_sym, mu


def decode_latents(cm: CodecModel, header: container.Header, stream: bytes):
  """The stream of one file -> y_hat [1, H/16, W/16, C] (device array)."""
  _, y_sym, mu = decode_symbols(cm, header, stream)
  return jnp.asarray(y_sym).astype(jnp.float32) + mu
