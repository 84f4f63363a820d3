"""The main job's held-out report (end of training, ``--mode=eval``): the
evaluation pipeline on the held-out photo, with the file kept."""

import os
import shutil

import numpy as np

from cdc_jax import codec, jobs
from cdc_jax.imageio import load_image
from configs import eps_linear


def _config():
  c = eps_linear.get_config("tiny")
  c.eval.steps = 1
  c.log.progress = False
  return c


def test_the_report_keeps_a_file_that_decodes_to_its_reconstruction(
  model_path, tmp_path, capsys
):
  work = str(tmp_path / "work")
  shutil.copytree(model_path, work)
  result = jobs.held_out_report(_config(), work)
  printed = capsys.readouterr().out.splitlines()
  (row,) = [r for r in result["rows"] if r["codec"].startswith("cdc")]
  assert row["file"].startswith(os.path.join(work, jobs.REPORT_DIR))
  with open(row["file"], "rb") as f:
    data = f.read()
  assert len(data) == row["bytes"]
  assert row["bpp"] == 8 * len(data) / (row["height"] * row["width"])
  rec = codec.decompress(codec.load(work), data)
  np.testing.assert_array_equal(rec, load_image(row["reconstruction"]))
  assert printed[0].startswith(f"{row['image']}, {row['codec']}: ")
  assert f"file: {row['file']}" in printed
  near = [r for r in result["rows"] if r["codec"].endswith("at CDC bpp")]
  assert {r["codec"].split()[0] for r in near} >= {"jpeg", "webp"}
  grid = load_image(result["grids"][0])
  h, w = row["height"], row["width"]
  assert grid.shape[0] == h and grid.shape[1] >= (2 + len(near)) * w


def test_no_demonstration_note_for_a_real_dataset(model_path, tmp_path, capsys):
  work = str(tmp_path / "work")
  shutil.copytree(model_path, work)
  c = _config()
  c.data.name = "folder"
  jobs.held_out_report(c, work)
  assert jobs.TOY_NOTE not in capsys.readouterr().out
