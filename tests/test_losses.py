"""The training loss with the LPIPS-VGG term (rho > 0, docs/model.md §7):
eps clamps x0_hat, x does not; rho = 0 is the plain loss; the dropout
variant depends on its key, the deterministic one on nothing; gradients
are finite; a train step with rho > 0 runs and keeps the rho = 0 draws.
Parity with the original: test_parity_lpips_loss.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_training
from loss_grads import probed_loss

from cdc_jax import diffusion, losses, model_dir, sharding
from cdc_jax.models import lpips as lp
from cdc_jax.models.cdc import from_config
from cdc_jax.optim import make_optimizer
from cdc_jax.testing import DIFFUSIONS, random_params, tiny_model
from cdc_jax.train_config import TrainingError, validate_config
from cdc_jax.train_state import init_state
from cdc_jax.train_step import first_t, make_train_step

B, S = 2, 64
RHO = 0.9
LAM = 0.5


@pytest.fixture(scope="module")
def vgg():
  """Random LPIPS-VGG params (He-scaled trunk, non-negative lin layers as
  the released ones), drawn in NumPy: no init to compile."""
  rng = np.random.default_rng(5)
  flat = {}
  for path, shape in lp.param_shapes("vgg").items():
    if path.startswith("scaling_layer/"):
      value = lp.SHIFT if path.endswith("shift") else lp.SCALE
    elif path.startswith("lin_"):
      value = rng.uniform(0.0, 0.2, shape)
    elif path.endswith("bias"):
      value = rng.normal(0.0, 0.1, shape)
    else:
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
    flat[path] = jnp.asarray(value, jnp.float32)
  return model_dir.unflatten(flat)


def _setup(family: str, t):
  model = tiny_model(family)
  d = DIFFUSIONS[family]
  sched = diffusion.make_schedule(d["schedule"], d["timesteps"])
  k = jax.random.split(jax.random.key(1), 4)
  shapes = model.latent_shapes(B, S, S)
  args = (
    model,
    losses.schedule_arrays(sched),
    jax.random.uniform(k[0], (B, S, S, 3), jnp.float32, -1.0, 1.0),  # x0
    jnp.asarray(t),
    jax.random.normal(k[1], (B, S, S, 3)),  # noise
    (
      jax.random.uniform(k[2], shapes["z"], jnp.float32, -0.5, 0.5),
      jax.random.uniform(k[3], shapes["y"], jnp.float32, -0.5, 0.5),
    ),
    jnp.float32(LAM),
  )
  return jax.device_put(random_params(model)), args


@pytest.fixture(scope="module")
def eps_setup():
  # One early t (x0_hat mostly in range), one late (mostly clamped).
  return _setup("eps", [400, 15000])


@pytest.fixture(scope="module")
def x_setup():
  return _setup("x", [300, 5000])


@functools.partial(jax.jit, static_argnums=2)
def _grads(params, vgg, model, sched_arrays, x0, t, noise, rate_noise, lam):
  """Deterministic rho > 0: grads w.r.t. params and the prediction."""
  f = functools.partial(probed_loss, rho=RHO, lpips_params=vgg)
  args = (model, sched_arrays, x0, t, noise, rate_noise, lam)
  grad = jax.grad(f, argnums=(0, 1), has_aux=True)
  return grad(params, jnp.zeros_like(x0), *args)


def _finite_and_reaching(grads):
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  for part in ("context_fn", "denoise_fn"):
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads[part])), part


@pytest.mark.parametrize("family", ["eps", "x"])
def test_rho_zero_is_the_plain_loss(family, vgg, eps_setup, x_setup):
  params, args = eps_setup if family == "eps" else x_setup
  plain = jax.jit(losses.loss_fn, static_argnums=1)
  zero = jax.jit(
    functools.partial(
      losses.loss_fn, rho=0.0, lpips_params=vgg, dropout_rng=jax.random.key(0)
    ),
    static_argnums=1,
  )
  total, m = plain(params, *args)
  total0, m0 = zero(params, *args)
  assert set(m) == set(m0) == {"loss", "bpp", "diffusion_loss", "extra_loss"}
  for k in m:
    np.testing.assert_array_equal(m[k], m0[k], err_msg=k)
  np.testing.assert_array_equal(total, total0)
  lam = args[-1]
  np.testing.assert_array_equal(m["loss"], lam * m["bpp"] + m["diffusion_loss"])
  with pytest.raises(ValueError, match="lpips_params"):
    losses.loss_fn(params, *args, rho=RHO)


def test_eps_clamps_x0_hat(vgg, eps_setup):
  params, args = eps_setup
  (grads, g_pred), (m, pred) = _grads(params, vgg, *args)
  model, sched_arrays, x0, t, noise, _, lam = args
  x_t = diffusion.q_sample(x0, sched_arrays[0][t], sched_arrays[1][t], noise)
  raw = diffusion.x0_from_eps(x_t, sched_arrays[3][t], pred)
  clamped = np.abs(np.asarray(raw)) > 1.0 + 1e-4  # clear of the edge
  inside = np.abs(np.asarray(raw)) < 1.0 - 1e-4
  frac = clamped.reshape(B, -1).mean(1)
  assert 0 < frac[0] < 0.5 < frac[1], frac  # both cases occur
  want = lp.lpips_distance(vgg, x0, jnp.clip(raw, -1, 1)).mean()
  unclamped = lp.lpips_distance(vgg, x0, raw).mean()
  np.testing.assert_allclose(m["aux_loss"], want, rtol=1e-5)
  assert abs(float(unclamped) - float(want)) > 1e-3 * float(want)
  total = lam * m["bpp"] + (1 - RHO) * m["diffusion_loss"] + RHO * want
  np.testing.assert_allclose(m["loss"], total, rtol=1e-6)
  # Clamped pixels get the L1 term's gradient only: (1 - rho) sign / N.
  l1 = (1 - RHO) * np.sign(np.asarray(pred - noise)) / pred.size
  g = np.asarray(g_pred)
  np.testing.assert_allclose(g[clamped], l1[clamped], rtol=1e-5)
  assert np.abs(g - l1)[inside].max() > 1e-3 * np.abs(l1).max()
  _finite_and_reaching(grads)


def test_x_does_not_clamp(vgg, x_setup):
  params, args = x_setup
  (grads, g_pred), (m, pred) = _grads(params, vgg, *args)
  x0 = args[2]
  outside = np.abs(np.asarray(pred)) > 1.0
  assert outside.mean() > 0.01, outside.mean()  # the case occurs
  want = lp.lpips_distance(vgg, x0, pred).mean()
  clamped = lp.lpips_distance(vgg, x0, jnp.clip(pred, -1, 1)).mean()
  np.testing.assert_allclose(m["aux_loss"], want, rtol=1e-5)
  assert abs(float(clamped) - float(want)) > 1e-4 * float(want)
  # Unlike eps, pixels outside [-1, 1] get an LPIPS gradient too.
  lam, weight = args[-1], diffusion.loss_weight(args[1][2][args[3]])
  l2 = (1 - RHO) * 2 * weight[:, None, None, None] * (pred - x0) / pred[0].size
  off = np.abs(np.asarray(g_pred) - np.asarray(l2) / B)[outside]
  assert off.max() > 1e-3 * np.abs(np.asarray(g_pred)).max()
  total = lam * m["bpp"] + (1 - RHO) * m["diffusion_loss"] + RHO * want
  np.testing.assert_allclose(m["loss"], total, rtol=1e-6)
  _finite_and_reaching(grads)


def test_dropout_and_deterministic_variants(vgg, eps_setup):
  params, args = eps_setup

  def run(params, vgg, key, use_key):
    kw = {"dropout_rng": key} if use_key else {}
    return losses.loss_fn(params, *args, rho=RHO, lpips_params=vgg, **kw)[1]

  run = jax.jit(run, static_argnums=3)
  k1, k2 = jax.random.key(11), jax.random.key(12)
  a, a2 = run(params, vgg, k1, True), run(params, vgg, k1, True)
  b = run(params, vgg, k2, True)
  d, d2 = run(params, vgg, k1, False), run(params, vgg, k2, False)
  np.testing.assert_array_equal(a["aux_loss"], a2["aux_loss"])
  np.testing.assert_array_equal(d["aux_loss"], d2["aux_loss"])
  assert a["aux_loss"] != b["aux_loss"]
  assert a["aux_loss"] != d["aux_loss"] and b["aux_loss"] != d["aux_loss"]
  # Unbiased dropout: a draw stays near the deterministic value.
  np.testing.assert_allclose(a["aux_loss"], d["aux_loss"], rtol=0.2)
  for k in ("bpp", "diffusion_loss", "extra_loss"):  # only LPIPS changes
    np.testing.assert_array_equal(a[k], d[k], err_msg=k)


def _config(rho: float, dropout: bool = True):
  c = tiny_training.config(batch_size=2)
  c.model.dim = 4
  c.diffusion.aux_weight = rho
  c.diffusion.lpips_dropout = dropout
  return c


def _train(rho: float, vgg, steps: int = 2):
  """``steps`` steps of a tiny x model (batch 2 on 2 devices)."""
  c = _config(rho)
  mesh = sharding.make_mesh(jax.devices()[:2])
  model, tx = from_config(c.model), make_optimizer(c.train)
  host = jax.device_get(init_state(model, tx, jax.random.key(0), True))
  host_sharding = sharding.replicated(mesh, host)
  if rho:
    with pytest.raises(ValueError, match="lpips_params"):
      make_train_step(c, model, tx, mesh, host_sharding)
  step, bs = make_train_step(c, model, tx, mesh, host_sharding, vgg)
  batch = np.random.default_rng(0).integers(0, 256, (2, S, S, 3), np.uint8)
  state, metrics = tiny_training.run(step, bs, mesh, host, batch, steps)
  assert int(state.step) == steps
  moved = jax.tree.map(
    lambda a, b: np.abs(a - b).max(), state.params, host.params
  )
  assert max(jax.tree.leaves(moved)) > 0
  return metrics


@pytest.fixture(scope="module")
def rho_run(vgg):
  return _train(RHO, vgg)


@pytest.mark.slow  # compiles a second train step (about 3 min on 2 cores)
def test_train_step_with_rho(rho_run):
  for m in rho_run:
    assert np.isfinite(m["loss"]) and m["aux_loss"] > 0
    total = (
      m["lam"] * m["bpp"]
      + (1 - RHO) * m["diffusion_loss"]
      + RHO * m["aux_loss"]
    )
    np.testing.assert_allclose(m["loss"], total, rtol=1e-6)


@pytest.mark.slow
def test_train_step_keeps_the_rho_zero_draws(rho_run, vgg):
  # t, rate noise and diffusion noise are the rho = 0 draws (the LPIPS
  # key is its own stream): the first step, from the same params, sees
  # the same bpp and diffusion loss.
  first0, first = _train(0.0, vgg, steps=1)[0], rho_run[0]
  assert "aux_loss" not in first0
  for k in ("bpp", "diffusion_loss", "extra_loss"):
    np.testing.assert_allclose(first[k], first0[k], rtol=1e-6, err_msg=k)


def test_validate_config_needs_lpips_weights(tmp_path):
  c = _config(RHO)
  with pytest.raises(TrainingError) as e:
    validate_config(c)
  msg = str(e.value)
  assert "--config.diffusion.lpips_weights" in msg and "\n" not in msg
  assert "python -m cdc_jax.convert lpips" in msg
  c.diffusion.lpips_weights = str(tmp_path / "missing.npz")
  with pytest.raises(TrainingError, match="missing.npz"):
    validate_config(c)
  (tmp_path / "w.npz").write_bytes(b"")
  c.diffusion.lpips_weights = str(tmp_path / "w.npz")
  validate_config(c)  # readable; its contents are checked on load
  c.diffusion.aux_weight = 1.5
  with pytest.raises(TrainingError, match=r"\[0, 1\]"):
    validate_config(c)


def test_validate_config_t_min_and_weight_floor():
  c = _config(0.0)
  c.diffusion.train_t_min = 0.9
  c.diffusion.loss_weight_floor = 1.0
  validate_config(c)
  assert first_t(c, 8193) == 7373
  for value in (1.0, -0.1):
    c.diffusion.train_t_min = value
    with pytest.raises(TrainingError, match=r"train_t_min .* \[0, 1\)"):
      validate_config(c)
  c.diffusion.train_t_min = 0.0
  assert first_t(c, 8193) == 0  # the original: all of [0, T)
  c.diffusion.loss_weight_floor = -1.0
  with pytest.raises(TrainingError, match="loss_weight_floor"):
    validate_config(c)


def test_weight_floor_scales_the_x_loss(x_setup):
  """A floor above 5 makes every weight the floor: the loss is floor x
  the plain mean squared error of the same prediction."""
  params, args = x_setup
  plain = losses.loss_fn(params, *args)[1]["diffusion_loss"]
  zero = jnp.zeros_like(args[2])
  _, (high, pred) = probed_loss(params, zero, *args, weight_floor=100.0)
  want = 100.0 * np.mean((np.asarray(pred) - np.asarray(args[2])) ** 2)
  np.testing.assert_allclose(high["diffusion_loss"], want, rtol=1e-5)
  assert abs(float(plain) - float(high["diffusion_loss"])) > 1e-3 * want


def test_weight_floor_scales_the_eps_loss(eps_setup):
  """The eps floor weighs each sample's L1 on eps by max(1, floor /
  sqrt(SNR_t)): 1 at the early t (SNR ~ 280), ~ floor / sqrt(SNR) at the
  late one; floor 0 is the original's plain mean."""
  params, args = eps_setup
  noise, t = np.asarray(args[4]), np.asarray(args[3])
  snr = np.asarray(args[1].snr)[t]
  zero = jnp.zeros_like(args[2])
  _, (plain, pred) = probed_loss(params, zero, *args)
  per = np.mean(np.abs(noise - np.asarray(pred)), axis=(1, 2, 3))
  np.testing.assert_allclose(plain["diffusion_loss"], per.mean(), rtol=1e-5)
  _, (high, _) = probed_loss(params, zero, *args, weight_floor=2.0)
  w = np.maximum(1.0, 2.0 / np.sqrt(snr))
  assert w[0] == 1.0 and w[1] > 10.0
  want = np.mean(w * per)
  np.testing.assert_allclose(high["diffusion_loss"], want, rtol=1e-5)
