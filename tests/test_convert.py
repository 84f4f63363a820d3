"""Tests of cdc_jax.convert (torch only for the marked few)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cdc_jax import diffusion, model_dir
from cdc_jax.convert import cli, infer, tables, transforms
from cdc_jax.convert import torch_checkpoint as tc
from cdc_jax.convert.errors import ConversionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The released checkpoints' state_dict listings: "key (shape) dtype" lines.
KEY_LISTS = os.path.join(ROOT, "tests", "data")

RELEASE = {
  "eps": dict(
    family="eps",
    dim=64,
    dim_mults=[1, 2, 3, 4, 5, 6],
    context_dim_mults=[1, 2, 3, 4],
    reverse_context_dim_mults=None,
    hyper_dims_mults=[4, 4, 4],
    context_channels=3,
    channels=3,
    dtype="float32",
  ),
  "x": dict(
    family="x",
    dim=64,
    dim_mults=[1, 2, 3, 4, 5, 6],
    context_dim_mults=[1, 2, 3, 4],
    reverse_context_dim_mults=[4, 3, 2, 1],
    hyper_dims_mults=[4, 4, 4],
    context_channels=64,
    channels=3,
    dtype="float32",
  ),
}
PARAM_COUNT = {"eps": 53_627_654, "x": 53_885_379}  # docs/model.md §1
KEY_COUNT = {"eps": 472, "x": 473}  # with the train_* buffers
TINY_DIFFUSION = {
  "eps": {"schedule": "linear", "timesteps": 100},
  "x": {"schedule": "cosine", "timesteps": 65},
}


def tiny(family: str, variant: str = "default") -> dict:
  """dim 8; "other" also changes depths and widths (3 U-Net levels...)."""
  cfg = dict(RELEASE[family], dim=8)
  if family == "x":
    cfg["context_channels"] = 8
  if variant == "other":
    cfg.update(dim_mults=[1, 2, 2], context_dim_mults=[1, 2])
    cfg.update(hyper_dims_mults=[2, 3], channels=3)
    if family == "x":
      cfg.update(reverse_context_dim_mults=[2, 1], context_channels=5)
  return cfg


def random_params(cfg: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  flat = {
    row.flax_path: rng.standard_normal(shape).astype(np.float32)
    for row, shape in tables.checked_table(cfg)
  }
  return model_dir.unflatten(flat)


def released_checkpoint(family, params, cfg, online_params=None):
  """A checkpoint dict in the released layout (numpy instead of tensors)."""
  sd = tc.to_torch_state_dict(params, cfg, TINY_DIFFUSION[family])
  if family == "eps":
    return {"step": 3, "model": sd}
  online = tc.to_torch_state_dict(online_params, cfg, TINY_DIFFUSION[family])
  ema = {"initted": np.ones(1, np.float32), "step": np.array([5])}
  ema.update({f"online_model.{k}": v for k, v in online.items()})
  ema.update({f"ema_model.{k}": v for k, v in sd.items()})
  return {"step": 3, "model": online, "ema": ema}


def assert_same_params(a, b):
  fa, fb = model_dir.flatten(a), model_dir.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# -- the released key sets -----------------------------------------------------


@pytest.mark.parametrize("family", ["eps", "x"])
def test_release_key_set(family):
  table = tables.checked_table(RELEASE[family])
  buffers = infer.RELEASE_DIFFUSION[family]
  n_buffers = 7 if family == "x" else 6
  assert len(table) + n_buffers == KEY_COUNT[family]
  assert sum(int(np.prod(s)) for _, s in table) == PARAM_COUNT[family]
  shapes = {r.torch_key: r.transform.torch_shape(s) for r, s in table}
  u, c = "denoise_fn.", "context_fn."
  slot = 2 if family == "eps" else 1
  cin = 6 if family == "eps" else 67
  cctx = 3 if family == "eps" else 64
  assert shapes[u + "time_mlp.0.weight"] == (256, 1)
  assert shapes[u + "downs.0.0.block1.block.0.weight"] == (64, cin, 7, 7)
  assert shapes[u + "downs.0.0.res_conv.weight"] == (64, cin, 1, 1)
  assert shapes[u + "downs.0.2.fn.norm.g"] == (1, 64, 1, 1)
  assert shapes[u + "mid_attn.fn.fn.to_qkv.weight"] == (1152, 384, 1, 1)
  assert shapes[u + "ups.0.0.block1.block.0.weight"] == (320, 768, 3, 3)
  assert shapes[u + "ups.0.3.conv.weight"] == (320, 320, 4, 4)
  assert shapes[u + "final_conv.1.weight"] == (3, 64, 7, 7)
  assert shapes[c + "prior._medians"] == (1, 256, 1, 1)
  assert shapes[c + "prior.affine.0.weight"] == (256, 1, 1, 1, 3)
  assert shapes[c + "prior.affine.3.bias"] == (256, 1, 1, 1, 1)
  assert shapes[c + "prior.a.2"] == (256, 1, 1, 1, 3)
  assert shapes[c + f"enc.0.{slot}.conv.weight"] == (64, 64, 3, 3)
  assert shapes[c + f"dec.3.{slot}.conv.weight"] == (64, cctx, 4, 4)
  assert shapes[c + "hyper_dec.0.0.weight"] == (256, 256, 5, 5)
  assert shapes[c + "hyper_dec.2.0.weight"] == (512, 256, 3, 3)
  assert buffers["timesteps"] == (20000 if family == "eps" else 8193)


def released_keys(name: str) -> list[str]:
  """The "key (shape)" lines of tests/data/cdc_keys_{name}.txt, in order."""
  with open(os.path.join(KEY_LISTS, f"cdc_keys_{name}.txt")) as f:
    return [line.rsplit(" ", 1)[0] for line in f.read().splitlines()]


@pytest.mark.parametrize("family", ["eps", "x"])
def test_release_key_list_matches_spec(family):
  """Same keys, order and shapes as the released files' state dicts."""
  want = released_keys({"eps": "epsparam", "x": "xparam"}[family])
  dcfg = infer.RELEASE_DIFFUSION[family]
  buffers = [
    f"{k} {v.shape}"
    for k, v in diffusion.reference_buffers(
      dcfg["schedule"], dcfg["timesteps"]
    ).items()
  ]
  if family == "x":  # train_snr comes first in the file
    buffers = [buffers[-1], *buffers[:-1]]
  rows = [
    f"{r.torch_key} {r.transform.torch_shape(s)}"
    for r, s in tables.checked_table(RELEASE[family])
  ]
  assert buffers + rows == want


