"""Gradient parity with the ORIGINAL PyTorch CDC code.

Same requirements and ``CDC_REF`` default as ``test_parity.py`` (whose
helpers this reuses)::

  python -m pytest tests/test_parity_grads.py -s

For each family, at a small width (``DIM``) with the released depths,
schedule (eps: linear T=20000, x: cosine T=8193) and a rate weight
lambda = 0.5 (so the rate term's gradients matter), ``parity_ref.py
grads`` builds the original model with perturbed LayerNorm/prior
parameters, saves it, runs one training forward with injected t, diffusion
noise and rate noise (what its quantiser's ``torch.rand_like`` returns),
and records every parameter's gradient after the original trainer's
``loss.backward(); extra_loss.backward()``.

Our side converts the checkpoint (``cdc_jax.convert``), takes ``jax.grad``
of the total ``cdc_jax.losses.loss_fn`` (loss + extra loss) with the same
injections, and maps the gradients back to torch names and layouts with
``torch_checkpoint.to_torch_state_dict`` (the converter's mapping table,
layout transforms included). Every tensor must satisfy
``max|g_ours - g_ref| <= RTOL * max(||g_ref||_2, TINY)``, and the two sides
must agree on which parameters get a non-zero gradient.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_parity import nhwc, run_reference, skip_reason

from cdc_jax import diffusion, losses, model_dir
from cdc_jax.convert import infer, torch_checkpoint
from cdc_jax.models.cdc import from_config

DIM = 8  # the released depths at a width that runs in seconds
CONTEXT_CHANNELS = {"eps": 3, "x": DIM}  # release: 3 and dim (64)
LAGRANGIAN = 0.5
BATCH, SIDE = 2, 64  # 64: the smallest side both families take
RTOL = 1e-4
TINY = 1e-30

pytestmark = [
  pytest.mark.parity,
  pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
]


def _make_inputs(family: str, seed: int = 0) -> dict:
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


def _our_grads(model_path: str, inputs: dict):
  """(torch-named gradients, aux) of our total loss for the same draws."""
  loaded = model_dir.load(model_path)
  model = from_config(loaded.model_config)
  dcfg = loaded.diffusion_config
  sched = diffusion.make_schedule(dcfg["schedule"], dcfg["timesteps"])
  sched_arrays = losses.schedule_arrays(sched)
  half = np.float32(0.5)
  rate_noise = (
    jnp.asarray(nhwc(inputs["rz"]) - half),
    jnp.asarray(nhwc(inputs["ry"]) - half),
  )

  @jax.jit
  def grad_fn(params, x0, t, noise, rate_noise):
    return jax.grad(losses.loss_fn, has_aux=True)(
      params,
      model,
      sched_arrays,
      x0,
      t,
      noise,
      rate_noise,
      jnp.float32(LAGRANGIAN),
    )

  grads, aux = grad_fn(
    jax.tree.map(jnp.asarray, loaded.params),
    jnp.asarray(nhwc(inputs["images"])),
    jnp.asarray(inputs["t"]),
    jnp.asarray(nhwc(inputs["eps"])),
    rate_noise,
  )
  grads = jax.tree.map(np.asarray, grads)
  state = torch_checkpoint.to_torch_state_dict(grads, loaded.model_config, dcfg)
  named = {
    k: v for k, v in state.items() if not k.startswith(infer.BUFFER_PREFIX)
  }
  return named, jax.tree.map(float, aux)


@pytest.mark.parametrize("family", ["eps", "x"])
def test_loss_gradients(family, tmp_path):
  inputs = _make_inputs(family)
  t0 = time.perf_counter()
  ckpt, ref = run_reference("grads", family, tmp_path, inputs)
  t_ref = time.perf_counter() - t0
  conv, _ = torch_checkpoint.convert_file(ckpt, str(tmp_path / "model"))
  assert conv.model_config["family"] == family
  assert conv.diffusion_config == infer.RELEASE_DIFFUSION[family]
  ours, aux = _our_grads(str(tmp_path / "model"), inputs)
  t_ours = time.perf_counter() - t0 - t_ref

  prefix = "grad."
  theirs = {k[len(prefix) :]: v for k, v in ref.items() if k.startswith(prefix)}
  assert set(ours) == set(theirs), (
    f"only ours: {sorted(set(ours) - set(theirs))}; "
    f"only the original's: {sorted(set(theirs) - set(ours))}"
  )
  assert list(ref["no_grad"]) == [], "torch left parameters without grad"

  rows = []  # (relative error, name, max abs error, ||g_ref||)
  for name, g_ref in theirs.items():
    g = ours[name]
    assert g.shape == g_ref.shape, (name, g.shape, g_ref.shape)
    err = float(np.max(np.abs(g.astype(np.float64) - g_ref)))
    norm = float(np.linalg.norm(g_ref.astype(np.float64)))
    rows.append((err / max(norm, TINY), name, err, norm))
  rows.sort(reverse=True)
  nonzero_ours = {k for k, v in ours.items() if np.any(v != 0)}
  nonzero_ref = {k for k, v in theirs.items() if np.any(v != 0)}

  loss_err = abs(aux["loss"] - float(ref["loss"])) / abs(float(ref["loss"]))
  extra_err = abs(aux["extra_loss"] - float(ref["extra"])) / max(
    abs(float(ref["extra"])), TINY
  )
  lines = [
    f"grad parity {family} (dim {DIM}, {BATCH}x{SIDE}x{SIDE}, "
    f"lambda {LAGRANGIAN}, t={inputs['t'].tolist()}): "
    f"{len(rows)} tensors, {len(nonzero_ref)} with non-zero gradient",
    f"loss {float(ref['loss']):.6g} (rel err {loss_err:.2e}), "
    f"extra {float(ref['extra']):.6g} (rel err {extra_err:.2e}), "
    f"bpp {aux['bpp']:.6g}",
    "worst max|g_ours - g_ref| / ||g_ref||:",
  ]
  lines += [
    f"  {r:.2e}  {n}  (max abs {e:.2e}, norm {m:.3g})"
    for r, n, e, m in rows[:5]
  ]
  lines.append(f"(reference {t_ref:.1f} s, ours {t_ours:.1f} s)")
  print("\n" + "\n".join(lines))

  assert loss_err <= 1e-5 and extra_err <= 1e-5, (loss_err, extra_err)
  assert nonzero_ours == nonzero_ref, (
    f"only ours: {sorted(nonzero_ours - nonzero_ref)}; "
    f"only the original's: {sorted(nonzero_ref - nonzero_ours)}"
  )
  bad = [r for r in rows if r[0] > RTOL]
  assert not bad, f"{family}: {len(bad)} gradients out of tolerance:\n" + (
    "\n".join(f"  {n}: {r:.3g} (max abs {e:.3g})" for r, n, e, _ in bad[:10])
  )
