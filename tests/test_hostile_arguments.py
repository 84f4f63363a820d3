"""Training and evaluation arguments: each bad value is one line naming
the setting, the value and the fix, checked before any work (no compile,
no model load), and nothing is written. Also Ctrl-C (exit 130, one
line), what evaluation must say rather than drop, 16-bit PNG rounding
and the wording fixes of messages.
"""

import io
import os
import struct
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest

from cdc_jax import cli_errors, evaluate, files, imageio, jobs
from cdc_jax.codec import cli as codec_cli
from cdc_jax.codec import memory
from cdc_jax.codec.errors import check_family
from cdc_jax.errors import SettingError, UserError
from cdc_jax.eval import datasets, pipeline, report
from cdc_jax.train_config import TrainingError, validate_config
from configs import common, x_cosine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING_MODEL = "/nonexistent/model"


def _tiny_config(**fields):
  c = x_cosine.get_config("tiny")
  c.unlock()
  for dotted, value in fields.items():
    section, name = dotted.split("__")
    c[section][name] = value
  return c


# -- training ------------------------------------------------------------------


@pytest.mark.parametrize(
  "field,value",
  [
    ("checkpoint__every", 0),
    ("eval__every", 0),
    ("log__every", 0),
    ("train__num_steps", -1),
    ("train__num_steps", 0),
    ("checkpoint__keep", 0),
    ("eval__steps", 0),
  ],
)
def test_counts_must_be_positive(field, value):
  c = _tiny_config(**{field: value})
  with pytest.raises(TrainingError) as e:
    validate_config(c)
  name = field.replace("__", ".")
  assert f"{name} = {value} must be a positive integer" in str(e.value)
  assert f"--config.{name}=N" in str(e.value)


@pytest.mark.parametrize(
  "field,value,phrase",
  [
    ("model__dim", 0, "model.dim = 0 must be an integer in [1, 1024]"),
    ("model__family", "z", 'model.family = "z" must be one of'),
    ("diffusion__schedule", "sigmoid", 'diffusion.schedule = "sigmoid"'),
    ("diffusion__timesteps", 10**9, "diffusion.timesteps = 1000000000"),
    ("train__lr_schedule", "x", "train.lr_schedule = 'x' must be one of"),
    ("eval__size", 0, "eval.size = 0 must be a positive integer"),
    ("eval__sampler", "heun", "eval.sampler = 'heun' is not a sampler"),
  ],
)
def test_model_and_schedule_fields_are_checked(field, value, phrase):
  with pytest.raises(TrainingError) as e:
    validate_config(_tiny_config(**{field: value}))
  assert phrase in str(e.value)


def test_only_user_errors_are_one_line(capsys):
  """A UserError is one line and status 2; a bare ValueError is a bug
  and keeps its traceback."""

  @cli_errors.user_errors("prog")
  def main(error):
    raise error

  assert main(SettingError("x = 1 must be 2")) == 2
  assert capsys.readouterr().err == "prog: error: x = 1 must be 2\n"
  with pytest.raises(ValueError, match="a bug"):
    main(ValueError("a bug"))


def test_crop_size_zero():
  with pytest.raises(TrainingError, match="positive multiple of 64"):
    validate_config(_tiny_config(data__crop_size=0))


def test_steps_variant_minus_one_is_refused():
  c = x_cosine.get_config("tiny,steps=-1")
  with pytest.raises(TrainingError, match="train.num_steps = -1"):
    validate_config(c)


def test_steps_variant_must_be_a_number():
  with pytest.raises(ValueError) as e:
    common.parse_arg("steps=abc", steps=0)
  assert (
    str(e.value) == "config variant steps=abc: not an int (e.g. steps=1000)"
  )


def test_workdir_that_is_a_file_or_a_link_loop(tmp_path):
  f = tmp_path / "file"
  f.write_text("mine")
  with pytest.raises(files.WriteError, match="the workdir is a file"):
    jobs.check_workdir(str(f))
  loop = tmp_path / "loop"
  loop.symlink_to(loop)
  with pytest.raises(files.WriteError, match="symbolic link loop"):
    jobs.check_workdir(str(loop))
  with pytest.raises(SettingError, match="no such folder"):
    jobs.check_workdir(str(tmp_path / "none"), must_exist=True)
  assert f.read_text() == "mine" and sorted(os.listdir(tmp_path)) == [
    "file",
    "loop",
  ]


