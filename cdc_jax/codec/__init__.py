"""Image <-> bytes: the CDC codec (CLI: ``python -m cdc_jax.codec``).

::

  image --pad--> x --g_a--> y --h_a--> z --Q--> z_sym    (codec.latents)
  y_sym = Q(y - mu), mu = h_s(z_sym + medians); each y symbol coded with
  the table that the exact integer path picks from z_sym   (coding.scale_index)
  file = header (size, steps, gamma, seed, sampler, tiles) + range-coded
  z and y + CRC                                            (coding.container)

  file --parse, limits--> symbols --> y_hat --g_s--> context --sampler
  from x_T = gamma * N(0, I; seed)--> x_0 --crop--> uint8  (codec.files)

The modules: ``model`` (``load``: a model directory or workdir ready to
code), ``latents`` (symbols and their tables), ``files`` (compress,
decompress, the one decode path), ``geometry`` (padding), ``limits``
(what a file may ask of the decoder), ``memory`` (the decode's memory
estimate and budget), ``tiling``
(bounded-memory decoding), ``tiled_analysis`` (bounded-memory encoding),
``fingerprint`` (what a file's fingerprint names), ``cli``. A file decodes
to the same symbols on every machine (docs/bitstream.md, "Decode
contract"). This package only re-exports the API.
"""

from cdc_jax.codec.errors import CodecError
from cdc_jax.codec.files import (
  DEFAULT_GAMMA,
  DEFAULT_STEPS,
  FAMILY_IDS,
  Compressed,
  compress,
  compress_image,
  decompress,
  decompress_many,
  noise_shape,
  parse,
  sampler_of,
  to_image,
)
from cdc_jax.codec.geometry import pad_image, padded_size
from cdc_jax.codec.latents import (
  Latents,
  decode_latents,
  decode_symbols,
  encode_latents,
  entropy_encode,
)
from cdc_jax.codec.limits import (
  DEFAULT_MAX_PIXELS,
  DEFAULT_MAX_STEPS,
  MAX_PIXELS,
  MAX_SIDE,
  Limits,
  check_size,
)
from cdc_jax.codec.model import (
  PRECISIONS,
  CodecModel,
  from_loaded,
  load,
  with_precision,
)

__all__ = [
  "DEFAULT_GAMMA",
  "DEFAULT_MAX_PIXELS",
  "DEFAULT_MAX_STEPS",
  "DEFAULT_STEPS",
  "FAMILY_IDS",
  "MAX_PIXELS",
  "MAX_SIDE",
  "PRECISIONS",
  "CodecError",
  "CodecModel",
  "Compressed",
  "Latents",
  "Limits",
  "check_size",
  "compress",
  "compress_image",
  "decode_latents",
  "decode_symbols",
  "decompress",
  "decompress_many",
  "encode_latents",
  "entropy_encode",
  "from_loaded",
  "load",
  "noise_shape",
  "pad_image",
  "padded_size",
  "parse",
  "sampler_of",
  "to_image",
  "with_precision",
]
