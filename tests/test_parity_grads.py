"""Gradient parity with the ORIGINAL PyTorch CDC code.

Same requirements and ``CDC_REF`` default as ``test_parity.py`` (whose
reference runner this reuses, through ``loss_grads.py``)::

  python -m pytest tests/test_parity_grads.py -s

For each family, at a small width (``loss_grads.DIM``) with the released
depths, schedule (eps: linear T=20000, x: cosine T=8193) and a rate weight
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
import loss_grads
import pytest
from loss_grads import BATCH, DIM, LAGRANGIAN, SIDE, TINY
from test_parity import skip_reason

from cdc_jax import losses
from cdc_jax.convert import infer

RTOL = 1e-4

pytestmark = [
  pytest.mark.parity,
  pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
]


def _our_grads(model_path: str, inputs: dict):
  """(torch-named gradients, aux) of our total loss for the same draws."""
  loaded, model, sched_arrays = loss_grads.converted(model_path)

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

  params = jax.device_put(loaded.params)
  grads, aux = grad_fn(params, *loss_grads.injected(inputs))
  return loss_grads.torch_named(grads, loaded), jax.tree.map(float, aux)


@pytest.mark.parametrize("family", ["eps", "x"])
def test_loss_gradients(family, tmp_path):
  inputs = loss_grads.make_inputs(family)
  path, conv, ref, t_ref = loss_grads.reference(
    "grads", family, tmp_path, inputs
  )
  assert conv.diffusion_config == infer.RELEASE_DIFFUSION[family]
  t0 = time.perf_counter()
  ours, aux = _our_grads(path, inputs)
  t_ours = time.perf_counter() - t0

  theirs, rows = loss_grads.gradient_rows(ours, ref)
  nonzero_ref = loss_grads.nonzero(theirs)
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
  loss_grads.assert_same_nonzero(ours, theirs)
  bad = [r for r in rows if r[0] > RTOL]
  assert not bad, f"{family}: {len(bad)} gradients out of tolerance:\n" + (
    "\n".join(f"  {n}: {r:.3g} (max abs {e:.3g})" for r, n, e, _ in bad[:10])
  )
