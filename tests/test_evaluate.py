"""The evaluation CLI end to end on a tiny model: real files, metrics,
baselines at the nearest bpp, tables, plots, grids, BD-rates, LPIPS, and
FID/KID per setting with a stand-in feature extractor (the real Inception:
test_evaluate_fid.py)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from cdc_jax import codec, evaluate, jobs, testing
from cdc_jax.convert import lpips as conv_lpips
from cdc_jax.eval import baselines, measure, pipeline, report
from cdc_jax.eval import fid as F
from cdc_jax.imageio import load_image, to_float
from cdc_jax.models import lpips as lp
from configs import eps_linear


def test_evaluate_writes_the_report(model_path, tmp_path, capsys):
  data = tmp_path / "photos"
  data.mkdir()
  for i, name in enumerate(("astronaut", "coffee")):
    img = testing.photo(name, (176, 192), 10 * i, 20 * i)
    Image.fromarray(img).save(data / f"{name}.png")
  out = tmp_path / "report"
  rc = evaluate.main(
    [
      "--model",
      f"tiny={model_path}",
      "--data",
      str(data),
      "--out",
      str(out),
      "--steps",
      "1",
      "--baselines",
      "jpeg,webp",
      "--no-progress",
    ]
  )
  assert rc == 0
  printed = capsys.readouterr().out.strip().splitlines()
  assert printed[-1] == f"report: {out}"
  assert pipeline.LPIPS_HINT in printed  # no weights: says how to get LPIPS
  assert pipeline.fid_hint() in printed  # ... and FID
  assert not os.path.exists(out / "fid_kid.json")
  with open(out / "per_image.json") as f:
    rows = json.load(f)
  assert not any("lpips" in r for r in rows)
  assert not os.path.exists(out / "rd_lpips.png")
  assert not os.path.exists(out / "rd_fid.png")
  cdc = [r for r in rows if r["codec"].startswith("cdc")]
  assert len(cdc) == 2 and {r["setting"] for r in cdc} == {"tiny"}
  for r in cdc:
    # bpp from the real file, header included, beside the estimate.
    assert r["bpp"] == pytest.approx(r["bytes"] * 8 / (176 * 192))
    assert r["estimated_bpp"] > 0 and 0 < r["ms_ssim"] <= 1
  near = [r for r in rows if r["codec"] == "jpeg at CDC bpp"]
  assert len(near) == 2
  for r in near:
    assert abs(r["bpp"] - r["target_bpp"]) < 0.5
  sweep = [r for r in rows if r["codec"] == "webp"]
  assert len(sweep) == 2 * 6
  for name in ("summary.csv", "summary.json", "rd_psnr.png", "bd_rate.json"):
    assert os.path.isfile(out / name), name
  grid = np.asarray(Image.open(out / "grids" / "astronaut.png"))
  assert grid.shape == (176, 4 * 192 + 3 * 4, 3)  # original|CDC|jpeg|webp


def test_evaluate_user_errors_are_one_line(model_path, tmp_path, capsys):
  rc = evaluate.main(
    ["--model", model_path, "--dataset", "kodak"]
    + ["--data", str(tmp_path / "no")]
    + ["--out", str(tmp_path / "o")]
  )
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no such folder (the kodak dataset" in err[0]
  rc = evaluate.main(["--model", str(tmp_path), "--out", str(tmp_path / "o")])
  assert rc == 2
  err = capsys.readouterr().err
  assert "the folder dataset (" in err and "needs its folder: --data" in err
  rc = evaluate.main(
    ["--model", str(tmp_path), "--dataset", "held_out"]
    + ["--out", str(tmp_path / "o")]
  )
  assert rc == 2
  assert "neither a model directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lpips_alex(tmp_path_factory):
  """Random-weight LPIPS-AlexNet params and their .npz (as the converter
  writes them). The lin layers are made non-negative, as trained LPIPS
  weights are (lpips clamps them), so distances are >= 0."""
  params = dict(lp.init_params("alex", jax.random.key(3)))
  for i in range(5):
    params[f"lin_{i}"] = {"kernel": jax.numpy.abs(params[f"lin_{i}"]["kernel"])}
  path = str(tmp_path_factory.mktemp("lpips") / "alex.npz")
  conv_lpips.save_params(path, params)
  return path, lp.load(path)


def _one_photo(tmp_path, size):
  """A dataset folder holding one astronaut crop of ``size``: (folder,
  the image)."""
  data = tmp_path / "photos"
  data.mkdir()
  img = testing.photo("astronaut", size, 100, 200)
  Image.fromarray(img).save(data / "a.png")
  return data, img


def test_evaluate_lpips_column(model_path, lpips_alex, tmp_path, capsys):
  path, params = lpips_alex
  data, img = _one_photo(tmp_path, (64, 96))
  out = tmp_path / "report"
  argv = ["--model", f"tiny={model_path}", "--data", str(data)]
  argv += ["--out", str(out)]
  argv += ["--steps", "1", "--baselines", "jpeg", "--no-progress"]
  argv += ["--lpips-weights", path, "--save-reconstructions"]
  assert evaluate.main(argv) == 0
  printed = capsys.readouterr().out.splitlines()
  assert pipeline.LPIPS_HINT not in printed
  header = next(ln.split() for ln in printed if "setting" in ln.split())
  assert header[-1] == "lpips"  # the summary table's LPIPS column
  with open(out / "per_image.json") as f:
    rows = json.load(f)
  assert len(rows) == 1 + 7 + 1  # CDC, the JPEG sweep, JPEG at CDC bpp
  for r in rows:
    assert np.isfinite(r["lpips"]) and r["lpips"] >= 0, r
  # A CDC row's LPIPS is the module's on (original, decoded file).
  cdc = next(r for r in rows if r["codec"].startswith("cdc"))
  rec = load_image(cdc["reconstruction"])
  want = lp.lpips_distance(params, to_float(img)[None], to_float(rec)[None])
  assert cdc["lpips"] == pytest.approx(float(want[0]), rel=1e-5, abs=1e-7)
  # Distinct images have distinct distances (not a constant column).
  assert len({round(r["lpips"], 9) for r in rows}) > 1
  with open(out / "summary.json") as f:
    summary = json.load(f)
  assert all("lpips" in r for r in summary)
  assert os.path.isfile(out / "rd_lpips.png")


def test_evaluate_bad_lpips_weights(model_path, tmp_path, capsys):
  base = ["--model", model_path, "--dataset", "held_out"]
  base += ["--out", str(tmp_path)]
  missing = str(tmp_path / "none.npz")
  assert evaluate.main(base + ["--lpips-weights", missing]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and missing in err[0] and "no such file" in err[0]
  bad = tmp_path / "bad.npz"
  bad.write_text("not weights")
  assert evaluate.main(base + ["--lpips-weights", str(bad)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(bad) in err[0]
  assert not os.path.exists(tmp_path / "per_image.json")  # failed first


def _job_config(lpips_weights: str, inception_weights: str = ""):
  c = eps_linear.get_config("tiny")
  c.eval.steps = 1
  c.log.progress = False
  c.diffusion.lpips_weights = lpips_weights
  c.eval.inception_weights = inception_weights
  return c


def test_eval_job_rejects_bad_lpips_weights(model_path, tmp_path):
  missing = str(tmp_path / "none.npz")
  with pytest.raises(lp.LPIPSWeightsError, match="none.npz"):
    jobs.eval_job(_job_config(missing), model_path)
  assert not os.path.exists(os.path.join(model_path, "eval"))  # failed first


@pytest.mark.slow
def test_eval_job_measures_lpips(model_path, lpips_alex, tmp_path):
  work = str(tmp_path / "m")
  shutil.copytree(model_path, work)
  result = jobs.eval_job(_job_config(lpips_alex[0]), work)
  assert result["rows"] and all(r["lpips"] >= 0 for r in result["rows"])
  assert os.path.isfile(os.path.join(work, "eval", "rd_lpips.png"))


def test_eval_job_rejects_bad_inception_weights(model_path, tmp_path):
  missing = str(tmp_path / "pt_inception.pth")
  with pytest.raises(F.InceptionWeightsError, match="pt_inception.pth"):
    jobs.eval_job(_job_config("", missing), model_path)
  assert not os.path.exists(os.path.join(model_path, "eval"))  # failed first


# --- FID / KID ---------------------------------------------------------------


class _Standin:
  """Stands in for the Inception extractor: [B, h, w, 3] uint8 -> [B, 12],
  the mean colour of each quarter of a patch; records the batch shapes."""

  def __init__(self):
    self.shapes = []

  def __call__(self, b):
    self.shapes.append(b.shape)
    n, h, w, _ = b.shape
    x = np.asarray(b, np.float32).reshape(n, 2, h // 2, 2, w // 2, 3)
    return x.mean(axis=(2, 4)).reshape(n, 12)


def _direct(ex, images, size=32, shifted=True):
  """The features of the protocol's patches computed without the measure."""
  stream = (F.patches(im, size, shifted) for im in images)
  return F.features(ex, stream, batch=4, progress=False)


