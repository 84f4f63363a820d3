"""Writes and checks the golden codec files of tests/test_golden.py.

  PYTHONPATH=. python tests/golden/make_golden.py [--check] [--report FILE]

For each family, a tiny model is initialised from numpy draws with a
fixed seed (so any checkout rebuilds the very same params, and the file's
fingerprint proves it), an odd-sized photo is compressed with 3 decode
steps, and the file, its decoded PNG and the digest of its symbols are
written here (``golden.json``). ``{family}.cdcj`` are format v1 files,
written by an earlier cdc_jax and kept as they are; ``{family}_v3.cdcj``
are the current format.

``--check`` decodes every golden file with the current code and prints,
per file: whether the decoded symbols are identical (the portable part of
the decode contract: exact on every machine for v3), whether the
entropy coder re-encodes them to the identical stream, and how far the
pixels are from the stored PNG (pixels are identical on the platform and
settings that wrote them; elsewhere within the contract's tolerance).
``--report FILE`` also writes those results as JSON. Rerun without
``--check`` only when the format changes on purpose (then bump the
format version).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

import jax
import numpy as np
import skimage.data
from PIL import Image

from cdc_jax import codec, model_dir
from cdc_jax.coding.range_coder import words_to_bytes
from cdc_jax.models.cdc import from_config, init_params
from cdc_jax.testing import DIFFUSIONS, TINY_MODELS

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = {f: (TINY_MODELS[f], DIFFUSIONS[f]) for f in ("eps", "x")}
STEPS, GAMMA, SEED = 3, 0.8, 12345
CROP = (slice(40, 137), slice(100, 230))  # 97 x 130: padded on both sides
DIGESTS = os.path.join(HERE, "golden.json")
LEGACY = "{family}.cdcj"  # format v1, kept
CURRENT = "{family}_v3.cdcj"


def image() -> np.ndarray:
  return np.ascontiguousarray(skimage.data.chelsea()[CROP])


def numpy_params(model, seed: int = 7) -> dict:
  """Params drawn with numpy in the model's shapes.

  Not ``model.init``: XLA may contract the init's multiply-adds
  differently under other compile options, and the golden model must be
  the same bits everywhere (its fingerprint is in the files).
  """
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    if len(shape) >= 2:  # kernels: torch-like uniform over the fan-in
      bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
      return rng.uniform(-bound, bound, shape).astype(np.float32)
    if "scale" in name:  # LayerNorm gains near 1
      return (1.0 + rng.uniform(-0.1, 0.1, shape)).astype(np.float32)
    return rng.uniform(-0.1, 0.1, shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def export_model(family: str, directory: str) -> str:
  """The golden model of ``family`` as a model directory."""
  model_config, diffusion_config = FAMILIES[family]
  model = from_config(model_config)
  params = numpy_params(model)
  model_dir.export(
    directory, model_config, diffusion_config, params, source="golden"
  )
  return directory


def symbols_digest(z_sym, y_sym) -> str:
  h = hashlib.sha256()
  for a in (z_sym, y_sym):
    h.update(np.ascontiguousarray(a, "<i4").tobytes())
  return h.hexdigest()[:32]


def check_file(cm, name: str, expected: str) -> dict:
  """Decodes the golden file ``name``; compares it with what is stored."""
  with open(os.path.join(HERE, name), "rb") as f:
    blob = f.read()
  header, stream = codec.parse(cm, blob)
  z_sym, y_sym, sigma = _symbols_and_sigma(cm, header, stream)
  latents = codec.Latents(
    z_sym, y_sym, cm.y_indexes(z_sym, sigma, header.version), 0.0
  )
  restream = words_to_bytes(codec.entropy_encode(cm, latents))
  rec = codec.decompress(cm, blob)
  png = np.asarray(Image.open(os.path.join(HERE, name[:-5] + ".png")))
  diff = np.abs(rec.astype(np.int16) - png.astype(np.int16))
  return {
    "file": name,
    "version": header.version,
    "symbols_identical": symbols_digest(z_sym, y_sym) == expected,
    "stream_identical": restream == stream,
    "pixels_identical": bool(np.all(diff == 0)),
    "max_level_diff": int(diff.max()),
    "pixels_differing": float(np.mean(np.any(diff > 0, axis=-1))),
  }


def _symbols_and_sigma(cm, header, stream):
  z_sym, y_sym, _ = codec.decode_symbols(cm, header, stream)
  _, sigma = cm.hyper(cm.params, z_sym)
  return z_sym, y_sym, np.asarray(sigma)


def write(cm, family: str, digests: dict) -> None:
  """Writes the family's current-format golden file, PNG and digest."""
  blob = codec.compress(cm, image(), steps=STEPS, gamma=GAMMA, seed=SEED)
  name = CURRENT.format(family=family)
  with open(os.path.join(HERE, name), "wb") as f:
    f.write(blob)
  Image.fromarray(codec.decompress(cm, blob)).save(
    os.path.join(HERE, name[:-5] + ".png")
  )
  for n in (name, LEGACY.format(family=family)):
    with open(os.path.join(HERE, n), "rb") as f:
      header, stream = codec.parse(cm, f.read())
    z_sym, y_sym, _ = codec.decode_symbols(cm, header, stream)
    digests[n] = symbols_digest(z_sym, y_sym)
  print(f"{family}: wrote {name} ({len(blob)} bytes)")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--check", action="store_true", help="compare, do not write")
  p.add_argument("--report", help="write the check's results (JSON) here")
  args = p.parse_args(argv)
  digests = {}
  if args.check:
    with open(DIGESTS) as f:
      digests = json.load(f)
  results = []
  for family in FAMILIES:
    with tempfile.TemporaryDirectory() as tmp:
      cm = codec.load(export_model(family, os.path.join(tmp, "model")))
      if not args.check:
        write(cm, family, digests)
        continue
      for name in (LEGACY, CURRENT):
        name = name.format(family=family)
        results.append(check_file(cm, name, digests[name]))
        print(json.dumps(results[-1]))
  if not args.check:
    with open(DIGESTS, "w") as f:
      json.dump(digests, f, indent=2, sort_keys=True)
  elif args.report:
    with open(args.report, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
