"""Evaluation reports: tables, summaries, plots, BD-rate, grids."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cdc_jax.eval import report


def _rows():
  rows = []
  for codec, offset in (("jpeg", 0.0), ("cdc", 2.0)):
    for q, bpp in enumerate((0.2, 0.4, 0.8, 1.6)):
      for image in ("a", "b"):
        psnr = 25 + offset + 4 * np.log2(bpp / 0.2) + (image == "b")
        rows.append(
          {
            "codec": codec,
            "setting": f"q{q}",
            "image": image,
            "bpp": bpp + (0.01 if image == "b" else -0.01),
            "psnr": psnr,
          }
        )
  return rows


def test_rows_to_csv_and_json(tmp_path):
  rows = _rows()
  csv_path, json_path = report.write_rows(rows, str(tmp_path / "per_image"))
  with open(csv_path, newline="") as f:
    back = list(csv.DictReader(f))
  assert len(back) == len(rows)
  assert list(back[0])[:3] == ["codec", "setting", "image"]
  assert float(back[0]["psnr"]) == pytest.approx(rows[0]["psnr"])
  with open(json_path) as f:
    assert json.load(f) == json.loads(json.dumps(rows))


def test_summary_means_per_codec_and_setting():
  summary = report.summarize(_rows())
  assert len(summary) == 8
  cdc0 = next(
    r for r in summary if r["codec"] == "cdc" and r["setting"] == "q0"
  )
  assert cdc0["images"] == 2
  assert cdc0["bpp"] == pytest.approx(0.2)
  assert cdc0["psnr"] == pytest.approx(27.5)
  text = report.summary_table(summary)
  assert "cdc" in text and "27.5000" in text


def test_bd_rate_sign_and_size():
  summary = report.summarize(_rows())
  # cdc is 2 dB better everywhere: at equal quality it needs
  # 2^(-2/4) = 0.707x the rate, a BD-rate of about -29 %.
  out = report.bd_rates(summary, "psnr", anchor="jpeg")
  assert out["cdc"] == pytest.approx(-29.3, abs=1.5)
  back = report.bd_rates(summary, "psnr", anchor="cdc")
  assert back["jpeg"] > 30


def test_rd_plot_and_references(tmp_path):
  ref = tmp_path / "published.csv"
  ref.write_text("system,bpp,psnr\nHiFiC,0.18,27.56\nHiFiC,0.35,29.65\n")
  refs = report.read_reference_points(str(ref))
  assert refs[0]["codec"] == "HiFiC" and refs[1]["psnr"] == 29.65
  summary = report.summarize(_rows())
  path = report.rd_plot(summary, "psnr", str(tmp_path / "psnr.png"), refs)
  img = np.asarray(Image.open(path))
  assert img.ndim == 3 and img.shape[0] > 200
  assert report.rd_plot(summary, "lpips", str(tmp_path / "l.png")) is None


def test_bad_reference_csv(tmp_path):
  ref = tmp_path / "bad.csv"
  ref.write_text("name,rate\nx,1\n")
  with pytest.raises(ValueError, match="columns system, bpp"):
    report.read_reference_points(str(ref))


def test_grid(tmp_path):
  a = np.zeros((4, 3, 3), np.uint8)
  b = np.full((2, 5, 3), 9, np.uint8)
  out = np.asarray(Image.open(report.grid(str(tmp_path / "g.png"), [a, b])))
  assert out.shape == (4, 3 + 4 + 5, 3)
  assert out[3, 8, 0] == 255 and out[1, 8, 0] == 9


def test_file_stem_is_a_plain_file_name():
  assert report.file_stem("sub/kodim01.png") == "sub_kodim01"
  assert report.file_stem("chelsea (held out)") == "chelsea_held_out"
  assert report.file_stem("a.b.png") == "a.b"
  assert report.file_stem("()") == "image"