def test_patch_features_fill_batches_across_keys():
  ex = _Standin()
  pf = measure.PatchFeatures(ex, batch=3, size=32, shifted=False)
  a = testing.photo("astronaut", (64, 96), 30, 40)  # 2x3 patches
  b = testing.photo("coffee", (32, 64), 50, 60)  # 1x2
  assert pf.add("a", a) == 6 and pf.add("b", b) == 2
  assert pf.add("c", a[:31]) == 0  # under one patch
  assert pf.add("a", b) == 2
  out = pf.features()
  assert [s[0] for s in ex.shapes] == [3] * 4  # 10 patches, full batches
  np.testing.assert_allclose(out["a"], _direct(ex, [a, b], shifted=False))
  np.testing.assert_allclose(out["b"], _direct(ex, [b], shifted=False))
  assert out["c"].shape == (0, 12)
  with pytest.raises(ValueError, match="batch must be >= 1"):
    measure.PatchFeatures(ex, batch=0)


def test_evaluate_fid_kid_per_setting(model_path, tmp_path):
  """FID/KID per CDC setting and per baseline quality, each equal to
  eval.fid on features of the reconstructions computed directly."""
  imgs = [testing.photo(n, (64, 96), 40, 60) for n in ("astronaut", "coffee")]
  ex = _Standin()
  opts = pipeline.Options(
    steps=(1,),
    baselines=("jpeg",),
    qualities=(10, 60),
    progress=False,
    save_reconstructions=True,
    fid_patch=32,  # 64x96: 2x3 tiles + 1x2 shifted = 8 patches an image
    fid_batch=5,
    kid_subset_size=8,
  )
  out = tmp_path / "report"
  refs = tmp_path / "published.csv"  # a point without FID is left out
  refs.write_text("system,bpp,psnr,fid\nHiFiC,0.18,27.56,\nX,0.3,,20.5\n")
  opts.references = str(refs)
  images = [("a.png", imgs[0]), ("b.png", imgs[1])]
  models = {"tiny": codec.load(model_path)}
  result = pipeline.evaluate(models, images, str(out), opts, extractor=ex)
  assert {s[0] for s in ex.shapes} == {5}  # full batches only
  feats = result["fid_features"]
  orig = _direct(ex, imgs)
  assert orig.shape == (16, 12)
  np.testing.assert_allclose(feats[measure.ORIGINALS], orig, rtol=1e-6)
  scale = np.trace(np.cov(orig, rowvar=False))
  assert abs(F.fid(orig, orig)) < 1e-9 * scale  # originals vs themselves
  cdc = [r for r in result["rows"] if r["codec"].startswith("cdc")]
  recs = {
    (cdc[0]["codec"], "tiny"): [load_image(r["reconstruction"]) for r in cdc]
  }
  for q in (10, 60):
    enc = [baselines.encode(im, "jpeg", q) for im in imgs]
    recs[("jpeg", f"q{q}")] = [baselines.decode(e) for e in enc]
  summary = {(r["codec"], r["setting"]): r for r in result["summary"]}
  for key, rec in recs.items():
    want = _direct(ex, rec)
    np.testing.assert_allclose(feats[key], want, rtol=1e-6)
    row = summary[key]
    assert row["fid_patches"] == 16
    assert row["fid"] == pytest.approx(F.fid(orig, want), rel=1e-6)
    kid = F.kid(orig, want, subsets=100, subset_size=8)
    assert (row["kid"], row["kid_std"]) == pytest.approx(kid, rel=1e-6)
  assert len({round(summary[k]["fid"], 6) for k in recs}) == 3
  # Per-image quality picks are no one setting: no FID.
  assert "fid" not in summary[("jpeg at CDC bpp", "nearest_bpp")]
  assert not any("fid" in r for r in result["rows"])  # dataset-level only
  with open(out / "summary.csv", newline="") as f:
    header = next(csv.reader(f))
  assert {"fid", "kid", "kid_std", "fid_patches"} <= set(header)
  with open(out / "fid_kid.json") as f:
    info = json.load(f)
  assert info["original_patches"] == 16 and info["kid_subset_size"] == 8
  assert "not meaningful" in info["note"] and len(info["settings"]) == 3
  assert pipeline.fid_lines(result) == [info["note"]]
  with open(out / "bd_rate.json") as f:
    assert "fid" in json.load(f)["bd_rate_percent"]
  assert os.path.isfile(out / "rd_fid.png")
  table = report.summary_table(result["summary"]).splitlines()
  assert table[0].split()[-2:] == ["fid", "kid"]


