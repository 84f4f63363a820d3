"""LPIPS (cdc_jax.models.lpips, cdc_jax.convert.lpips) against the lpips
package: its real v0.1 linear layers on a random trunk (``pnet_rand=True``,
nothing downloaded) copied into ours through the converter's file formats.
"""

from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import model_dir
from cdc_jax.convert import cli, tables
from cdc_jax.convert import lpips as conv
from cdc_jax.models import lpips as lp
from cdc_jax.models.cdc import to_config
from cdc_jax.testing import photo, tiny_model

torch = pytest.importorskip("torch")
lpips_pkg = pytest.importorskip("lpips")

B, H, W = 3, 64, 64
OUT_TOL = 1e-5  # relative or absolute
GRAD_TOL = 1e-4  # relative to the largest gradient entry, or absolute


def _images():
  """[3, 64, 64, 3] pairs: 2 photos vs noisy copies, 1 noise vs noise."""
  rng = np.random.default_rng(0)
  a = photo("astronaut", (H, W), 100, 180)
  b = photo("coffee", (H, W), 200, 300)
  x = np.stack([a, b]).astype(np.float32) / 127.5 - 1.0
  y = np.clip(x + 0.1 * rng.standard_normal(x.shape), -1, 1)
  x = np.concatenate([x, rng.uniform(-1, 1, (1, H, W, 3))])
  y = np.concatenate([y, rng.uniform(-1, 1, (1, H, W, 3))])
  return x.astype(np.float32), y.astype(np.float32)


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module", params=lp.NETS)
def ref(request, tmp_path_factory):
  """(net, torch LPIPS in eval mode, trunk .pth, lins .pth, our params)."""
  net = request.param
  torch.manual_seed(0)
  with warnings.catch_warnings():  # lpips passes torchvision `pretrained`
    warnings.simplefilter("ignore", UserWarning)
    model = lpips_pkg.LPIPS(
      net=net, pretrained=True, pnet_rand=True, verbose=False
    ).eval()
  with torch.no_grad():  # torchvision inits biases to 0: make them matter
    for name, p in model.net.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
  tmp = tmp_path_factory.mktemp(f"lpips_{net}")
  trunk = {  # torchvision naming: features.{k}.*, plus an ignored head
    "features." + k.split(".", 1)[1]: v.clone()
    for k, v in model.net.state_dict().items()
  }
  trunk["classifier.6.weight"] = torch.zeros(10, 4)
  lins = {
    k: v.clone()
    for k, v in model.state_dict().items()
    if k.startswith("lin") and not k.startswith("lins.")
  }
  torch.save(trunk, tmp / "trunk.pth")
  torch.save(lins, tmp / "lins.pth")
  params = conv.params_from_torch(
    str(tmp / "trunk.pth"), net, str(tmp / "lins.pth")
  )
  return net, model, tmp / "trunk.pth", tmp / "lins.pth", params


@pytest.fixture(scope="module")
def images():
  return _images()


_dist = jax.jit(lp.lpips_distance, static_argnames=("train", "net"))


def _sum_dist(params, x, y):
  return jnp.sum(lp.lpips_distance(params, x, y))


_grad = jax.jit(jax.grad(_sum_dist, argnums=1))


