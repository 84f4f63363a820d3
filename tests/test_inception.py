"""The FID InceptionV3 (cdc_jax.models.inception, with its .npz loader),
its weights converter (cdc_jax.convert.inception and the ``inception``
command of python -m cdc_jax.convert) and eval.fid's loader, against
torch-fidelity 0.4.0's FeatureExtractorInceptionV3 built from a random
state dict saved to a temporary file (nothing is downloaded)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cdc_jax.convert import cli
from cdc_jax.convert import inception as ci
from cdc_jax.eval import fid as F
from cdc_jax.models import inception as inc
from cdc_jax.testing import photo

FEATURE_TOL = 1e-4  # max |ours - torch| / max |torch|
RESIZE_TOL = 1e-4  # on the [0, 255] scale


def _random_state(seed: int = 0) -> dict[str, np.ndarray]:
  """A torch-layout state dict with roughly variance-preserving weights
  (He-scaled convs, BN stats/affines around 1 and 0), plus the fc head."""
  rng = np.random.default_rng(seed)
  state = {}
  for row, shape in ci.table():
    s = row.transform.torch_shape(shape)
    k = row.torch_key
    if k.endswith("conv.weight"):
      v = rng.normal(0, np.sqrt(2 / np.prod(s[1:])), s)
    elif k.endswith(("running_var", "bn.weight")):
      v = rng.uniform(0.5, 1.5, s)
    else:  # running_mean, bn.bias
      v = rng.normal(0, 0.1, s)
    state[k] = v.astype(np.float32)
  state["fc.weight"] = rng.normal(0, 0.01, (1008, 2048)).astype(np.float32)
  state["fc.bias"] = np.zeros(1008, np.float32)
  return state


@pytest.fixture(scope="module")
def state():
  return _random_state()


@pytest.fixture(scope="module")
def npz(state, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "inception.npz")
  ci.save_variables(path, ci.variables_from_state_dict(state))
  return path


@pytest.fixture(scope="module")
def extractor(npz):
  return F.load_inception(npz)


def _images():
  """2 photo crops, 64x96 (resized to 299x299 inside)."""
  a = photo("astronaut", (64, 96), 100, 180)
  b = photo("coffee", (64, 96), 200, 300)
  return np.stack([a, b])


# --- the variable table and the converter ---------------------------------


def test_table_is_torchvision_inception3_naming():
  """pytorch-fid's file is torchvision's Inception3(num_classes=1008,
  aux_logits=False) state dict: same keys and shapes as our table."""
  torchvision = pytest.importorskip("torchvision")
  net = torchvision.models.inception_v3(
    weights=None, aux_logits=False, init_weights=False, num_classes=1008
  )
  ref = {
    k: tuple(v.shape)
    for k, v in net.state_dict().items()
    if not k.endswith("num_batches_tracked") and not k.startswith("fc.")
  }
  ours = {r.torch_key: r.transform.torch_shape(s) for r, s in ci.table()}
  assert ours == ref


def test_converter_round_trip(state, tmp_path):
  # pytorch-fid / DataParallel style keys are accepted too.
  noisy = {f"module.{k}": v for k, v in state.items()}
  noisy["module.Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.array(3)
  flat = ci.variables_from_state_dict(noisy)
  assert set(flat) == set(inc.variable_shapes())
  assert all(flat[k].shape == s for k, s in inc.variable_shapes().items())
  path = str(tmp_path / "v.npz")
  ci.save_variables(path, flat)
  back = ci.to_torch_state_dict(inc.load_variables(path))
  assert set(back) == set(state) - {"fc.weight", "fc.bias"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, state[k], err_msg=k)
  # The .npz CLI source path (no torch needed) writes the same arrays.
  out = str(tmp_path / "again.npz")
  assert cli.main(["inception", path, out]) == 0
  again = inc.load_variables(out)
  assert all(np.array_equal(again[k], flat[k]) for k in flat)


def _raises(path, *words):
  with pytest.raises(inc.InceptionWeightsError) as e:
    F.load_inception(path)
  msg = str(e.value)
  assert "\n" not in msg
  for w in words:
    assert w in msg, msg


def test_missing_and_invalid_files(state, tmp_path, capsys):
  url = "toshas/torch-fidelity/releases"
  missing = str(tmp_path / "weights-inception-2015-12-05-6726825d.pth")
  _raises(missing, missing, "no such file", url, "cdc_jax.convert inception")
  assert cli.main(["inception", missing, str(tmp_path / "o.npz")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and missing in err and url in err
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a weights file")
  _raises(str(junk), str(junk))
  wrong = str(tmp_path / "wrong.npz")
  np.savez(wrong, a=np.zeros(3, np.float32))
  _raises(wrong, wrong, "not FID InceptionV3 variables", url)
  flat = ci.variables_from_state_dict(state)
  flat["params/Conv2d_1a_3x3/bn/scale"] = np.full(32, np.nan, np.float32)
  ci.save_variables(wrong, flat)
  _raises(wrong, "non-finite", "Conv2d_1a_3x3")


def test_wrong_state_dicts(state):
  def err(s):
    with pytest.raises(inc.InceptionWeightsError) as e:
      ci.variables_from_state_dict(s, "X.pth")
    return str(e.value)

  assert "torchvision's ImageNet" in err(
    state | {"AuxLogits.fc.weight": np.zeros((1000, 768))}
  )
  assert "1008" in err(state | {"fc.weight": np.zeros((1000, 2048))})
  short = {k: v for k, v in state.items() if "Mixed_7c" not in k}
  assert "missing [Mixed_7c." in err(short)
  assert "unexpected [extra]" in err(state | {"extra": np.zeros(1)})
  bad = state | {"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5))}
  assert "(32, 3, 3, 3)" in err(bad)


# --- the resize ------------------------------------------------------------


@pytest.mark.parametrize("n_in, n_out", [(5, 12), (12, 5), (7, 7)])
def test_resize_tf1_on_a_ramp(n_in, n_out):
  """TF1 (align_corners=False) samples x_j = j * n_in / n_out, clamped to
  the last pixel: a linear ramp comes back as exactly that."""
  ramp = np.arange(n_in, dtype=np.float32)[None, None, :, None]
  x = np.broadcast_to(ramp, (1, 3, n_in, 2))  # x[..., w, :] = w
  y = np.asarray(inc.resize_tf1(x, (3, n_out)))
  coords = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
  want = np.minimum(coords, n_in - 1)
  np.testing.assert_allclose(y[0, 1, :, 0], want, rtol=0, atol=1e-5)
  # Half-pixel resizers (jax.image.resize) differ when the size changes.
  half = jax.image.resize(x, (1, 3, n_out, 2), "bilinear")
  assert n_in == n_out or not np.allclose(half, y, atol=1e-3)


def test_resize_matches_torch_fidelity():
  torch = pytest.importorskip("torch")
  tf1 = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
  rng = np.random.default_rng(1)
  for shape in [(1, 17, 23, 3), (2, 64, 96, 3), (1, 400, 333, 3)]:
    x = rng.uniform(0, 255, shape).astype(np.float32)
    want = tf1.interpolate_bilinear_2d_like_tensorflow1x(
      torch.from_numpy(x).permute(0, 3, 1, 2),
      size=(299, 299),
      align_corners=False,
    )
    got = np.asarray(inc.resize_tf1(x))
    want = want.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=RESIZE_TOL)


# --- the network -----------------------------------------------------------


def test_extractor_checks_its_input(extractor):
  with pytest.raises(ValueError, match="uint8 images"):
    extractor(np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="uint8 images"):
    extractor(np.zeros((8, 8, 3), np.uint8))


def test_parity_with_torch_fidelity(state, npz, extractor, tmp_path):
  torch = pytest.importorskip("torch")
  fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
  pth = str(tmp_path / "weights-inception-random.pth")
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
  ref_net = fe.FeatureExtractorInceptionV3(
    "inception-v3-compat", ["2048"], feature_extractor_weights_path=pth
  )
  imgs = _images()
  with torch.no_grad():
    (want,) = ref_net(torch.from_numpy(imgs).permute(0, 3, 1, 2))
  want = want.numpy()
  got = F.features(extractor, [imgs], batch=2, progress=False)
  assert got.shape == (2, 2048) and got.dtype == np.float32
  assert want.std() > 0.1 * np.abs(want).max()  # a non-degenerate net
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f"InceptionV3 features: max |ours - torch-fidelity| / max = {err:.2e}")
  assert err < FEATURE_TOL
  # The .pth converts with the CLI to the variables the features above
  # came from.
  out = str(tmp_path / "converted.npz")
  assert cli.main(["inception", pth, out]) == 0
  flat, again = inc.load_variables(npz), inc.load_variables(out)
  assert all(np.array_equal(again[k], flat[k]) for k in flat)
  # eval.fid reads the .pth itself too (converted in memory).
  direct = F.load_inception(pth).variables
  jax.tree.map(np.testing.assert_array_equal, direct, extractor.variables)
