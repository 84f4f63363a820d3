"""What a file's 16-byte fingerprint names (docs/bitstream.md).

Format v3 stores the fingerprint of the bitstream (``bitstream``): what
entropy decoding and y_hat depend on, so any decoder built on the same
bitstream decodes the file, and no other. v1 and v2 files store the whole
model's (``legacy``).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from cdc_jax import model_dir
from cdc_jax.models.cdc import from_config, to_config

# The model settings the bitstream depends on (g_a, h_a, h_s, the prior);
# the U-Net's and the context decoder's may differ between decoders.
_BITSTREAM_CONFIG = (
  "family",
  "dim",
  "context_dim_mults",
  "hyper_dims_mults",
  "channels",
)


def bitstream(model_config, params, z_tables, y_tables, scales) -> bytes:
  """The 16 bytes a v3 file stores: everything entropy coding and y_hat
  depend on (the configs of g_a, h_a, h_s and the prior, their params,
  the integer tables and the exact scale path), not the context decoder
  g_s or the U-Net, so any decoder built on the same bitstream (a
  distilled one, say) decodes the file, and no other model does."""
  full = to_config(from_config(model_config))
  cfg = {k: full[k] for k in _BITSTREAM_CONFIG}
  h = hashlib.blake2b(digest_size=16)
  h.update(b"cdcj bitstream v3 ")
  h.update(json.dumps(cfg, sort_keys=True, default=list).encode())
  flat = model_dir.flatten({"context_fn": params["context_fn"]})
  for key, v in flat.items():
    if key.startswith("context_fn/dec_"):  # g_s
      continue
    a = np.ascontiguousarray(np.asarray(v, "<f4"))
    h.update(f"{key} {a.shape}".encode())
    h.update(a.tobytes())
  for digest in (z_tables.digest(), y_tables.digest(), scales.digest()):
    h.update(digest)
  return h.digest()


def legacy(model_fp: str, z_tables, y_tables) -> bytes:
  """The 16 bytes a v1 or v2 file stores: the params and configs
  (model.json's fingerprint) and the integer tables."""
  h = hashlib.blake2b(digest_size=16)
  h.update(bytes.fromhex(model_fp))
  h.update(z_tables.digest())
  h.update(y_tables.digest())
  return h.digest()