def _errors(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  err = np.abs(ours - theirs)
  return float(err.max()), float((err / np.abs(theirs).max()).max())


def test_output_parity_eval_mode(ref, images):
  net, model, _, _, params = ref
  x, y = images
  with torch.no_grad():
    want = model(_nchw(x), _nchw(y)).numpy().reshape(-1)
  got = np.asarray(_dist(params, x, y))
  abs_err, rel_err = _errors(got, want)
  print(f"LPIPS-{net} eval: max abs {abs_err:.3g}, max rel {rel_err:.3g}")
  assert got.shape == (B,) and np.all(want > 0)
  assert min(abs_err, rel_err) < OUT_TOL


def test_input_gradient_parity(ref, images):
  net, model, _, _, params = ref
  x, y = images
  xt = _nchw(x).requires_grad_(True)
  model(xt, _nchw(y)).sum().backward()
  want = xt.grad.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(_grad(params, x, y))
  abs_err, rel_err = _errors(got, want)
  print(f"LPIPS-{net} d/dx: max abs {abs_err:.3g}, max rel {rel_err:.3g}")
  assert np.abs(want).max() > 0
  assert min(abs_err, rel_err) < GRAD_TOL


class _FixedMask(torch.nn.Module):
  """Stands in for the lpips nn.Dropout with a given keep-mask."""

  def __init__(self, keep):
    super().__init__()
    self.keep = keep

  def forward(self, d):
    return d * self.keep / (1.0 - lp.DROPOUT_RATE)


def test_train_mode_parity_with_injected_masks(ref, images):
  net, model, _, _, params = ref
  x, y = images
  rng = np.random.default_rng(1)
  masks = [  # keep-masks, p(keep) = 1 - p
    (rng.random((B, *s)) >= lp.DROPOUT_RATE).astype(np.float32)
    for s in lp.feature_shapes(net, H, W)
  ]
  train_model = copy.deepcopy(model).train()
  for i, m in enumerate(masks):
    assert isinstance(train_model.lins[i].model[0], torch.nn.Dropout)
    train_model.lins[i].model[0] = _FixedMask(_nchw(np.asarray(m)))
  with torch.no_grad():
    want = train_model(_nchw(x), _nchw(y)).numpy().reshape(-1)
    eval_out = model(_nchw(x), _nchw(y)).numpy().reshape(-1)
  got = np.asarray(_dist(params, x, y, train=True, dropout_masks=masks))
  abs_err, rel_err = _errors(got, want)
  print(f"LPIPS-{net} masked: max abs {abs_err:.3g}, max rel {rel_err:.3g}")
  assert not np.allclose(want, eval_out, rtol=1e-3)  # the masks did act
  assert min(abs_err, rel_err) < OUT_TOL


def test_known_properties(ref, images):
  _, _, _, _, params = ref
  x, y = images
  same = np.asarray(_dist(params, x, x))
  xy, yx = np.asarray(_dist(params, x, y)), np.asarray(_dist(params, y, x))
  assert np.all(same == 0.0)
  assert np.all(xy > 0)
  np.testing.assert_allclose(xy, yx, rtol=1e-6)
  # Mildly noisy photos are closer than unrelated noise images.
  assert xy[:2].max() < xy[2]
  # Keeping every unit scales each lin input, hence the distance, by 2.
  net = lp.net_of(params)
  assert net == ref[0]
  ones = [np.ones((B, *s), np.float32) for s in lp.feature_shapes(net, H, W)]
  doubled = np.asarray(_dist(params, x, y, train=True, dropout_masks=ones))
  np.testing.assert_allclose(doubled, 2 * xy, rtol=1e-6)


def test_dropout_from_rng(ref, images):
  _, _, _, _, params = ref
  x, y = images
  ev = np.asarray(_dist(params, x, y))
  k1, k2 = jax.random.key(3), jax.random.key(4)
  a = np.asarray(_dist(params, x, y, train=True, dropout_rng=k1))
  a2 = np.asarray(_dist(params, x, y, train=True, dropout_rng=k1))
  b = np.asarray(_dist(params, x, y, train=True, dropout_rng=k2))
  np.testing.assert_array_equal(a, a2)
  assert not np.array_equal(a, b) and not np.allclose(a, ev, rtol=1e-4)
  # Unbiased dropout over thousands of units: one draw stays near eval.
  np.testing.assert_allclose(a, ev, rtol=0.1)
  with pytest.raises(ValueError, match="needs dropout_rng"):
    lp.lpips_distance(params, x, y, train=True)
  with pytest.raises(ValueError, match="need train=True"):
    lp.lpips_distance(params, x, y, dropout_masks=[1.0] * 5)


# -- weights files -------------------------------------------------------


def test_vgg_names_are_the_checkpoint_converters():
  """lpips_vgg.npz (tables.lpips_table) names exactly our VGG params."""
  want = {row.flax_path: shape for row, shape in tables.lpips_table()}
  assert lp.param_shapes("vgg") == want
  assert len(lp.param_shapes("alex")) == 2 + 2 * 5 + 5


def test_npz_from_a_rho_checkpoint_loads(ref, tmp_path):
  """A CDC checkpoint with loss_fn_vgg.* -> cdc_jax.convert -> our npz."""
  net, model, _, _, params = ref
  if net != "vgg":
    pytest.skip("CDC checkpoints carry LPIPS-VGG only")
  from cdc_jax.convert import torch_checkpoint as tc

  cfg = to_config(tiny_model("eps"))
  rng = np.random.default_rng(0)
  cdc = model_dir.unflatten(
    {
      r.flax_path: rng.standard_normal(s).astype(np.float32)
      for r, s in tables.checked_table(cfg)
    }
  )
  sd = tc.to_torch_state_dict(
    cdc, cfg, {"schedule": "linear", "timesteps": 100}
  )
  sd = {k: torch.from_numpy(v) for k, v in sd.items()}
  sd.update({f"loss_fn_vgg.{k}": v for k, v in model.state_dict().items()})
  torch.save({"step": 1, "model": sd}, tmp_path / "ckpt.pt")
  tc.convert_file(str(tmp_path / "ckpt.pt"), str(tmp_path / "m"))
  loaded = lp.load(str(tmp_path / "m" / tc.LPIPS_FILE))
  fa, fb = model_dir.flatten(loaded), model_dir.flatten(params)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=1e-7, err_msg=k)