def test_lpips_key_list_matches_release():
  """The LPIPS table plus its ``lins.*`` aliases: the rho > 0 extra keys."""
  table = tables.lpips_table()
  shapes = {r.torch_key: r.transform.torch_shape(s) for r, s in table}
  rows = [f"{r.torch_key} {shapes[r.torch_key]}" for r, _ in table]
  rows += [f"{a} {shapes[k]}" for a, k in tables.lpips_aliases().items()]
  assert rows == released_keys("lpips_extra")


@pytest.mark.parametrize("family", ["eps", "x"])
def test_infer_release_config(family):
  table = tables.checked_table(RELEASE[family])
  zero = np.float32(0)
  state = {
    r.torch_key: np.broadcast_to(zero, r.transform.torch_shape(s))
    for r, s in table
  }
  assert infer.detect_family(state) == family
  assert infer.infer_model_config(state, family) == RELEASE[family]


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "other"])
@pytest.mark.parametrize("family", ["eps", "x"])
def test_round_trip(family, variant):
  cfg = tiny(family, variant)
  params = random_params(cfg, 0)
  online = random_params(cfg, 1)
  ckpt = released_checkpoint(family, params, cfg, online)
  conv = tc.convert_checkpoint(ckpt)
  assert conv.model_config == cfg
  assert conv.diffusion_config == TINY_DIFFUSION[family]
  assert conv.source == ("model" if family == "eps" else "ema")
  assert conv.lpips is None
  assert_same_params(conv.params, params)
  # The inverse reproduces the released layout exactly.
  back = tc.to_torch_state_dict(
    conv.params, conv.model_config, conv.diffusion_config
  )
  if family == "eps":
    want = ckpt["model"]
  else:
    n = len("ema_model.")
    want = {k[n:]: v for k, v in ckpt["ema"].items() if k[:n] == "ema_model."}
  assert list(back) == list(want)
  for k in back:
    np.testing.assert_array_equal(back[k], want[k], err_msg=k)


def test_no_ema_takes_the_online_model():
  cfg = tiny("x")
  params, online = random_params(cfg, 0), random_params(cfg, 1)
  ckpt = released_checkpoint("x", params, cfg, online)
  conv = tc.convert_checkpoint(ckpt, use_ema=False)
  assert conv.source == "model"
  assert_same_params(conv.params, online)
  del ckpt["ema"]
  assert tc.convert_checkpoint(ckpt).source == "model"


