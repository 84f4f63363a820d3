"""Evaluation during training on a small held-out set: the set (embedded
photo or a folder), its common crop, the jitted measurement (one compile)
against the metrics computed one by one, and the training loop's
TensorBoard scalars and image."""

from __future__ import annotations

import glob
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_training
from PIL import Image

from cdc_jax import diffusion, testing, train, train_config
from cdc_jax.convert import lpips as conv_lpips
from cdc_jax.data.sources import HELD_OUT
from cdc_jax.eval import datasets, during_training, metrics
from cdc_jax.imageio import to_float
from cdc_jax.models import lpips as lp
from cdc_jax.models.cdc import from_config
from cdc_jax.sample import Sampler


def _folder(root, sizes):
  root.mkdir()
  for i, (h, w) in enumerate(sizes):
    img = testing.photo("astronaut", (h, w), 7 * i, 11 * i)
    Image.fromarray(img).save(root / f"{i:02d}.png")
  return str(root)


@pytest.fixture(scope="module")
def lpips_alex(tmp_path_factory):
  """Random LPIPS-AlexNet params with non-negative lin layers (as trained
  ones are) and their .npz."""
  params = dict(lp.init_params("alex", jax.random.key(5)))
  for i in range(5):
    params[f"lin_{i}"] = {"kernel": jnp.abs(params[f"lin_{i}"]["kernel"])}
  path = str(tmp_path_factory.mktemp("lpips") / "alex.npz")
  conv_lpips.save_params(path, params)
  return path, lp.load(path)


def test_eval_images_default_and_folder(tmp_path):
  (name, img), *rest = datasets.eval_images("", 4)
  assert name == HELD_OUT and not rest
  np.testing.assert_array_equal(img, datasets.held_out_image())
  data = _folder(tmp_path / "d", [(70, 90), (80, 66), (100, 100)])
  got = datasets.eval_images(data, 2)
  assert [n for n, _ in got] == ["00.png", "01.png"]  # sorted, first 2
  crops = datasets.crop_set([i for _, i in got], 256, 32)
  assert crops.shape == (2, 64, 64, 3)  # min side 66 -> 64, one shape
  np.testing.assert_array_equal(crops[0], got[0][1][3:67, 13:77])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="contains no images"):
    datasets.eval_images(str(tmp_path / "empty"), 2)
  with pytest.raises(ValueError, match="max_images"):
    datasets.eval_images(data, 0)
  with pytest.raises(ValueError, match="downsampling factor 96"):
    datasets.crop_set([i for _, i in got], 256, 96)


def test_set_evaluator_matches_the_metrics(lpips_alex):
  """The jitted call's values == the metrics of its reconstruction
  computed one by one; other params do not recompile."""
  model = testing.tiny_model("eps")
  params = testing.random_params(model)
  sampler = Sampler(model, diffusion.make_schedule("linear", 20000))
  img = testing.photo("astronaut", (80, 72), 100, 200)
  crops = datasets.crop_set([img], 64, model.downsampling_factor)
  _, lp_params = lpips_alex
  ev = during_training.SetEvaluator(sampler, crops, 2, 0.8, lp_params)
  means, first = ev(params)
  assert set(means) == {"psnr", "bpp", "lpips"}  # 64 px: no MS-SSIM
  assert first.shape == (64, 64, 3) and first.dtype == np.uint8
  assert means["psnr"] == pytest.approx(metrics.psnr(crops[0], first))
  x, y = to_float(crops), to_float(first)[None]
  want = float(lp.lpips_distance(lp_params, x, y)[0])
  assert means["lpips"] == pytest.approx(want, rel=1e-4) and want > 0
  assert means["bpp"] > 0 and math.isfinite(means["bpp"])
  means2, _ = ev(jax.tree.map(lambda a: a * 0.9, params))
  assert means2["psnr"] != means["psnr"]
  assert ev._fn._cache_size() == 1  # one compile for every evaluation