def test_fid_is_nan_below_two_patches(tmp_path):
  feats = {
    measure.ORIGINALS: np.arange(12.0).reshape(3, 4),
    ("jpeg", "q5"): np.arange(12.0).reshape(3, 4) ** 1.5,
    ("jpeg", "q9"): np.ones((1, 4)),  # 1 patch: no covariance
  }
  dataset = measure.fid_kid(feats, subset_size=3, subsets=4)
  assert np.isfinite(dataset[("jpeg", "q5")]["fid"])
  assert math.isnan(dataset[("jpeg", "q9")]["fid"])
  assert math.isnan(dataset[("jpeg", "q9")]["kid"])
  rows = [
    {"codec": "jpeg", "setting": f"q{q}", "image": "a", "bpp": q / 10}
    for q in (5, 9)
  ]
  opts = pipeline.Options(anchor="jpeg")
  pipeline.write_report(str(tmp_path), rows, opts, dataset)
  with open(tmp_path / "summary.json") as f:
    summary = {r["setting"]: r for r in json.load(f)}  # strict JSON
  assert summary["q9"]["fid"] is None and summary["q9"]["fid_patches"] == 1
  assert summary["q5"]["fid"] == pytest.approx(dataset[("jpeg", "q5")]["fid"])
  assert pipeline.fid_note(1).startswith("FID/KID: NaN")
  assert "not meaningful" in pipeline.fid_note(2047)
  assert "not meaningful" not in pipeline.fid_note(2048)
  only_nan = {k: v for k, v in dataset.items() if k[1] == "q9"}
  os.mkdir(tmp_path / "n")
  pipeline.write_report(str(tmp_path / "n"), rows, opts, only_nan)
  assert not os.path.exists(tmp_path / "n" / "rd_fid.png")  # nothing to draw