def test_bare_state_dict_is_accepted():
  cfg = tiny("eps")
  params = random_params(cfg)
  sd = tc.to_torch_state_dict(params, cfg, TINY_DIFFUSION["eps"])
  conv = tc.convert_checkpoint(sd, family="eps")
  assert conv.source == "state_dict"
  assert_same_params(conv.params, params)


def test_transforms_invert():
  rng = np.random.default_rng(0)
  for t, shape in (
    (transforms.CONV, (3, 5, 2, 7)),
    (transforms.CONV_T, (4, 4, 3, 6)),
    (transforms.LINEAR, (3, 5)),
    (transforms.CHANNELS, (6,)),
    (transforms.PRIOR_MATRIX, (4, 3, 1)),
    (transforms.PRIOR_VECTOR, (4, 3)),
  ):
    k = rng.standard_normal(shape)
    w = t.to_torch(k)
    assert w.shape == t.torch_shape(shape), t.name
    np.testing.assert_array_equal(t.to_flax(w), k, err_msg=t.name)


# -- errors --------------------------------------------------------------------


@pytest.fixture
def eps_checkpoint():
  cfg = tiny("eps")
  return released_checkpoint("eps", random_params(cfg), cfg)


def test_missing_key(eps_checkpoint):
  key = "context_fn.enc.1.0.block2.block.1.g"
  del eps_checkpoint["model"][key]
  with pytest.raises(ConversionError, match=f"missing 1 keys \\[{key}\\]"):
    tc.convert_checkpoint(eps_checkpoint)


def test_missing_key_needed_for_the_config(eps_checkpoint):
  del eps_checkpoint["model"]["denoise_fn.time_mlp.2.weight"]
  with pytest.raises(ConversionError, match="time_mlp.2.weight"):
    tc.convert_checkpoint(eps_checkpoint)


def test_many_missing_keys_are_truncated(eps_checkpoint):
  sd = eps_checkpoint["model"]
  for k in [k for k in sd if ".ups." in k][:20]:
    del sd[k]
  with pytest.raises(ConversionError, match=r"missing 20 keys .*12 more\)"):
    tc.convert_checkpoint(eps_checkpoint)


def test_unexpected_key(eps_checkpoint):
  eps_checkpoint["model"]["denoise_fn.extra.weight"] = np.zeros(3)
  with pytest.raises(ConversionError, match=r"unexpected 1 keys .*extra"):
    tc.convert_checkpoint(eps_checkpoint)


def test_wrong_shape(eps_checkpoint):
  key = "denoise_fn.downs.1.2.fn.fn.to_qkv.weight"
  eps_checkpoint["model"][key] = np.zeros((5, 5, 1, 1), np.float32)
  msg = f"{key}: expected \\(48, 16, 1, 1\\), got \\(5, 5, 1, 1\\)"
  with pytest.raises(ConversionError, match=msg):
    tc.convert_checkpoint(eps_checkpoint)


def test_wrong_family(eps_checkpoint):
  with pytest.raises(ConversionError, match="checkpoint is a eps model"):
    tc.convert_checkpoint(eps_checkpoint, family="x")


def test_unknown_family(eps_checkpoint):
  del eps_checkpoint["model"]["context_fn.enc.0.2.conv.weight"]
  with pytest.raises(ConversionError, match="cannot tell the model family"):
    tc.convert_checkpoint(eps_checkpoint)


def test_schedule_buffer_mismatch(eps_checkpoint):
  eps_checkpoint["model"]["train_betas"] = (
    eps_checkpoint["model"]["train_betas"] * 1.01
  )
  with pytest.raises(ConversionError, match="train_betas does not match"):
    tc.convert_checkpoint(eps_checkpoint)


@pytest.mark.parametrize(
  "ckpt, msg",
  [
    ([1, 2], "expected a dict, got list"),
    ({"step": 1, "optimizer": {}}, "no 'model' state dict"),
    ({"model": "weights"}, "no 'model' state dict"),
  ],
)
def test_not_a_cdc_checkpoint(ckpt, msg):
  with pytest.raises(ConversionError, match=msg):
    tc.convert_checkpoint(ckpt)


def _lpips_state(rng):
  state = {}
  for row, shape in tables.lpips_table():
    w = rng.standard_normal(shape).astype(np.float32)
    state[row.torch_key] = row.transform.to_torch(w)
  for alias, key in tables.lpips_aliases().items():
    state[alias] = state[key].copy()
  return state


