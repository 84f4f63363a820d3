"""Tiny models for tests and benchmarks, and a calibrated entropy model.

A randomly initialised CDC codes meaningless rates: y is ~0.2, sigma sits
at its 0.1 floor, nearly every symbol is 0 and the rare +-1 cost 16 to 30
bits each. ``calibrate_entropy_model`` rescales the last layers of g_a,
h_a and h_s on one image so that the latents and scales have a trained
model's magnitudes, which makes file sizes, coding throughput and the
decoder's tables realistic while the U-Net stays at random init (decoded
pixels are meaningless, but exact and deterministic).
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import model_dir
from cdc_jax.imageio import to_float
from cdc_jax.models.cdc import CDC, from_config, init_params, to_config

# The smallest models of each family that keep the released architecture.
TINY_MODELS = {
  "eps": {"family": "eps", "dim": 4},
  "x": {
    "family": "x",
    "dim": 4,
    "reverse_context_dim_mults": [4, 3, 2, 1],
    "context_channels": 4,
  },
}
# The released diffusion settings of each family.
DIFFUSIONS = {
  "eps": {"schedule": "linear", "timesteps": 20000},
  "x": {"schedule": "cosine", "timesteps": 8193},
}
# y channels with trained-like spread; the rest are "dead" (std 0.1), as
# in trained models. At most this many are live.
LIVE_CHANNELS = 16
DEAD_SCALE = 0.1


def photo(name: str = "astronaut", size=None, top: int = 0, left: int = 0):
  """An ``skimage.data`` photo as uint8 RGB, cropped to ``size=(h, w)``
  (``motorcycle_left`` / ``_right``: the stereo pair, 500 x 741)."""
  import skimage.data

  if name in ("motorcycle_left", "motorcycle_right"):  # a stereo pair
    pair = skimage.data.stereo_motorcycle()
    img = np.asarray(pair[name.endswith("right")])
  else:
    img = np.asarray(getattr(skimage.data, name)())
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  img = img[..., :3]
  if size is not None:
    h, w = size
    img = img[top : top + h, left : left + w]
    if img.shape[:2] != (h, w):
      raise ValueError(
        f"{name} is too small for a {h}x{w} crop at {top},{left}"
      )
  return np.ascontiguousarray(img)


def tiny_model(family: str) -> CDC:
  return from_config(TINY_MODELS[family])


def random_params(model: CDC, seed: int = 0):
  """Fresh params as numpy arrays (one jitted init)."""
  init = jax.jit(functools.partial(init_params, model))
  return jax.tree.map(np.array, jax.device_get(init(jax.random.key(seed))))


def calibrate_entropy_model(model: CDC, params, img: np.ndarray):
  """Params whose entropy model has trained-like magnitudes on ``img``.

  Afterwards up to ``LIVE_CHANNELS`` channels of y have std s_c
  (log-spaced 0.3..8) about a mean that mu predicts within s_c / 4, the
  others std 0.1; sigma = s_c +- 20 % (both varying in space); z has std
  2 about its channel medians. About 0.2 bpp on natural photos for the
  tiny models, 0.5 bpp at full size (z's 256 channels cost 0.3 bpp).
  """
  p = jax.tree.map(np.array, jax.device_get(params))
  cf = p["context_fn"]
  axes = (0, 1, 2)
  fns = {}

  def run(method, v):
    if method not in fns:
      fns[method] = jax.jit(functools.partial(model.apply, method=method))
    return jax.tree.map(np.asarray, fns[method]({"params": p}, v))

  last_enc = cf[max(k for k in cf if k.startswith("enc_"))]["conv"]
  y = run(CDC.g_a, jnp.asarray(to_float(img))[None])
  c = y.shape[-1]
  live = min(c, LIVE_CHANNELS)
  target = np.concatenate(
    [np.geomspace(0.3, 8.0, live), np.full(c - live, DEAD_SCALE)]
  )
  _scale(last_enc, target / (y.std(axis=axes) + 1e-6))
  y = run(CDC.g_a, jnp.asarray(to_float(img))[None])
  z = run(CDC.h_a, y)
  _scale(cf["hyper_enc_2_0"], 2.0 / (z.std(axis=axes) + 1e-6))
  z = run(CDC.h_a, y)
  med = np.median(z, axis=axes).astype(np.float32)
  cf["prior"]["medians"][:] = med
  last = cf["hyper_dec_2_0"]
  last["bias"][c:] = 1e4  # keep the raw scale above the 0.1 clamp
  mu, s = run(CDC.h_s, np.round(z - med) + med)
  s = s - 1e4
  g_mu = 0.25 * target / (mu.std(axis=axes) + 1e-6)
  g_s = 0.2 * target / (s.std(axis=axes) + 1e-6)
  last["kernel"] *= np.concatenate([g_mu, g_s])
  last["bias"][:c] = y.mean(axis=axes) - g_mu * mu.mean(axis=axes)
  last["bias"][c:] = target - g_s * s.mean(axis=axes)
  return p


def entropy_codec(model: CDC, calib: np.ndarray, seed: int = 0):
  """A ``codec.CodecModel`` of ``model`` for entropy coding only: context
  model params drawn with numpy (torch-like uniform over the fan-in, no
  jitted init of the U-Net), calibrated on ``calib``; no U-Net params, so
  it encodes files and decodes their symbols but cannot run the
  diffusion decoder. Cheap enough for the full released architecture."""
  from cdc_jax import codec, entropy_tables

  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if len(leaf.shape) >= 2:
      bound = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
      return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
    return rng.uniform(-0.1, 0.1, leaf.shape).astype(np.float32)

  params = {"context_fn": jax.tree.map(draw, shapes["context_fn"])}
  params = calibrate_entropy_model(model, params, calib)
  loaded = model_dir.LoadedModel(
    model_config=to_config(model),
    diffusion_config={"schedule": "linear", "timesteps": 1000},
    params=params,
    tables=entropy_tables.build(model, params),
    fingerprint="00" * 32,
    path="",
  )
  return codec.from_loaded(loaded)


def _scale(layer: dict, gain: np.ndarray) -> None:
  layer["kernel"] *= gain
  layer["bias"] *= gain


def export_tiny(directory: str, family: str, seed: int = 0, calib=None):
  """A tiny model directory of ``family`` (entropy model calibrated on
  ``calib``, default a crop of skimage's chelsea); returns its params."""
  model = tiny_model(family)
  params = random_params(model, seed)
  if calib is None:
    calib = photo("chelsea", (256, 384))
  params = calibrate_entropy_model(model, params, calib)
  model_dir.export(directory, TINY_MODELS[family], DIFFUSIONS[family], params)
  return params


# JAX's duration events of tracing to MLIR and of XLA compiling.
LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILED = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def recorded_events(name: str):
  """A list that collects every JAX duration event ``name`` (e.g.
  ``LOWERED``, ``COMPILED``) seen inside the ``with`` block."""
  seen: list[float] = []

  def on_event(event, duration, **kw):
    if event == name:
      seen.append(duration)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)


def run_limited(
  code: str, memory: int = 3 << 30, timeout: float = 120, cwd=None
) -> subprocess.CompletedProcess:
  """Runs ``python -c code`` with its address space capped at ``memory``
  bytes (``RLIMIT_AS``, set first thing in the child) and a wall-clock
  ``timeout``: a test of a memory or work bound whose regression fails
  instead of taking the machine down. JAX on CPU; returns the completed
  process (text output)."""
  prologue = (
    "import resource\n"
    f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
  return subprocess.run(
    [sys.executable, "-c", prologue + code],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
    cwd=cwd,
  )
