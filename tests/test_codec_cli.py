"""Tests of cdc_jax.codec.cli: real files through ``main`` and the file API.

A tiny eps model (``cdc_jax.testing``) and one of the same architecture
with other weights (another fingerprint) are exported once per module.
Every user error must be one ``error: ...`` line naming the culprit, exit
status 2, and leave the output path as it was.
"""

import dataclasses
import os
import re
import shutil
import struct
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from cdc_jax import codec, model_dir, testing
from cdc_jax.codec import cli
from cdc_jax.coding import container
from cdc_jax.imageio import load_image

STEPS = 2
_CRC_SIZE = 4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  dirs = {k: str(root / k) for k in ("eps", "other", "decoder")}
  params = testing.export_tiny(dirs["eps"], "eps")
  tables = model_dir.load(dirs["eps"]).tables
  # Same architecture and tables, another analysis transform g_a: another
  # bitstream. And the same bitstream with other U-Net weights: another
  # decoder of the same files.
  other = jax.tree.map(np.array, params)
  other["context_fn"]["enc_0_0"] = jax.tree.map(
    lambda a: a + 0.5, other["context_fn"]["enc_0_0"]
  )
  decoder = dict(params)
  decoder["denoise_fn"] = jax.tree.map(lambda a: a + 0.5, params["denoise_fn"])
  for name, p in (("other", other), ("decoder", decoder)):
    model_dir.export(
      dirs[name],
      testing.TINY_MODELS["eps"],
      testing.DIFFUSIONS["eps"],
      p,
      tables=tables,
    )
  return dirs


@pytest.fixture(scope="module")
def eps_cm(model_dirs):
  return codec.load(model_dirs["eps"])


@pytest.fixture(scope="module")
def small_file(eps_cm):
  """A valid 50x60 eps file (padded to 64x64), S = STEPS."""
  img = testing.photo("astronaut", (50, 60))
  return codec.compress(eps_cm, img, steps=STEPS, seed=1)