def test_lpips_weights_are_kept_aside(eps_checkpoint):
  rng = np.random.default_rng(0)
  lp = _lpips_state(rng)
  eps_checkpoint["model"].update(lp)
  conv = tc.convert_checkpoint(eps_checkpoint)
  assert len(conv.lpips) == 2 + 2 * 13 + 5
  assert conv.lpips["features_28/kernel"].shape == (3, 3, 512, 512)
  assert conv.lpips["lin_0/kernel"].shape == (1, 1, 64, 1)
  assert conv.lpips["scaling_layer/shift"].shape == (3,)
  np.testing.assert_array_equal(
    conv.lpips["lin_2/kernel"][0, 0, :, 0],
    lp["loss_fn_vgg.lin2.model.1.weight"][0, :, 0, 0],
  )
  eps_checkpoint["model"]["loss_fn_vgg.lins.1.model.1.weight"] += 1
  with pytest.raises(ConversionError, match="lins.1.model.1.weight differs"):
    tc.convert_checkpoint(eps_checkpoint)


# -- CLI -----------------------------------------------------------------------


def test_cli_help(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: python -m cdc_jax.convert ")
  for word in ("checkpoint", "lpips", "inception"):
    assert word in out
  with pytest.raises(SystemExit) as e:
    cli.main(["checkpoint", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: python -m cdc_jax.convert checkpoint ")
  for word in ("output_dir", "--family", "--ema", "--no-ema", "--overwrite"):
    assert word in out
  for command, word in (("lpips", "--backbone"), ("inception", "source")):
    with pytest.raises(SystemExit) as e:
      cli.main([command, "--help"])
    assert e.value.code == 0 and word in capsys.readouterr().out


def test_cli_needs_a_command(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([])
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith("usage: python -m cdc_jax.convert")


def test_cli_without_torch(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  status = cli.main(["checkpoint", str(tmp_path / "a.pt"), str(tmp_path / "o")])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1
  assert "pip install -r requirements-torch.txt" in err[0]


def test_python_m_cdc_jax_convert(tmp_path):
  """The module entry point: exit status and one-line errors on stderr."""

  def run(*args):
    cmd = [sys.executable, "-m", "cdc_jax.convert", *args]
    kw = dict(cwd=ROOT, capture_output=True, text=True, timeout=300)
    return subprocess.run(cmd, **kw)

  done = run("checkpoint", "--help")
  assert done.returncode == 0, done.stderr
  assert "--no-ema" in done.stdout
  done = run("checkpoint", str(tmp_path / "nope.pt"), str(tmp_path / "o"))
  err = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(err) == 1, done.stderr
  assert err[0].startswith("python -m cdc_jax.convert: error: ")
  assert "not found" in err[0] or "requirements-torch.txt" in err[0]
  assert not os.path.exists(tmp_path / "o")


# -- with torch ----------------------------------------------------------------


class NotWeights:
  """Pickled by torch.save, refused by torch.load(weights_only=True)."""


def _to_torch(tree):
  import torch

  if isinstance(tree, dict):
    return {k: _to_torch(v) for k, v in tree.items()}
  if isinstance(tree, np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(tree))
  return tree


@pytest.mark.parametrize("family", ["eps", "x"])
def test_cli_round_trip_with_torch(family, tmp_path, capsys):
  torch = pytest.importorskip("torch")
  cfg = tiny(family)
  params, online = random_params(cfg, 0), random_params(cfg, 1)
  ckpt = released_checkpoint(family, params, cfg, online)
  if family == "x":  # an LPIPS-trained (rho > 0) file
    lp = _lpips_state(np.random.default_rng(2))
    ckpt["ema"].update({f"ema_model.{k}": v for k, v in lp.items()})
    ckpt["ema"].update({f"online_model.{k}": v for k, v in lp.items()})
  path, out = tmp_path / "ckpt.pt", tmp_path / "model"
  torch.save(_to_torch(ckpt), path)
  argv = ["checkpoint", str(path), str(out), "--family", family]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert f"family {family}" in printed
  loaded = model_dir.load(str(out))
  assert loaded.model_config == cfg
  assert loaded.diffusion_config == TINY_DIFFUSION[family]
  assert_same_params(loaded.params, params)
  assert loaded.tables is not None and "y_scale_table" in loaded.tables
  has_lpips = os.path.isfile(out / tc.LPIPS_FILE)
  assert has_lpips == (family == "x")
  if has_lpips:
    with np.load(out / tc.LPIPS_FILE) as z:
      assert z["features_0/kernel"].shape == (3, 3, 3, 64)


@pytest.mark.parametrize("content", ["garbage", "object"])
def test_cli_not_a_checkpoint_file(content, tmp_path, capsys):
  torch = pytest.importorskip("torch")
  path = tmp_path / "bad.pt"
  if content == "garbage":
    path.write_bytes(b"this is not a checkpoint")
  else:
    torch.save({"model": NotWeights()}, path)
  status = cli.main(["checkpoint", str(path), str(tmp_path / "out")])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1
  assert "not a PyTorch checkpoint readable with weights_only=True" in err[0]
  # torch's own text suggests unpickling the file; never pass that on.
  assert "weights_only=False" not in err[0] and "\x1b" not in err[0]
  if content == "object":
    assert "pickled Python objects" in err[0]
  assert not os.path.exists(tmp_path / "out")


def test_cli_missing_file(tmp_path, capsys):
  pytest.importorskip("torch")
  argv = ["checkpoint", str(tmp_path / "nope.pt"), str(tmp_path / "o")]
  assert cli.main(argv) == 2
  assert "not found" in capsys.readouterr().err


# Layer conventions: our layers with converted torch weights vs torch.

CONVS = [(3, 1, 1), (3, 2, 1), (5, 2, 2), (1, 1, 0), (7, 1, 3)]
CONV_TS = [(4, 2, 1, 0), (5, 2, 2, 1)]


@pytest.mark.parametrize("k, stride, pad", CONVS)
def test_conv_matches_torch(k, stride, pad):
  torch = pytest.importorskip("torch")
  from cdc_jax.models import layers

  rng = np.random.default_rng(k + stride)
  x = rng.standard_normal((2, 5, 12, 10)).astype(np.float32)
  w = rng.standard_normal((7, 5, k, k)).astype(np.float32) * 0.2
  b = rng.standard_normal(7).astype(np.float32)
  want = torch.nn.functional.conv2d(
    torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride, pad
  ).numpy()
  conv = layers.Conv(7, k, stride, pad)
  p = {"kernel": transforms.CONV.to_flax(w), "bias": b}
  got = conv.apply({"params": p}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5)


@pytest.mark.parametrize("k, stride, pad, out_pad", CONV_TS)
def test_conv_transpose_matches_torch(k, stride, pad, out_pad):
  torch = pytest.importorskip("torch")
  from cdc_jax.models import layers

  rng = np.random.default_rng(k)
  x = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
  w = rng.standard_normal((5, 7, k, k)).astype(np.float32) * 0.2
  b = rng.standard_normal(7).astype(np.float32)
  want = torch.nn.functional.conv_transpose2d(
    torch.from_numpy(x),
    torch.from_numpy(w),
    torch.from_numpy(b),
    stride,
    pad,
    out_pad,
  ).numpy()
  assert want.shape[2:] == (12, 8)
  conv = layers.ConvTranspose(7, k, stride, pad, out_pad)
  p = {"kernel": transforms.CONV_T.to_flax(w), "bias": b}
  got = conv.apply({"params": p}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5)


def test_dense_matches_torch():
  torch = pytest.importorskip("torch")
  from cdc_jax.models import layers

  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5)).astype(np.float32)
  w = rng.standard_normal((4, 5)).astype(np.float32)
  b = rng.standard_normal(4).astype(np.float32)
  want = torch.nn.functional.linear(
    torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
  ).numpy()
  p = {"kernel": transforms.LINEAR.to_flax(w), "bias": b}
  got = layers.Dense(4).apply({"params": p}, x)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_layer_norm_matches_torch():
  torch = pytest.importorskip("torch")
  from cdc_jax.models import layers

  rng = np.random.default_rng(0)
  x = (rng.standard_normal((2, 6, 5, 4)) * 3 + 1).astype(np.float32)
  g = rng.standard_normal((1, 6, 1, 1)).astype(np.float32)
  b = rng.standard_normal((1, 6, 1, 1)).astype(np.float32)
  # The original's channel LayerNorm (docs/model.md §2.3): biased variance,
  # eps 1e-5.
  xt = torch.from_numpy(x)
  var = torch.var(xt, dim=1, unbiased=False, keepdim=True)
  mean = torch.mean(xt, dim=1, keepdim=True)
  want = (xt - mean) / (var + 1e-5).sqrt() * torch.from_numpy(g)
  want = (want + torch.from_numpy(b)).numpy()
  p = {
    "scale": transforms.CHANNELS.to_flax(g),
    "bias": transforms.CHANNELS.to_flax(b),
  }
  got = layers.LayerNorm().apply({"params": p}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5)