def test_save_load_and_default_lins(ref, tmp_path):
  net, _, trunk, _, params = ref
  conv.save_params(str(tmp_path / "p.npz"), params)
  back = lp.load(str(tmp_path / "p.npz"))
  again = conv.params_from_torch(str(trunk), net)  # the package's lins
  for other in (back, again):
    fa, fb = model_dir.flatten(other), model_dir.flatten(params)
    assert sorted(fa) == sorted(fb)
    for k in fa:
      np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_cli_writes_loadable_npz(ref, tmp_path, capsys):
  net, _, trunk, lins, params = ref
  out = tmp_path / "w.npz"
  argv = ["lpips", str(out), "--net", net, "--backbone", str(trunk)]
  assert cli.main([*argv, "--lins", str(lins)]) == 0
  assert str(out) in capsys.readouterr().out
  loaded = model_dir.flatten(lp.load(str(out), net))
  for k, v in model_dir.flatten(params).items():
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)


def test_errors_name_the_file_and_the_fix(ref, tmp_path, capsys):
  net, _, trunk, _, _ = ref
  other = "alex" if net == "vgg" else "vgg"
  missing = str(tmp_path / "nope.pth")
  with pytest.raises(lp.LPIPSWeightsError) as e:
    conv.params_from_torch(missing, net)
  msg = str(e.value)
  assert "\n" not in msg and missing in msg and "no such file" in msg
  assert conv.TORCHVISION_FILES[net] in msg
  with pytest.raises(lp.LPIPSWeightsError, match="missing"):
    conv.params_from_torch(str(trunk), other)  # the other net's file
  with pytest.raises(lp.LPIPSWeightsError, match="no such file") as e:
    lp.load(missing)
  assert "python -m cdc_jax.convert lpips" in str(e.value)
  status = cli.main(["lpips", str(tmp_path / "o.npz"), "--backbone", missing])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and missing in err[0]
  np.savez(tmp_path / "bad.npz", **{"lin_0/kernel": np.zeros((1, 1, 64, 1))})
  with pytest.raises(lp.LPIPSWeightsError, match="not an LPIPS params"):
    lp.load(str(tmp_path / "bad.npz"))
  (tmp_path / "text.npz").write_text("not weights")
  with pytest.raises(lp.LPIPSWeightsError, match="not a plain .npz"):
    lp.load(str(tmp_path / "text.npz"))


def test_feature_shapes_match_the_trunk(ref):
  net, model, _, _, _ = ref
  with torch.no_grad():
    outs = model.net(torch.zeros(1, 3, H, W))
  want = [(o.shape[2], o.shape[3], o.shape[1]) for o in outs]
  assert lp.feature_shapes(net, H, W) == want
  assert lp.widths(net) == tuple(model.chns)
