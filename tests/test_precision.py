"""Mixed precision and rematerialisation: bf16 computes where it should and
nowhere else, params stay float32, and remat changes no gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import sharding
from cdc_jax.models.cdc import (
  CDC,
  from_config,
  init_params,
  to_config,
  with_dtype,
)
from cdc_jax.optim import make_optimizer
from cdc_jax.testing import photo, random_params, tiny_model
from cdc_jax.train_state import init_state
from cdc_jax.train_step import make_train_step
from configs import eps_linear

# A 2-level U-Net (and 2-level context model) of the same blocks: the
# gradient tests compile in a fraction of the 6-level model's time.
SHALLOW = dict(family="eps", dim=4, dim_mults=[1, 2], context_dim_mults=[1, 2])
# Measured on the dim-4 eps model, 64x128 astronaut crop, random init:
# |bf16 - f32| / |f32| (L2 norms) = 7.7e-3 for the U-Net output and 1.3e-2
# for the context map c0 (bf16 keeps 8 significant bits: 3.9e-3 per
# rounding). The bound leaves room for other inits and XLA versions.
FORWARD_RTOL = 3e-2


def _has_bf16(fn, *args) -> bool:
  """Whether any value in the jaxpr of fn(*args) (sub-jaxprs included)
  is bfloat16."""
  return "bf16[" in str(jax.make_jaxpr(fn)(*args))


def _conv_dtypes(fn, *args) -> set[str]:
  closed = jax.make_jaxpr(fn)(*args)
  return {
    str(e.invars[0].aval.dtype)
    for e in closed.jaxpr.eqns
    if e.primitive.name == "conv_general_dilated"
  }


@pytest.fixture(scope="module")
def tiny():
  f32 = tiny_model("eps")
  bf16 = with_dtype(f32, "bfloat16")
  params = random_params(f32)
  img = photo(size=(64, 128), top=100, left=150)
  x0 = jnp.asarray(img[None], jnp.float32) / 127.5 - 1.0
  ctx = jax.jit(
    lambda p, x: f32.apply({"params": p}, x, method=CDC.context_model)
  )(params, x0)
  return dict(f32=f32, bf16=bf16, params=params, x0=x0, ctx=ctx)


def test_with_dtype_and_config():
  m = tiny_model("x")
  half = with_dtype(m, "bfloat16")
  assert half.dtype == "bfloat16" and m.dtype == "float32"
  assert with_dtype(half, jnp.float32).dtype == "float32"
  for bad in ("float16", "int8", "fp32"):
    with pytest.raises(ValueError, match="model dtype must be one of"):
      with_dtype(m, bad)
  with pytest.raises(ValueError, match="model dtype"):
    init_params(m.clone(dtype="float64"), jax.random.key(0))
  # remat is a compute setting: accepted from a config, never recorded.
  c = eps_linear.get_config("tiny")
  assert c.model.remat is False and c.model.dtype == "float32"
  rm = from_config({**to_config(c.model), "remat": True})
  assert rm.remat and "remat" not in to_config(rm)
  assert "remat" not in to_config(c.model)


def test_bf16_params_are_float32_and_same_shapes(tiny):
  def shapes(model):
    tree = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    return jax.tree.map(lambda a: (a.shape, str(a.dtype)), tree)

  s32, s16 = shapes(tiny["f32"]), shapes(tiny["bf16"])
  assert s32 == s16
  assert {d for _, d in jax.tree.leaves(s16, is_leaf=_is_pair)} == {"float32"}


def _is_pair(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], str)


def test_bf16_unet_computes_in_bf16_and_returns_float32(tiny):
  p, ctx, x0 = tiny["params"], tiny["ctx"]["context"], tiny["x0"]
  t = jnp.full((1, 1), 0.3, jnp.float32)

  def denoise(model):
    return lambda p: model.apply({"params": p}, x0, t, ctx, method=CDC.denoise)

  assert _conv_dtypes(denoise(tiny["bf16"]), p) == {"bfloat16"}
  assert not _has_bf16(denoise(tiny["f32"]), p)
  out = jax.eval_shape(denoise(tiny["bf16"]), p)
  assert out.dtype == jnp.float32


def test_bf16_forward_close_to_float32(tiny):
  p, x0 = tiny["params"], tiny["x0"]
  ctx = tiny["ctx"]["context"]
  t = jnp.full((1, 1), 0.3, jnp.float32)
  x_t = x0 * 0.8 + 0.6 * jax.random.normal(jax.random.key(1), x0.shape)

  @functools.partial(jax.jit, static_argnums=0)
  def run(model, p):
    out = model.apply({"params": p}, x_t, t, ctx, method=CDC.denoise)
    c0 = model.apply({"params": p}, tiny["ctx"]["y_hat"], method=CDC.g_s)[0]
    return out, c0.astype(jnp.float32)

  (o32, c32), (o16, c16) = run(tiny["f32"], p), run(tiny["bf16"], p)
  for a, b in ((o32, o16), (c32, c16)):
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    assert 0 < rel < FORWARD_RTOL, rel  # > 0: bf16 really ran


def test_entropy_path_is_float32_in_bf16_mode(tiny):
  p, x0, bf16 = tiny["params"], tiny["x0"], tiny["bf16"]
  z_hat = tiny["ctx"]["z_hat"]
  y = tiny["ctx"]["y_hat"]
  for method, arg in (
    (CDC.h_a, y),
    (CDC.h_s, z_hat),
    (CDC.z_likelihood, z_hat),
  ):

    def fn(p, model=bf16, arg=arg, method=method):
      return model.apply({"params": p}, arg, method=method)

    assert not _has_bf16(fn, p), method.__name__
    # The coder's inputs do not depend on the decoding precision.
    got = jax.tree.leaves(jax.jit(fn)(p))
    want = jax.tree.leaves(jax.jit(functools.partial(fn, model=tiny["f32"]))(p))
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(g, w)
  out = jax.eval_shape(
    lambda p: bf16.apply(
      {"params": p},
      x0,
      train=True,
      rng=jax.random.key(0),
      method=CDC.context_model,
    ),
    p,
  )
  for k in ("bpp", "y_hat", "z_hat"):
    assert out[k].dtype == jnp.float32, k
  for k, v in out["likelihoods"].items():
    assert v.dtype == jnp.float32, k
  assert {c.dtype for c in out["context"]} == {jnp.dtype(jnp.bfloat16)}


def test_bf16_train_step_keeps_params_and_optimizer_float32():
  c = eps_linear.get_config("tiny")
  c.unlock()
  c.model.update({**SHALLOW, "dtype": "bfloat16"})
  c.train.batch_size = 2
  model = from_config(c.model)
  tx = make_optimizer(c.train)
  state = init_state(model, tx, jax.random.key(0), c.train.ema.enabled)
  host = jax.device_get(state)
  mesh = sharding.make_mesh(jax.devices()[:1])
  step, bs = make_train_step(
    c, model, tx, mesh, sharding.replicated(mesh, host)
  )
  batch = photo(size=(32, 64), top=100, left=100).reshape(2, 32, 32, 3)
  state = jax.device_put(host, sharding.replicated(mesh, host))
  state, m = step(state, jax.device_put(batch, bs))
  state = jax.device_get(state)
  assert int(state.step) == 1 and np.isfinite(float(m["loss"]))
  for k in ("loss", "bpp", "diffusion_loss", "grad_norm"):
    assert m[k].dtype == jnp.float32, k
  floats = [
    x
    for x in jax.tree.leaves((state.params, state.opt_state))
    if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  assert floats and {str(x.dtype) for x in floats} == {"float32"}
  moved = jax.tree.map(
    lambda a, b: np.abs(a - b).max(), state.params, host.params
  )
  assert max(jax.tree.leaves(moved)) > 0


def _unet_grads(model, params, x0):
  """Gradients of a loss of the U-Net's output, and the program's jaxpr."""
  ctx = jax.jit(
    lambda p: model.apply({"params": p}, x0, method=CDC.context_model)
  )(params)
  ks = jax.random.split(jax.random.key(3), 2)
  x_t = 0.7 * x0 + 0.7 * jax.random.normal(ks[0], x0.shape)
  time = jnp.array([[0.1], [0.8]])
  target = jax.random.normal(ks[1], x0.shape)

  def loss(p):
    out = model.apply(
      {"params": p}, x_t, time, ctx["context"], method=CDC.denoise
    )
    return jnp.mean(jnp.abs(out - target))

  fn = jax.jit(jax.grad(loss))
  return fn(params)["denoise_fn"], jax.make_jaxpr(fn)(params)


def test_remat_gradients_equal():
  model = from_config(SHALLOW)
  params = random_params(model)
  img = photo(size=(32, 64), top=100, left=150).reshape(2, 32, 32, 3)
  x0 = jnp.asarray(img, jnp.float32) / 127.5 - 1.0
  g0, jaxpr0 = _unet_grads(model, params, x0)
  g1, jaxpr1 = _unet_grads(model.clone(remat=True), params, x0)
  # jax.checkpoint shows as remat2 (jax 0.10) or checkpoint in a jaxpr.
  assert "remat" not in str(jaxpr0) and "checkpoint[" not in str(jaxpr0)
  assert "remat" in str(jaxpr1) or "checkpoint[" in str(jaxpr1)
  flat0 = jax.tree.leaves_with_path(g0)
  flat1 = jax.tree.leaves(g1)
  assert len(flat0) == len(flat1)
  for (path, a), b in zip(flat0, flat1, strict=True):
    np.testing.assert_allclose(
      b, a, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path)
    )
  assert max(float(jnp.abs(a).max()) for _, a in flat0) > 1e-3
