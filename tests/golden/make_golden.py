"""Writes the golden codec files of tests/test_golden.py.

  python tests/golden/make_golden.py [--check]

For each family, a tiny model is initialised from a fixed key (so any
checkout rebuilds the very same params, and the file's fingerprint proves
it), an odd-sized photo is compressed with 3 decode steps, and the file and
its decoded PNG are written here. The files were made before the package
layout changed; the test decodes them with the current code and asserts
the pixels are identical. Rerun only when the file format changes on
purpose (then bump the format version).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402

from cdc_jax import codec, model_dir  # noqa: E402
from cdc_jax.models.cdc import from_config, init_params  # noqa: E402
from cdc_jax.testing import DIFFUSIONS, TINY_MODELS  # noqa: E402

FAMILIES = {f: (TINY_MODELS[f], DIFFUSIONS[f]) for f in ("eps", "x")}
STEPS, GAMMA, SEED = 3, 0.8, 12345
CROP = (slice(40, 137), slice(100, 230))  # 97 x 130: padded on both sides


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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--check", action="store_true", help="compare, do not write")
  args = p.parse_args(argv)
  ok = True
  for family in FAMILIES:
    with tempfile.TemporaryDirectory() as tmp:
      cm = codec.load(export_model(family, os.path.join(tmp, "model")))
      blob = codec.compress(cm, image(), steps=STEPS, gamma=GAMMA, seed=SEED)
      rec = codec.decompress(cm, blob)
    cdcj = os.path.join(HERE, f"{family}.cdcj")
    png = os.path.join(HERE, f"{family}.png")
    digest = hashlib.sha256(rec.tobytes()).hexdigest()[:16]
    if args.check:
      with open(cdcj, "rb") as f:
        same_file = f.read() == blob
      same_png = np.array_equal(np.asarray(Image.open(png)), rec)
      print(
        f"{family}: file identical {same_file}, pixels identical "
        f"{same_png} ({digest})"
      )
      ok &= same_file and same_png
    else:
      with open(cdcj, "wb") as f:
        f.write(blob)
      Image.fromarray(rec).save(png)
      print(f"{family}: wrote {cdcj} ({len(blob)} bytes), {png} ({digest})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