def _main(*argv, cwd=ROOT):
  done = subprocess.run(
    [sys.executable, "-m", "cdc_jax.main", *argv],
    capture_output=True,
    text=True,
    cwd=cwd,
    timeout=300,
  )
  return done.returncode, done.stderr.strip().splitlines()


def test_main_names_a_missing_config_file_and_an_unknown_field(tmp_path):
  work = f"--workdir={tmp_path / 'w'}"
  rc, err = _main("--config=configs/nope.py", work)
  assert rc == 2 and err[0] == (
    "error: --config=configs/nope.py: no such config file 'configs/nope.py'"
  ), err
  rc, err = _main(
    "--config=configs/x_cosine.py:tiny", work, "--config.train.wibble=3"
  )
  assert rc == 2, err
  assert err[0].startswith(
    "error: --config.train.wibble=3: train has no field 'wibble' (its "
    "fields: b1, b2, batch_size,"
  ), err
  assert not os.path.exists(tmp_path / "w")


# -- Ctrl-C --------------------------------------------------------------------


def test_ctrl_c_is_exit_130_with_one_line(monkeypatch, tmp_path, capsys):
  def interrupted(path):
    raise KeyboardInterrupt

  src = tmp_path / "in.png"
  src.write_bytes(b"x")
  monkeypatch.setattr(codec_cli.codec, "load", interrupted)
  try:
    rc = codec_cli.main(
      ["compress", "--model", "m", str(src), str(tmp_path / "o")]
    )
  except KeyboardInterrupt:
    pytest.fail("KeyboardInterrupt escaped the CLI")
  assert rc == 130
  assert capsys.readouterr().err.strip().splitlines() == ["interrupted"]


# -- the codec's flags ---------------------------------------------------------


@pytest.mark.parametrize(
  "flag,value,phrase",
  [
    ("--tile", "0", "not a tile size: '0'"),
    ("--tile-overlap", "-16", "not a tile overlap: '-16'"),
  ],
)
def test_codec_tiling_flags(flag, value, phrase, tmp_path, capsys):
  argv = ["compress", "--model", MISSING_MODEL, "a.png", "b.cdcj", flag, value]
  with pytest.raises(SystemExit) as e:
    codec_cli.main(argv)
  assert e.value.code == 2 and phrase in capsys.readouterr().err


def test_default_steps_do_not_blame_a_flag_not_given():
  cm = types.SimpleNamespace(
    family="eps", schedule=types.SimpleNamespace(timesteps=20), path="m"
  )
  with pytest.raises(codec_cli.codec.CodecError) as e:
    codec_cli._default_steps(cm, None)
  msg = str(e.value)
  assert "the eps family's default of 200 decode steps" in msg
  assert "more than this model's 20 diffusion steps; pass --steps" in msg


# -- evaluation ----------------------------------------------------------------


def _evaluate(capsys, *argv):
  rc = evaluate.main([str(a) for a in argv])
  return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("limit", ["0", "-1", "abc"])
def test_evaluate_limit_must_be_positive(limit, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    _evaluate(
      capsys, "--model", MISSING_MODEL, "--out", tmp_path, "--limit", limit
    )
  assert e.value.code == 2
  assert f"not a positive integer: '{limit}'" in capsys.readouterr().err


def test_evaluate_steps_must_be_integers(tmp_path, capsys):
  with pytest.raises(SystemExit):
    _evaluate(
      capsys, "--model", MISSING_MODEL, "--out", tmp_path, "--steps", "abc"
    )
  err = capsys.readouterr().err
  assert "not a positive integer: 'abc'" in err and "invalid literal" not in err


def test_evaluate_refuses_duplicate_labels_before_loading(tmp_path, capsys):
  rc, err = _evaluate(
    capsys,
    "--model",
    f"a={MISSING_MODEL}",
    "--model",
    "a=/elsewhere",
    "--out",
    tmp_path / "o",
  )
  assert rc == 2 and len(err) == 1, err
  assert "the label 'a' is already used" in err[0]
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  "data,phrase",
  [("", "needs its folder: --data PATH"), ("/nonexistent", "no such folder")],
)
def test_evaluate_checks_the_data_folder_before_the_models(
  data, phrase, tmp_path, capsys
):
  rc, err = _evaluate(
    capsys,
    "--model",
    MISSING_MODEL,
    "--dataset",
    "kodak",
    "--data",
    data,
    "--out",
    tmp_path / "o",
  )
  assert rc == 2 and len(err) == 1 and phrase in err[0], err
  assert "the kodak dataset" in err[0] and os.listdir(tmp_path) == []


