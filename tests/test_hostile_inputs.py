"""Unbounded input: crafted files that would make a reader allocate or
wait without bound are refused from their headers, sizes and kinds,
before anything is read in full or decoded.

The cases whose regression would eat memory or hang run in a subprocess
under ``RLIMIT_AS`` and a timeout (``testing.run_limited``), so a
regression fails the test instead of taking the machine down.
"""

import json
import os
import shutil
import struct
import textwrap
import zipfile
import zlib

import numpy as np
import pytest

from cdc_jax import evaluate, model_dir, testing
from cdc_jax.codec import cli as codec_cli
from cdc_jax.coding import container

MISSING_MODEL = "/nonexistent/model"


# Importing the codec with JAX takes about 0.6 GB of address space; a
# regression that decodes or reads what it should refuse (0.5 GB and
# more) runs out of the rest.
MEMORY = 1 << 30


def _limited(code: str, timeout: float = 120):
  done = testing.run_limited(textwrap.dedent(code), MEMORY, timeout)
  return done.stdout + done.stderr


def _png_header_only(path, width: int, height: int) -> None:
  """A PNG whose header declares width x height RGB pixels and whose data
  holds one row: a few hundred bytes that would decode to gigabytes."""

  def chunk(kind, data):
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  row = zlib.compress(b"\0" + bytes(3 * width))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr))
    f.write(chunk(b"IDAT", row) + chunk(b"IEND", b""))


# -- model directories ---------------------------------------------------------


def test_huge_timesteps_are_refused_before_the_schedule(model_path, tmp_path):
  path = str(tmp_path / "m")
  shutil.copytree(model_path, path)
  meta_path = os.path.join(path, model_dir.MODEL_JSON)
  with open(meta_path) as f:
    meta = json.load(f)
  meta["diffusion"]["timesteps"] = 10**9
  params = model_dir.load(model_path).params  # the fingerprint, recomputed
  meta["fingerprint"] = model_dir.fingerprint(
    meta["model"], meta["diffusion"], params
  )
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  out = _limited(
    f"""
    from cdc_jax import codec
    try:
      codec.load({path!r})
    except codec.CodecError as e:
      print("REFUSED", e)
    """
  )
  assert "REFUSED" in out and "diffusion.timesteps = 1000000000" in out, out


def _replace_member(npz_path: str, name: str, write) -> None:
  """Rewrites ``npz_path`` with member ``name`` written by ``write(f)``."""
  with zipfile.ZipFile(npz_path) as z:
    others = {n: z.read(n) for n in z.namelist() if n != name + ".npy"}
  with zipfile.ZipFile(npz_path, "w", zipfile.ZIP_DEFLATED, 1) as z:
    for n, data in others.items():
      z.writestr(n, data)
    with z.open(name + ".npy", "w", force_zip64=True) as f:
      write(f)


def _header(f, shape) -> None:
  d = {"descr": "<f4", "fortran_order": False, "shape": shape}
  np.lib.format.write_array_header_1_0(f, d)


def _a_param(path: str) -> str:
  with zipfile.ZipFile(os.path.join(path, model_dir.PARAMS)) as z:
    return sorted(z.namelist())[0].removesuffix(".npy")


def test_a_member_declaring_terabytes_is_refused_from_its_header(
  model_path, tmp_path
):
  path = str(tmp_path / "m")
  shutil.copytree(model_path, path)
  name = _a_param(path)
  params = os.path.join(path, model_dir.PARAMS)
  _replace_member(
    params, name, lambda f: (_header(f, (10**12,)), f.write(b"0"))
  )
  out = _limited(
    f"""
    from cdc_jax import model_dir
    try:
      model_dir.load({path!r})
    except model_dir.ModelError as e:
      print("REFUSED", e)
    """
  )
  assert "REFUSED" in out and "(1000000000000,)" in out, out
  assert "Traceback" not in out, out


