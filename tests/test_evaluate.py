"""The evaluation CLI end to end on a tiny model: real files, metrics,
baselines at the nearest bpp, tables, plots, grids, BD-rates."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cdc_jax import evaluate, testing


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("m") / "eps")
  testing.export_tiny(path, "eps")
  return path


def test_evaluate_writes_the_report(model, tmp_path, capsys):
  data = tmp_path / "photos"
  data.mkdir()
  for i, name in enumerate(("astronaut", "coffee")):
    img = testing.photo(name, (176, 192), 10 * i, 20 * i)
    Image.fromarray(img).save(data / f"{name}.png")
  out = tmp_path / "report"
  rc = evaluate.main(
    [
      "--model",
      f"tiny={model}",
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
  with open(out / "per_image.json") as f:
    rows = json.load(f)
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


def test_evaluate_user_errors_are_one_line(model, tmp_path, capsys):
  rc = evaluate.main(
    ["--model", model, "--dataset", "kodak", "--data", str(tmp_path / "no")]
    + ["--out", str(tmp_path / "o")]
  )
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "kodak folder does not exist" in err[0]
  rc = evaluate.main(["--model", str(tmp_path), "--out", str(tmp_path / "o")])
  assert rc == 2
  assert "neither a model directory" in capsys.readouterr().err
