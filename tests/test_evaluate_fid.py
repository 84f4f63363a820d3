"""FID/KID in the evaluation reports with the real FID InceptionV3 (random
weights, written to an .npz here; nothing is downloaded): the CLI's
per-setting FID/KID on 256-px patches equal eval.fid on features computed
directly, and the main job's --mode=eval with eval.inception_weights.
The cheap stand-in-extractor tests are in test_evaluate.py."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from test_inception import _random_state

from cdc_jax import evaluate, jobs, testing
from cdc_jax.convert import inception as ci
from cdc_jax.eval import baselines, pipeline
from cdc_jax.eval import fid as F
from cdc_jax.imageio import load_image
from configs import eps_linear


@pytest.fixture(scope="module")
def inception_npz(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "inception.npz")
  ci.save_variables(path, ci.variables_from_state_dict(_random_state()))
  return path


@pytest.mark.slow
def test_cli_fid_kid_with_inception(
  model_path, inception_npz, tmp_path, capsys
):
  # 256x384: one 256-px tile an image (no shifted pass under 384 px).
  imgs = [
    testing.photo("astronaut", (256, 384), 100, 60),
    testing.photo("coffee", (256, 384), 80, 100),
  ]
  data = tmp_path / "photos"
  data.mkdir()
  for i, img in enumerate(imgs):
    Image.fromarray(img).save(data / f"{i}.png")
  out = tmp_path / "report"
  argv = ["--model", f"tiny={model_path}", "--data", str(data)]
  argv += ["--out", str(out)]
  argv += ["--steps", "1", "--baselines", "jpeg", "--qualities", "50"]
  argv += ["--inception-weights", inception_npz, "--fid-batch", "2"]
  argv += ["--no-progress", "--save-reconstructions"]
  assert evaluate.main(argv) == 0
  printed = capsys.readouterr().out.splitlines()
  assert pipeline.fid_note(2) in printed
  header = next(ln.split() for ln in printed if "setting" in ln.split())
  assert header[-2:] == ["fid", "kid"]
  with open(out / "summary.json") as f:
    summary = {(r["codec"], r["setting"]): r for r in json.load(f)}
  with open(out / "per_image.json") as f:
    cdc = [r for r in json.load(f) if r["codec"].startswith("cdc")]
  ex = F.load_inception(inception_npz)

  def feats(images):
    return F.patch_features(ex, images, batch=2, progress=False)

  orig = feats(imgs)
  assert orig.shape == (2, 2048)
  tr = np.trace(np.cov(orig, rowvar=False))
  # Originals vs themselves: 0 up to the round-off of the square roots of
  # 2047 zero eigenvalues (rank 1 from 2 patches).
  assert abs(F.fid(orig, orig)) < 1e-4 * tr
  recs = {
    (cdc[0]["codec"], "tiny"): [load_image(r["reconstruction"]) for r in cdc],
    ("jpeg", "q50"): [
      baselines.decode(baselines.encode(im, "jpeg", 50)) for im in imgs
    ],
  }
  for key, rec in recs.items():
    row, want = summary[key], feats(rec)
    assert row["fid_patches"] == 2 and row["fid"] > 0
    assert row["fid"] == pytest.approx(F.fid(orig, want), rel=1e-4)
    kid = F.kid(orig, want, subset_size=2)
    assert row["kid"] == pytest.approx(kid[0], rel=1e-3, abs=1e-9)
  assert os.path.isfile(out / "rd_fid.png")


@pytest.mark.slow
def test_eval_job_fid_on_the_held_out_photo(
  model_path, inception_npz, tmp_path, capsys
):
  work = str(tmp_path / "m")
  shutil.copytree(model_path, work)
  c = eps_linear.get_config("tiny")
  c.eval.steps = 1
  c.log.progress = False
  c.eval.inception_weights = inception_npz
  result = jobs.eval_job(c, work)
  # The 300x451 held-out photo holds one 256-px patch: FID is NaN, and
  # the report says why.
  assert result["fid"]["original_patches"] == 1
  assert pipeline.fid_note(1) in capsys.readouterr().out.splitlines()
  cdc = next(r for r in result["summary"] if r["codec"].startswith("cdc"))
  assert cdc["fid_patches"] == 1 and math.isnan(cdc["fid"])
  with open(os.path.join(work, "eval", "fid_kid.json")) as f:
    info = json.load(f)
  assert all(s["fid"] is None for s in info["settings"])
  assert np.isnan([r["kid"] for r in result["summary"] if "kid" in r]).all()