def _cli(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


def _temp_leftovers(directory):
  return [
    n for n in os.listdir(directory) if n.startswith(".tmp-") or ".part" in n
  ]


def _save_photo(path, h, w, top=0, left=0):
  Image.fromarray(testing.photo("astronaut", (h, w), top, left)).save(path)
  return path


def _check_bpp_line(out, path, h, w):
  """The compress line's real bpp is the file's; returns the estimate."""
  m = re.search(r"([\d.]+) bpp \(model estimate ([\d.]+) bpp\)", out)
  assert m, out
  assert float(m.group(1)) == round(os.path.getsize(path) * 8 / (h * w), 4)
  assert float(m.group(2)) > 0
  return float(m.group(2))


def test_cli_compress_and_decompress(model_dirs, tmp_path, capsys):
  h, w = 50, 60
  src = _save_photo(tmp_path / "in.png", h, w)
  cdcj = tmp_path / "in.cdcj"
  model = model_dirs["eps"]
  argv = ["compress", "--model", model, src, cdcj, "--steps", STEPS]
  rc, out, err = _cli(capsys, *argv, "--seed", 3)
  assert rc == 0, err
  _check_bpp_line(out, cdcj, h, w)
  header, _ = container.unpack(cdcj.read_bytes())
  assert (header.steps, header.seed, header.height) == (STEPS, 3, h)
  assert header.gamma == pytest.approx(codec.DEFAULT_GAMMA)

  png = tmp_path / "out.png"
  rc, out, err = _cli(capsys, "decompress", "--model", model, cdcj, png)
  assert rc == 0, err
  assert f"{w}x{h}" in out  # width x height, as every message writes sizes
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size == (w, h) and im.mode == "RGB"
    ref = np.asarray(im)
  assert _temp_leftovers(tmp_path) == []

  half = tmp_path / "half.png"
  argv = ["decompress", "--model", model, cdcj, half, "--precision", "bfloat16"]
  rc, out, err = _cli(capsys, *argv)
  assert rc == 0, err
  with Image.open(half) as im:
    assert np.abs(np.asarray(im).astype(int) - ref).mean() < 3.0


def test_another_decoder_of_the_same_bitstream_decodes_the_file(
  model_dirs, small_file, tmp_path, capsys
):
  """A v3 file names the bitstream, not the U-Net: a model with other
  U-Net weights on the same entropy model decodes it (to other pixels)."""
  cdcj = tmp_path / "a.cdcj"
  cdcj.write_bytes(small_file)
  out = {}
  for name in ("eps", "decoder"):
    png = tmp_path / f"{name}.png"
    rc, _, err = _cli(
      capsys, "decompress", "--model", model_dirs[name], cdcj, png
    )
    assert rc == 0, err
    out[name] = load_image(png)
  assert out["eps"].shape == out["decoder"].shape == (50, 60, 3)
  assert not np.array_equal(out["eps"], out["decoder"])
  a, b = (codec.load(model_dirs[k]) for k in ("eps", "decoder"))
  assert a.fingerprint == b.fingerprint
  assert a.legacy_fingerprint != b.legacy_fingerprint


def test_file_api_is_deterministic(eps_cm, small_file, tmp_path):
  src = tmp_path / "a.cdcj"
  src.write_bytes(small_file)
  out1 = cli.decompress_file(eps_cm, str(src), str(tmp_path / "1.png"))
  out2 = cli.decompress_file(eps_cm, str(src), str(tmp_path / "2.png"))
  assert (tmp_path / "1.png").read_bytes() == (tmp_path / "2.png").read_bytes()
  np.testing.assert_array_equal(out1, out2)
  np.testing.assert_array_equal(load_image(tmp_path / "1.png"), out1)
  # compress_file writes what compress returns.
  img = _save_photo(tmp_path / "in.png", 50, 60)
  res = cli.compress_file(
    eps_cm, str(img), str(tmp_path / "b.cdcj"), steps=STEPS, seed=1
  )
  assert res.data == small_file == (tmp_path / "b.cdcj").read_bytes()
  assert _temp_leftovers(tmp_path) == []


# -- bad input -----------------------------------------------------------------


def _newer_version(blob: bytes, reseal: bool) -> bytes:
  """``blob`` claiming the next format version (it follows the magic)."""
  b = bytearray(blob)
  b[len(container.MAGIC)] = container.FORMAT_VERSION + 1
  if reseal:
    body = bytes(b[:-_CRC_SIZE])
    return body + struct.pack("<I", zlib.crc32(body))
  return bytes(b)


def _bad_input(kind, tmp, blob, dirs):
  """(command, input path, model dir, the file the message must name)."""
  m = dirs["eps"]
  p = tmp / "input"
  if kind == "not_an_image":
    p = tmp / "notes.png"
    p.write_text("just some text\n")
  elif kind == "empty_image":
    p = tmp / "empty.png"
    p.write_bytes(b"")
  elif kind == "truncated_image":
    p = _save_photo(tmp / "cut.png", 50, 60)
    p.write_bytes(p.read_bytes()[:200])
  elif kind in ("missing_image", "missing_cdcj"):
    p = tmp / "nowhere" / "gone.png"
  elif kind in ("directory_image", "directory_cdcj"):
    p = tmp / "a_dir.png"
    p.mkdir()
  elif kind == "truncated":
    p.write_bytes(blob[: len(blob) // 2])
  elif kind == "empty_cdcj":
    p.write_bytes(b"")
  elif kind == "flipped":
    b = bytearray(blob)
    b[len(b) // 2] ^= 0x10
    p.write_bytes(bytes(b))
  elif kind == "wrong_magic":
    p.write_bytes(b"PNG!" + blob[4:])
  elif kind == "newer_version":
    p.write_bytes(_newer_version(blob, reseal=True))
  elif kind == "newer_version_bad_crc":  # the version is checked first
    p.write_bytes(_newer_version(blob, reseal=False))
  elif kind == "other_model":
    p.write_bytes(blob)
    m = dirs["other"]
  elif kind == "missing_model":
    p.write_bytes(blob)
    m = str(tmp / "no_such_model")
  elif kind == "not_a_model":
    p.write_bytes(blob)
    m = str(tmp / "empty_model")
    os.mkdir(m)
  elif kind == "tampered_model":
    p.write_bytes(blob)
    m = str(tmp / "tampered")
    shutil.copytree(dirs["eps"], m)
    meta_path = os.path.join(m, model_dir.MODEL_JSON)
    with open(meta_path) as f:
      meta = f.read()
    with open(meta_path, "w") as f:
      f.write(re.sub(r'"fingerprint": "\w', '"fingerprint": "x', meta))
  else:
    raise AssertionError(kind)
  cmd = "compress" if "image" in kind else "decompress"
  named = m if "model" in kind and kind != "other_model" else str(p)
  return cmd, str(p), m, named


ERROR_CASES = {
  # kind: a phrase of the expected message
  "not_an_image": "not a recognised image",
  "empty_image": "empty",
  "truncated_image": "cannot decode",
  "missing_image": "not found",
  "directory_image": "not a regular file",
  "missing_cdcj": "cannot read",
  "directory_cdcj": "cannot read",
  "empty_cdcj": "truncated",
  "truncated": "truncated",
  "flipped": "checksum",
  "wrong_magic": "magic",
  "newer_version": "newer",
  "newer_version_bad_crc": "newer",
  "other_model": "another model",
  "missing_model": "does not exist",
  "not_a_model": "neither a model directory",
  "tampered_model": "fingerprint",
}


@pytest.mark.parametrize("kind", list(ERROR_CASES))
def test_cli_rejects_bad_input(kind, small_file, model_dirs, tmp_path, capsys):
  cmd, src, model, named = _bad_input(kind, tmp_path, small_file, model_dirs)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  dst = out_dir / ("x.cdcj" if cmd == "compress" else "x.png")
  for existing in (None, b"keep me"):
    if existing is not None:
      dst.write_bytes(existing)
    rc, out, err = _cli(capsys, cmd, "--model", model, src, dst)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and named in lines[0], err
    assert ERROR_CASES[kind] in lines[0], err
    if existing is None:
      assert not dst.exists()
    else:
      assert dst.read_bytes() == existing
    assert _temp_leftovers(out_dir) == []


@pytest.mark.parametrize("where", ["missing_directory", "is_a_directory"])
def test_cli_rejects_unwritable_output(where, model_dirs, tmp_path, capsys):
  src = _save_photo(tmp_path / "in.png", 50, 60)
  if where == "missing_directory":
    dst = tmp_path / "no_dir" / "x.cdcj"
  else:
    dst = tmp_path / "taken.cdcj"
    dst.mkdir()
  rc, _, err = _cli(capsys, "compress", "--model", model_dirs["eps"], src, dst)
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert str(dst) in err, err
  assert dst.is_dir() if where == "is_a_directory" else not dst.parent.exists()
  assert _temp_leftovers(tmp_path) == []


# -- full size -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["eps", "x"])
def test_cli_round_trip_full_size(family, request, tmp_path, capsys):
  """A 256x384 photo through real files, with the default decode steps."""
  if family == "eps":
    model = request.getfixturevalue("model_dirs")["eps"]
  else:
    model = request.getfixturevalue("x_model_path")
  h, w = 256, 384
  src = _save_photo(tmp_path / "in.png", h, w, 100, 50)
  cdcj, png = tmp_path / "in.cdcj", tmp_path / "out.png"
  seed = 2**63 + 5
  rc, out, err = _cli(
    capsys, "compress", "--model", model, src, cdcj, "--seed", seed
  )
  assert rc == 0, err
  estimate = _check_bpp_line(out, cdcj, h, w)
  blob = cdcj.read_bytes()
  bpp = len(blob) * 8 / (h * w)
  assert 0.05 < bpp < 2.0  # a realistic rate
  assert abs(bpp / estimate - 1) < 0.1  # header and coding overhead
  header, _ = container.unpack(blob)
  assert (header.height, header.width, header.seed) == (h, w, seed)
  assert header.steps == codec.DEFAULT_STEPS[family]

  rc, out, err = _cli(capsys, "decompress", "--model", model, cdcj, png)
  assert rc == 0, err
  got = load_image(png)
  assert got.shape == (h, w, 3)
  # The CLI's PNG is the API's decode, bit for bit.
  np.testing.assert_array_equal(got, codec.decompress(codec.load(model), blob))
  assert _temp_leftovers(tmp_path) == []


def test_the_sampler_is_part_of_the_file(model_dirs, small_file, tmp_path):
  """compress --sampler records it; the decoder runs what the file says,
  and refuses a sampler id it does not know."""
  src = _save_photo(tmp_path / "in.png", 50, 60)
  model = model_dirs["eps"]
  out = {}
  for name in ("ddim", "dpmpp2m"):
    cdcj = tmp_path / f"{name}.cdcj"
    argv = ["compress", "--model", model, src, cdcj, "--steps", 3]
    assert cli.main([str(a) for a in argv + ["--sampler", name]]) == 0
    header, _ = container.unpack(cdcj.read_bytes())
    assert header.sampler == {"ddim": 0, "dpmpp2m": 1}[name]
    png = tmp_path / f"{name}.png"
    assert cli.main(["decompress", "--model", model, str(cdcj), str(png)]) == 0
    out[name] = load_image(png)
  assert not np.array_equal(out["ddim"], out["dpmpp2m"])
  cm = codec.load(model)
  np.testing.assert_array_equal(
    codec.decompress(cm, (tmp_path / "dpmpp2m.cdcj").read_bytes()),
    out["dpmpp2m"],
  )
  header, streams = container.unpack(small_file)
  unknown = container.pack(dataclasses.replace(header, sampler=7), streams)
  with pytest.raises(codec.CodecError, match="sampler 7, which this cdc_jax"):
    codec.decompress(cm, unknown)
  with pytest.raises(codec.CodecError, match="unknown sampler 'euler'"):
    codec.compress(cm, testing.photo("astronaut", (50, 60)), sampler="euler")