def test_evaluate_bad_fid_options_are_one_line(model_path, tmp_path, capsys):
  base = ["--model", model_path, "--dataset", "held_out"]
  base += ["--out", str(tmp_path)]
  missing = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  junk = tmp_path / "junk.npz"
  junk.write_text("not weights")
  cases = [
    (["--inception-weights", missing], [missing, "torch-fidelity"]),
    (["--inception-weights", str(junk)], [str(junk)]),
    (["--kid-subset-size", "1"], ["--kid-subset-size", ">= 2"]),
    (["--baselines", "jpeg", "--qualities", "0,50"], ["[1, 100]"]),
  ]
  for extra, words in cases:
    assert evaluate.main(base + extra) == 2, extra
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]
  assert not os.path.exists(tmp_path / "per_image.json")  # failed first


def test_evaluate_samplers_each_their_own_files(model_path, tmp_path, capsys):
  """--samplers ddim,dpmpp2m: one real file per sampler, each recording
  its sampler (the decode of a file is the decode of its bytes), named
  apart in the rows and the reconstructions; an unknown sampler is one
  line before any work."""
  data, img = _one_photo(tmp_path, (64, 64))
  out = tmp_path / "report"
  argv = ["--model", f"tiny={model_path}", "--data", str(data)]
  argv += ["--out", str(out)]
  argv += ["--steps", "3", "--baselines", "jpeg", "--no-progress"]
  argv += ["--samplers", "ddim,dpmpp2m", "--save-reconstructions"]
  assert evaluate.main(argv) == 0
  capsys.readouterr()
  with open(out / "per_image.json") as f:
    rows = json.load(f)
  cdc = {r["codec"]: r for r in rows if r["codec"].startswith("cdc")}
  assert set(cdc) == {"cdc S=3 gamma=0.8", "cdc dpmpp2m S=3 gamma=0.8"}
  cm = codec.load(model_path)
  for name, sampler in (("cdc", "ddim"), ("cdc dpmpp2m", "dpmpp2m")):
    r = cdc[f"{name} S=3 gamma=0.8"]
    res = codec.compress_image(cm, img, steps=3, sampler=sampler)
    want = codec.decompress(cm, res.data)
    assert r["bytes"] == len(res.data)
    np.testing.assert_array_equal(load_image(r["reconstruction"]), want)
  a, b = (load_image(r["reconstruction"]) for r in cdc.values())
  assert not np.array_equal(a, b)  # two samplers, two decodes
  bad = ["--model", model_path, "--data", str(data)]
  bad += ["--out", str(tmp_path / "o2")]
  assert evaluate.main(bad + ["--samplers", "ddim,heun", "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown sampler 'heun'" in err[0], err
  assert not os.path.exists(tmp_path / "o2")
