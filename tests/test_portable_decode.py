"""A file decodes to the same symbols on every machine (format v3).

The failure mode first, on the full released eps architecture (entropy
model calibrated with ``cdc_jax.testing``): choosing each y element's
table from the float32 sigma of h_s breaks when the decoder's sigma
differs from the encoder's by a relative 1e-6 to 1e-5 (what another
backend, CPU ISA or XLA flag gives), because a few of ~300,000 elements
sit that close to a table boundary and one changed table desynchronises
the range decoder. The exact integer path (``coding.scale_index``) reads
only z's symbols, so the same perturbation changes nothing.

Then the decoded symbols and table indexes of the same files, decoded in
fresh processes under different XLA settings, must be identical (float32
sigma itself may differ; the tests print whether it did).
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import codec, model_dir, testing
from cdc_jax.coding import container, range_coder
from cdc_jax.coding import tables as coding_tables
from cdc_jax.coding.errors import BitstreamError
from cdc_jax.imageio import to_float
from cdc_jax.models.cdc import CDC, init_params, to_config
from cdc_jax.models.context_model import SCALE_MIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (448, 640)  # padded coffee; one g_a compile for both photos
# Relative perturbations of sigma, smallest first: float32 convolutions on
# other backends differ by about this much.
PERTURBATIONS = (1e-6, -1e-6, 2e-6, -2e-6, 5e-6, -5e-6, 1e-5, -1e-5)
# The settings a decoder may run under; the symbols must not care.
SETTINGS = {
  "default": {},
  "8 devices": {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
  "optimisation 0": {"XLA_FLAGS": "--xla_backend_optimization_level=0"},
  "bf16 matmuls": {"JAX_DEFAULT_MATMUL_PRECISION": "bfloat16"},
  "SSE4.2 ISA": {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"},
}


def _photos():
  h, w = SHAPE
  coffee = codec.pad_image(testing.photo("coffee"), 64)
  moto = testing.photo("motorcycle_left", (h, w), 30, 60)
  assert coffee.shape[:2] == moto.shape[:2] == SHAPE
  return {"coffee": coffee, "motorcycle": moto}


@pytest.fixture(scope="module")
def full():
  """The full eps context model and two photos encoded as v3 latents."""
  photos = _photos()
  cm = testing.entropy_codec(CDC(), photos["coffee"])
  encoded = {}
  for name, img in photos.items():
    latents = codec.encode_latents(cm, to_float(img)[None])
    mu, sigma = cm.hyper(cm.params, jnp.asarray(latents.z_sym))
    encoded[name] = (latents, np.asarray(mu), np.asarray(sigma))
  return cm, encoded


def _perturbed(sigma, d):
  """sigma as a decoder that computed h_s slightly differently sees it
  (the perturbation acts before the clamp at 0.1, as rounding would)."""
  return np.maximum(sigma * np.float32(1 + d), np.float32(SCALE_MIN))


def _decodes(stream, z_shape, y_idx, cm):
  """The y symbols the range decoder reads with ``y_idx``, or None."""
  try:
    dec = range_coder.Decoder(stream)
    dec.decode(coding_tables.channel_indexes(z_shape), cm.z_tables)
    return dec.decode(y_idx, cm.y_tables)
  except BitstreamError:
    return None


def test_float32_scale_indexes_break_under_a_tiny_perturbation(full):
  cm, encoded = full
  broken = []
  for name, (latents, _, sigma) in encoded.items():
    # A legacy (v1/v2) encoder: tables from the float32 sigma.
    idx = cm.y_indexes(latents.z_sym, sigma, container.LEGACY_VERSIONS[0])
    stream = range_coder.words_to_bytes(
      codec.entropy_encode(
        cm, codec.Latents(latents.z_sym, latents.y_sym, idx, 0.0)
      )
    )
    for d in PERTURBATIONS:
      moved = coding_tables.scale_indexes(_perturbed(sigma, d), cm.scale_table)
      flips = int(np.sum(moved != idx))
      if flips:
        y = _decodes(stream, latents.z_sym.shape, moved, cm)
        ok = y is not None and np.array_equal(y, latents.y_sym)
        broken.append((name, d, flips, ok))
        break
  print(f"\nfirst perturbation that moves a table: {broken}")
  assert broken, "no element moved table under a relative 1e-5"
  assert all(abs(d) <= 1e-5 for _, d, _, _ in broken)
  # One moved table is enough: those decodes fail or give other symbols.
  assert not any(ok for *_, ok in broken)


def test_exact_scale_indexes_ignore_the_perturbation(full):
  """Fails if the v3 decoder chose tables from the float32 sigma."""
  cm, encoded = full
  for latents, _, _ in encoded.values():
    blob = _v3_file(cm, latents)
    header, stream = codec.parse(cm, blob)
    for d in PERTURBATIONS:
      hyper = cm.hyper

      def perturbed(p, z, d=d, hyper=hyper):
        m, s = hyper(p, z)
        return m * (1 + d), _perturbed(np.asarray(s), d)

      cm.hyper = perturbed
      try:
        z_sym, y_sym, _ = codec.decode_symbols(cm, header, stream)
      finally:
        cm.hyper = hyper
      np.testing.assert_array_equal(z_sym, latents.z_sym)
      np.testing.assert_array_equal(y_sym, latents.y_sym)


def _v3_file(cm, latents) -> bytes:
  h, w = SHAPE
  header = container.Header(cm.fingerprint, h, w, steps=1, gamma=0.8)
  return container.pack(header, [codec.entropy_encode(cm, latents)])


def _digest(*arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:32]


def _decode_everywhere(model_path, files):
  """{setting: the decode_symbols.py report} for the same files."""
  out = {}
  for name, extra in SETTINGS.items():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)
    script = os.path.join(ROOT, "tests", "decode_symbols.py")
    proc = subprocess.run(
      [sys.executable, script, model_path, *files],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, name + proc.stderr[-2000:]
    out[name] = json.loads(proc.stdout)
  return out


def _check_settings(reports, expected):
  sigma_differs = {
    name: any(r[f]["sigma"] != reports["default"][f]["sigma"] for f in r)
    for name, r in reports.items()
  }
  print(f"\nfloat32 sigma differs from the default setting's: {sigma_differs}")
  for name, report in reports.items():
    for f, (symbols, indexes) in expected.items():
      assert report[f]["symbols"] == symbols, (name, f)
      assert report[f]["indexes"] == indexes, (name, f)


def test_symbols_are_identical_under_other_xla_settings(
  cm, model_path, tmp_path
):
  """The tiny calibrated model (the full one: the slow test below)."""
  expected, files = {}, []
  for i, name in enumerate(("coffee", "astronaut")):
    img = testing.photo(name, (192, 256))
    blob = codec.compress(cm, img, steps=1)
    files.append(str(tmp_path / f"{i}.cdcj"))
    with open(files[-1], "wb") as f:
      f.write(blob)
    latents = codec.encode_latents(cm, to_float(codec.pad_image(img, 64))[None])
    expected[f"{i}.cdcj"] = (
      _digest(latents.z_sym, latents.y_sym),
      _digest(latents.y_indexes),
    )
  _check_settings(_decode_everywhere(model_path, files), expected)


def test_indexes_do_not_depend_on_the_batch(full):
  """The same z symbols give the same indexes however they are batched
  (float32 h_s on a batch of two need not round as on one)."""
  cm, encoded = full
  z = [latents.z_sym for latents, _, _ in encoded.values()]
  both = cm.scales(np.concatenate(z))
  for i, (latents, _, _) in enumerate(encoded.values()):
    np.testing.assert_array_equal(both[i : i + 1], latents.y_indexes)


@pytest.mark.slow  # a 200 MB model directory, five fresh processes
def test_full_size_symbols_are_identical_under_other_xla_settings(
  full, tmp_path
):
  cm, encoded = full
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(lambda: init_params(CDC(), jax.random.key(0)))
  unet = jax.tree.map(
    lambda a: rng.uniform(-0.05, 0.05, a.shape).astype(np.float32),
    shapes["denoise_fn"],
  )
  params = {
    "context_fn": jax.device_get(cm.params["context_fn"]),
    "denoise_fn": unet,
  }
  model_path = str(tmp_path / "full")
  model_dir.export(
    model_path, to_config(CDC()), testing.DIFFUSIONS["eps"], params
  )
  cm = codec.load(model_path)
  expected, files = {}, []
  for name, (latents, _, _) in encoded.items():
    files.append(str(tmp_path / f"{name}.cdcj"))
    with open(files[-1], "wb") as f:
      f.write(_v3_file(cm, latents))
    expected[f"{name}.cdcj"] = (
      _digest(latents.z_sym, latents.y_sym),
      _digest(latents.y_indexes),
    )
  _check_settings(_decode_everywhere(model_path, files), expected)
