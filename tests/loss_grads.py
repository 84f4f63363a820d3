"""Gradients of the training loss, as the loss tests take and compare them.

``probed_loss`` (test_losses, test_parity_lpips_loss): ``losses.loss_fn``
with a probe added to the U-Net output, so that the probe's gradient is the
gradient at the prediction.

For the gradient parity tests with the ORIGINAL (test_parity_grads,
test_parity_lpips_loss; the reference side is ``parity_ref.py``):
``make_inputs`` draws the NCHW inputs of a small model (the sizes below),
``reference`` runs the original and converts the checkpoint it saved,
``converted`` loads that model directory for ``loss_fn``, ``injected``
gives the draws the original had injected as NHWC arrays, ``torch_named``
maps our gradients back to torch names and layouts through the
converter's table, and ``gradient_rows`` / ``assert_same_nonzero`` compare
the two sides.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from test_parity import nhwc, run_reference

from cdc_jax import diffusion, losses, model_dir
from cdc_jax.convert import infer, torch_checkpoint
from cdc_jax.models.cdc import CDC, from_config

DIM = 8  # the released depths at a width that runs in seconds
CONTEXT_CHANNELS = {"eps": 3, "x": DIM}  # release: 3 and dim (64)
LAGRANGIAN = 0.5
BATCH, SIDE = 2, 64  # 64: the smallest side both families take
TINY = 1e-30


def probed_loss(params, probe, model, *args, **kwargs):
  """``losses.loss_fn`` with ``probe`` added to the U-Net output, so that
  its gradient w.r.t. ``probe`` is the gradient at the prediction; returns
  ``(total, (metrics, prediction))``."""
  preds = []

  def add_probe(next_fun, a, kw, context):
    out = next_fun(*a, **kw)
    if context.method_name == "denoise" and isinstance(context.module, CDC):
      preds.append(out)
      return out + probe
    return out

  with nn.intercept_methods(add_probe):
    total, metrics = losses.loss_fn(params, model, *args, **kwargs)
  return total, (metrics, preds[0])


# -- parity with the original --------------------------------------------------


def make_inputs(family: str, seed: int = 0) -> dict:
  """NCHW inputs of ``parity_ref.py grads`` (all randomness lives here)."""
  rng = np.random.default_rng(seed)
  f32 = np.float32
  timesteps = infer.RELEASE_DIFFUSION[family]["timesteps"]
  b, s, c = BATCH, SIDE, 4 * DIM  # y and z both have dim * 4 channels
  # One early t (x family: SNR above the weight's clamp at 5), one late.
  t = [
    rng.integers(0, timesteps // 20),
    rng.integers(timesteps // 2, timesteps),
  ]
  return {
    "dim": np.int64(DIM),
    "context_channels": np.int64(CONTEXT_CHANNELS[family]),
    "lagrangian": np.float64(LAGRANGIAN),
    "images": rng.uniform(-1, 1, (b, 3, s, s)).astype(f32),
    "t": np.asarray(t, np.int64),
    # What torch.rand_like returns: U[0, 1); the rate noise is this - 0.5.
    "rz": rng.random((b, c, s // 64, s // 64)).astype(f32),
    "ry": rng.random((b, c, s // 16, s // 16)).astype(f32),
    "eps": rng.standard_normal((b, 3, s, s)).astype(f32),
  }


def reference(mode: str, family: str, tmp, inputs: dict):
  """Runs ``parity_ref.py MODE`` and converts the checkpoint it saved
  into ``tmp/model``; returns (that model directory, the conversion, the
  original's outputs, seconds the original took)."""
  t0 = time.perf_counter()
  ckpt, ref = run_reference(mode, family, tmp, inputs)
  seconds = time.perf_counter() - t0
  path = str(tmp / "model")
  conv, _ = torch_checkpoint.convert_file(ckpt, path)
  assert conv.model_config["family"] == family
  return path, conv, ref, seconds


def converted(path: str):
  """A converted model directory for ``loss_fn``: (the loaded directory,
  the model, the schedule arrays)."""
  loaded = model_dir.load(path)
  dcfg = loaded.diffusion_config
  sched = diffusion.make_schedule(dcfg["schedule"], dcfg["timesteps"])
  model = from_config(loaded.model_config)
  return loaded, model, losses.schedule_arrays(sched)


def injected(inputs: dict):
  """The draws the original had injected, NHWC, as ``loss_fn`` takes
  them: (x0, t, noise, rate_noise)."""
  half = np.float32(0.5)
  rate_noise = tuple(jnp.asarray(nhwc(inputs[k]) - half) for k in ("rz", "ry"))
  x0 = jnp.asarray(nhwc(inputs["images"]))
  noise = jnp.asarray(nhwc(inputs["eps"]))
  return x0, jnp.asarray(inputs["t"]), noise, rate_noise


def torch_named(grads, loaded) -> dict:
  """Our parameter gradients under torch names and layouts: the
  converter's mapping table run backwards, buffers left out."""
  grads = jax.tree.map(np.asarray, grads)
  state = torch_checkpoint.to_torch_state_dict(
    grads, loaded.model_config, loaded.diffusion_config
  )
  return {
    k: v for k, v in state.items() if not k.startswith(infer.BUFFER_PREFIX)
  }


def gradient_rows(ours: dict, ref: dict):
  """Checks that both sides have the same parameters and that torch left
  none without a gradient; returns (the original's gradients by name,
  rows (max|g_ours - g_ref| / ||g_ref||, name, max abs error, ||g_ref||),
  worst first)."""
  prefix = "grad."
  theirs = {k[len(prefix) :]: v for k, v in ref.items() if k.startswith(prefix)}
  assert set(ours) == set(theirs), (
    f"only ours: {sorted(set(ours) - set(theirs))}; "
    f"only the original's: {sorted(set(theirs) - set(ours))}"
  )
  assert list(ref["no_grad"]) == [], "torch left parameters without grad"
  rows = []
  for name, g_ref in theirs.items():
    g = ours[name]
    assert g.shape == g_ref.shape, (name, g.shape, g_ref.shape)
    err = float(np.max(np.abs(g.astype(np.float64) - g_ref)))
    norm = float(np.linalg.norm(g_ref.astype(np.float64)))
    rows.append((err / max(norm, TINY), name, err, norm))
  rows.sort(reverse=True)
  return theirs, rows


def nonzero(grads: dict) -> set:
  """The names of the gradients that are not all zero."""
  return {k for k, v in grads.items() if np.any(v != 0)}


def assert_same_nonzero(ours: dict, theirs: dict) -> None:
  """Both sides give a non-zero gradient to the same parameters."""
  nonzero_ours, nonzero_ref = nonzero(ours), nonzero(theirs)
  assert nonzero_ours == nonzero_ref, (
    f"only ours: {sorted(nonzero_ours - nonzero_ref)}; "
    f"only the original's: {sorted(nonzero_ref - nonzero_ours)}"
  )