@pytest.mark.slow
def test_set_evaluator_ms_ssim_from_161_px():
  model = testing.tiny_model("eps")
  params = testing.random_params(model)
  sampler = Sampler(model, diffusion.make_schedule("linear", 20000))
  crops = datasets.crop_set([testing.photo("astronaut", (200, 200))], 192, 64)
  ev = during_training.SetEvaluator(sampler, crops, 1, 0.8)
  means, first = ev(params)
  assert set(means) == {"psnr", "bpp", "ms_ssim"}
  want = metrics.ms_ssim(crops[0], first)
  assert means["ms_ssim"] == pytest.approx(want, rel=1e-5)


def _event_tags(logdir: str) -> set[str]:
  """Summary tags in TensorBoard event files (TFRecord framing: length,
  its CRC, the Event proto, its CRC), read without TensorFlow."""
  from tensorboardX.proto import event_pb2

  tags = set()
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
      tags |= {v.tag for v in event.summary.value}
      pos += 12 + n + 4
  return tags


def _config(data: str, lpips_weights: str):
  c = tiny_training.config()
  c.eval.update(data=data, max_images=2, size=64, steps=1)
  c.diffusion.lpips_weights = lpips_weights
  return c


def test_evaluator_from_config(tmp_path, lpips_alex):
  """config.eval picks the set (no compile happens here)."""
  data = _folder(tmp_path / "held", [(80, 96), (72, 90), (90, 90)])
  c = _config(data, lpips_alex[0])
  model = from_config(c.model)
  measure = during_training.from_config(c, model, train._load_lpips(c))
  assert measure.crops.shape == (2, 64, 64, 3)
  assert lp.net_of(measure.lpips_params) == "alex"
  measure = during_training.from_config(_config("", ""), model)
  assert measure.crops.shape == (1, 64, 64, 3) and measure.lpips_params is None
  with pytest.raises(ValueError, match="missing"):
    during_training.from_config(_config(str(tmp_path / "missing"), ""), model)
  bad = _config("", str(tmp_path / "none.npz"))
  with pytest.raises(train_config.TrainingError, match="none.npz"):
    train._load_lpips(bad)


@pytest.mark.slow
def test_training_logs_the_folder_set(tmp_path, lpips_alex):
  data = _folder(tmp_path / "held", [(80, 96), (72, 90), (90, 90)])
  c = _config(data, lpips_alex[0])
  c.train.num_steps = 2
  c.checkpoint.every = 2
  c.eval.every = 1
  work = str(tmp_path / "run")
  last = train.train_and_evaluate(c, work)
  for k in ("eval_psnr", "eval_bpp", "eval_lpips"):
    assert math.isfinite(last[k]), k
  assert last["eval_lpips"] >= 0 and "eval_ms_ssim" not in last
  tags = _event_tags(os.path.join(work, "tb"))
  assert {"eval/psnr", "eval/bpp", "eval/lpips"} <= tags
  assert "eval/original_vs_reconstruction" in tags


def test_set_evaluator_decodes_with_its_sampler():
  """``sampler`` reaches the decode: the solver's reconstruction is the
  Sampler's own, and differs from DDIM's at the same S."""
  model = testing.tiny_model("x")
  params = testing.random_params(model)
  decoder = Sampler(model, diffusion.make_schedule("cosine", 8193))
  crops = datasets.crop_set([testing.photo("coffee", (64, 64))], 64, 64)
  got = {}
  for name in ("ddim", "dpmpp2m"):
    ev = during_training.SetEvaluator(decoder, crops, 3, 0.8, sampler=name)
    _, got[name] = ev(params)
    x = to_float(crops)
    rec, _ = decoder.reconstruct(params, x, ev._x_init, 3, sampler=name)
    want = np.asarray(during_training._to_uint8(rec)[0])
    # One jitted graph vs another: a pixel may round the other way.
    assert np.abs(got[name].astype(int) - want.astype(int)).max() <= 1
  assert np.abs(got["ddim"].astype(int) - got["dpmpp2m"].astype(int)).max() > 2