def test_evaluate_refuses_an_out_that_is_a_file(tmp_path, capsys):
  out = tmp_path / "report"
  out.write_text("mine")
  rc, err = _evaluate(capsys, "--model", MISSING_MODEL, "--out", out)
  assert rc == 2 and len(err) == 1 and "is a file, not a folder" in err[0]
  assert out.read_text() == "mine"


def test_an_unknown_anchor_is_refused():
  models = {"m": types.SimpleNamespace(family="x")}
  opts = pipeline.Options(anchor="nope", baselines=("jpeg",))
  with pytest.raises(SettingError) as e:
    pipeline.check_anchor(opts, models)
  assert "--anchor 'nope' is not a codec of this run" in str(e.value)
  assert "jpeg, cdc S=65 gamma=0.8" in str(e.value)


@pytest.mark.parametrize(
  "text,phrase",
  [
    ("system,bpp\nA,0.1,9\n", "line 2: 3 fields where the header has 2"),
    ("system,bpp,psnr\nA,0.1,high\n", "line 2: psnr = 'high' is not a number"),
  ],
)
def test_references_are_checked_row_by_row(text, phrase, tmp_path):
  path = tmp_path / "refs.csv"
  path.write_text(text)
  with pytest.raises(UserError) as e:
    report.read_reference_points(str(path))
  assert phrase in str(e.value)


def test_ms_ssim_left_out_of_the_summary_is_said():
  rows = [
    {"codec": "jpeg", "image": "big.png", "psnr": 30.0, "ms_ssim": 0.9},
    {"codec": "jpeg", "image": "tiny.png", "psnr": 31.0},
  ]
  (note,) = pipeline.notes(rows)
  assert note.startswith("MS-SSIM: not in the summary: 1 image(s) under 161")
  assert "tiny.png" in note
  assert pipeline.notes(rows[:1]) == []


# -- images --------------------------------------------------------------------


def _png16(path, a: np.ndarray, color_type: int) -> None:
  h, w, _ = a.shape
  raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

  def chunk(kind, data):
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

  ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr))
    f.write(chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels,color_type", [(3, 2), (4, 6), (2, 4)])
def test_16_bit_pngs_are_rounded_not_truncated(channels, color_type, tmp_path):
  values = np.array([51528, 257, 65535, 0, 32767, 128, 200, 65280])
  a = np.resize(values, (2, 4, channels)).astype(np.uint16)
  _png16(tmp_path / "a.png", a, color_type)
  got = imageio.load_image(tmp_path / "a.png")
  grey = a[..., :1] if channels == 2 else a[..., :3]
  want = np.round(grey / 257.0).astype(np.uint8)
  np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))
  assert got[0, 0, 0] == 200  # 51528 / 257 = 200.498; the high byte is 201


# -- messages ------------------------------------------------------------------


def test_small_memory_budgets_are_not_shown_as_zero():
  assert memory.fmt_bytes(1) == "1 bytes"
  assert memory.fmt_bytes(800_000) == "800 kB"
  assert memory.fmt_bytes(16e9) == "16.0 GB"


def test_evaluate_help_is_not_cut_mid_sentence():
  out = io.StringIO()
  evaluate.parser().print_help(out)
  assert "beside JPEG, WebP and AVIF." in " ".join(out.getvalue().split())


def test_a_missing_dataset_folder_says_it_once(tmp_path):
  with pytest.raises(datasets.DatasetError) as e:
    list(datasets.images("folder", str(tmp_path / "none")))
  msg = str(e.value)
  assert "folder folder" not in msg and "no such folder" in msg
  assert "--data" in msg


def test_a_header_that_does_not_match_names_the_field():
  ids = {"eps": 0, "x": 1}
  with pytest.raises(UserError) as e:
    check_family(1, "eps", ids, 1)
  assert str(e.value) == (
    "the file's header names model family id 1, this model is eps (0)"
  )
  with pytest.raises(UserError, match="the file holds 2 streams, not 1"):
    check_family(0, "eps", ids, 2)