def test_a_compressed_gigabyte_member_is_refused_unread(model_path, tmp_path):
  path = str(tmp_path / "m")
  shutil.copytree(model_path, path)
  name = _a_param(path)
  n = (1 << 30) // 4  # 1 GiB of float32 zeros in a few MB of zip

  def write(f):
    _header(f, (n,))
    block = bytes(16 << 20)
    for _ in range((n * 4) // len(block)):
      f.write(block)

  params = os.path.join(path, model_dir.PARAMS)
  _replace_member(params, name, write)
  assert os.path.getsize(params) < 20 << 20
  out = _limited(
    f"""
    import time
    from cdc_jax import model_dir
    t = time.time()
    try:
      model_dir.load({path!r})
    except model_dir.ModelError as e:
      print("REFUSED", e, f"in {{time.time() - t:.1f}} s")
    """
  )
  assert "REFUSED" in out and f"is float32 ({n},)" in out, out


# -- .cdcj files ---------------------------------------------------------------


def test_decompress_refuses_a_fifo_without_waiting(tmp_path):
  fifo = tmp_path / "in.cdcj"
  os.mkfifo(fifo)
  out = _limited(
    f"""
    from cdc_jax.codec import cli
    try:
      cli.decompress_file(None, {str(fifo)!r}, {str(tmp_path / "o.png")!r})
    except Exception as e:
      print("REFUSED", e)
    """,
    timeout=60,
  )
  assert "REFUSED" in out and "not a regular file (a FIFO)" in out, out
  assert sorted(os.listdir(tmp_path)) == ["in.cdcj"]


def test_decompress_refuses_a_huge_file_before_reading_it(tmp_path):
  big = tmp_path / "big.cdcj"
  with open(big, "wb") as f:
    f.write(container.MAGIC)
    f.truncate(3 << 30)  # sparse: 3 GB that take no disk
  out = _limited(
    f"""
    from cdc_jax.codec import cli
    try:
      cli.decompress_file(None, {str(big)!r}, {str(tmp_path / "o.png")!r})
    except Exception as e:
      print("REFUSED", e)
    """
  )
  assert "REFUSED" in out and "3,221,225,472 bytes, more than" in out, out
  assert "--max-pixels" in out, out


def test_the_file_size_cap_follows_max_pixels(tmp_path):
  f = tmp_path / "a.cdcj"
  f.write_bytes(container.MAGIC + bytes(100_000))
  with pytest.raises(codec_cli.codec.CodecError, match="more than the 73,536"):
    codec_cli.decompress_file(
      None, str(f), str(tmp_path / "o.png"), max_pixels=1000
    )
  assert sorted(os.listdir(tmp_path)) == ["a.cdcj"]


# -- images: the pixel limit from the header -----------------------------------


def test_huge_images_are_refused_from_their_header(tmp_path):
  """The codec, the training loader and evaluation, 13000 x 13000 RGB
  (507 MB decoded) from a file of a few hundred bytes."""
  folder = tmp_path / "data"
  folder.mkdir()
  png = folder / "huge.png"
  _png_header_only(png, 13000, 13000)
  assert os.path.getsize(png) < 1000
  png, folder, dst = str(png), str(folder), str(tmp_path / "o.cdcj")
  out = _limited(
    f"""
    from cdc_jax.codec import cli
    from cdc_jax.data.sources import ImageFolderSource
    from cdc_jax.eval import datasets
    for name, run in [
      ("codec", lambda: cli.compress_file(None, {png!r}, {dst!r})),
      ("loader", lambda: ImageFolderSource({folder!r})[0]),
      ("eval", lambda: list(datasets.images("folder", {folder!r}))),
    ]:
      try:
        run()
      except Exception as e:
        print("REFUSED", name, e)
    """,
    timeout=60,
  )
  for name in ("codec", "loader", "eval"):
    line = next(ln for ln in out.splitlines() if f"REFUSED {name}" in ln)
    assert "13000x13000 (169,000,000 pixels) is over the limit" in line, out
  assert "--max-pixels" in out.splitlines()[0], out
  assert sorted(os.listdir(tmp_path)) == ["data"]


# -- paths checked before the work ---------------------------------------------


def test_codec_checks_the_output_folder_before_the_model(tmp_path, capsys):
  src = tmp_path / "in.png"
  src.write_bytes(b"not read yet")
  dst = tmp_path / "no_such_dir" / "x.cdcj"
  rc = codec_cli.main(
    ["compress", "--model", MISSING_MODEL, str(src), str(dst)]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert "output directory" in err[0] and str(dst.parent) in err[0]


def test_evaluate_reads_the_references_before_the_models(tmp_path, capsys):
  refs = tmp_path / "refs.csv"
  refs.write_text("system,bpp,psnr\nHiFiC,0.2,30\nragged,0.3\n")
  rc = evaluate.main(
    ["--model", MISSING_MODEL, "--dataset", "held_out"]
    + ["--out", str(tmp_path / "o"), "--references", str(refs)]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert f"{refs}, line 3: 2 fields where the header has 3" in err[0]
  assert sorted(os.listdir(tmp_path)) == ["refs.csv"]
