"""Decodes files' symbols in a fresh process, for tests/test_portable_decode.

  PYTHONPATH=. python tests/decode_symbols.py MODEL_DIR FILE... > results.json

Prints, per file, the SHA-256 of the decoded z and y symbols, of the y
tables' indexes, and of the float32 sigma of h_s (which is allowed to
differ between XLA settings: the indexes must not). Run under the XLA
settings under test (XLA_FLAGS, JAX_DEFAULT_MATMUL_PRECISION, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

from cdc_jax import codec


def digest(*arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:32]


def main(argv) -> int:
  cm = codec.load(argv[0])
  out = {}
  for path in argv[1:]:
    with open(path, "rb") as f:
      header, stream = codec.parse(cm, f.read())
    z_sym, y_sym, _ = codec.decode_symbols(cm, header, stream)
    _, sigma = cm.hyper(cm.params, jnp.asarray(z_sym))
    idx = cm.y_indexes(z_sym, sigma, header.version)
    out[os.path.basename(path)] = {
      "symbols": digest(z_sym, y_sym),
      "indexes": digest(idx),
      "sigma": digest(np.asarray(sigma)),
    }
  json.dump(out, sys.stdout)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
