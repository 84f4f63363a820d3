"""Nothing a user types loses their files: outputs that are inputs, odd
kinds of output paths, permissions, interrupted writes, and model exports
into directories holding other things.

Every case asserts the one-line message and that what was there is still
there, byte for byte. No model is built: the checks come before any work.
"""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from cdc_jax import files, model_dir, testing
from cdc_jax.codec import cli as codec_cli
from cdc_jax.convert import cli as convert_cli

MISSING_MODEL = "/nonexistent/model"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def _cli(capsys, main, *argv):
  rc = main([str(a) for a in argv])
  err = capsys.readouterr().err.strip().splitlines()
  return rc, err


def _snapshot(folder):
  """name -> bytes (or the link target) of everything under ``folder``."""
  out = {}
  for root, dirs, names in os.walk(folder):
    for n in dirs + names:
      p = os.path.join(root, n)
      if os.path.islink(p):
        out[p] = ("link", os.readlink(p))
      elif os.path.isfile(p):
        with open(p, "rb") as f:
          out[p] = f.read()
      else:
        out[p] = "dir"
  return out


# -- outputs that are inputs ---------------------------------------------------


@pytest.mark.parametrize("cmd", ["compress", "decompress"])
@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_codec_refuses_output_that_is_the_input(cmd, how, tmp_path, capsys):
  src = tmp_path / "in.bin"
  src.write_bytes(b"precious")
  out = src
  if how == "symlink":
    out = tmp_path / "link.bin"
    out.symlink_to(src)
  elif how == "hardlink":
    out = tmp_path / "hard.bin"
    os.link(src, out)
  before = _snapshot(tmp_path)
  rc, err = _cli(
    capsys, codec_cli.main, cmd, "--model", MISSING_MODEL, src, out
  )
  assert rc == 2 and len(err) == 1, err
  assert "the output is the input" in err[0] and str(out) in err[0]
  assert _snapshot(tmp_path) == before


def test_write_atomic_refuses_an_input(tmp_path):
  src = tmp_path / "a.npz"
  src.write_bytes(b"keep")
  with pytest.raises(files.WriteError, match="the output is the input"):
    files.write_atomic(src, b"new", inputs=[src])
  assert src.read_bytes() == b"keep"


# -- kinds of output paths -----------------------------------------------------


def test_a_fifo_is_written_to_not_replaced(tmp_path):
  fifo = tmp_path / "pipe"
  os.mkfifo(fifo)
  got = []
  reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
  reader.start()
  files.write_atomic(fifo, b"streamed")
  reader.join(10)
  assert got == [b"streamed"]
  assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still a FIFO
  assert sorted(os.listdir(tmp_path)) == ["pipe"]


@pytest.mark.skipif(
  not os.path.exists("/dev/full"), reason="needs /dev/null and /dev/full"
)
def test_devices_are_written_to_never_replaced():
  # Asked first, so a regression fails here instead of replacing the
  # machine's device nodes.
  for dev in ("/dev/null", "/dev/full"):
    assert files.check_output(dev) == ("stream", dev)
  before = os.stat("/dev/null")
  files.write_atomic("/dev/null", b"gone")
  after = os.stat("/dev/null")
  assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino
  with pytest.raises(files.WriteError) as e:
    files.write_atomic("/dev/full", b"x" * 65536)
  assert str(e.value) == "/dev/full: cannot write (No space left on device)"
  assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_a_symlink_is_written_through_to_its_target(tmp_path):
  target = tmp_path / "real.png"
  target.write_bytes(b"old")
  link = tmp_path / "link.png"
  link.symlink_to(target)
  files.write_atomic(link, b"new")
  assert os.path.islink(link) and os.readlink(link) == str(target)
  assert target.read_bytes() == b"new"
  assert sorted(os.listdir(tmp_path)) == ["link.png", "real.png"]


def test_a_dangling_symlink_creates_its_target(tmp_path):
  link = tmp_path / "link.png"
  link.symlink_to(tmp_path / "made.png")
  files.write_atomic(link, b"x")
  assert os.path.islink(link) and (tmp_path / "made.png").read_bytes() == b"x"


def test_directories_and_link_loops_are_refused(tmp_path):
  (tmp_path / "d").mkdir()
  with pytest.raises(files.WriteError, match="it is a directory"):
    files.write_atomic(tmp_path / "d", b"x")
  loop = tmp_path / "loop"
  loop.symlink_to(loop)
  with pytest.raises(files.WriteError, match="symbolic link loop"):
    files.write_atomic(loop, b"x")
  assert os.path.islink(loop) and (tmp_path / "d").is_dir()


def test_an_empty_output_name_is_named(tmp_path):
  with pytest.raises(files.WriteError, match="output file name is empty"):
    files.write_atomic("", b"x")


def test_dash_is_stdout(tmp_path):
  code = "from cdc_jax import files; files.write_atomic('-', b'to stdout')"
  done = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, env=ENV
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout == b"to stdout" and os.listdir(tmp_path) == []


# -- permissions and interrupted writes ----------------------------------------


def test_new_files_follow_the_umask_replaced_ones_keep_their_mode(tmp_path):
  old = os.umask(0o022)
  try:
    files.write_atomic(tmp_path / "new.bin", b"x")
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"x")
    os.chmod(kept, 0o640)
    files.write_atomic(kept, b"y")
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "new.bin").st_mode) == 0o644
  assert stat.S_IMODE(os.stat(kept).st_mode) == 0o640


def test_an_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path):
  path = tmp_path / "out.cdcj"
  path.write_bytes(b"old")

  def payload(f):
    f.write(b"half")
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    files.write_atomic(path, payload)
  assert os.listdir(tmp_path) == ["out.cdcj"] and path.read_bytes() == b"old"


def test_sigterm_during_a_write_removes_the_temp_file(tmp_path):
  code = textwrap.dedent(
    """
    import os, sys, time
    from cdc_jax import files
    def payload(f):
      f.write(b"x" * 1000)
      f.flush()
      print("writing", flush=True)
      time.sleep(60)
    files.write_atomic(sys.argv[1], payload)
    """
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", code, str(tmp_path / "out.png")],
    stdout=subprocess.PIPE,
    env=ENV,
  )
  assert proc.stdout.readline() == b"writing\n"
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(30) == -signal.SIGTERM  # died of it, as by default
  assert os.listdir(tmp_path) == []


# -- model export --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny model directory and its params."""
  path = str(tmp_path_factory.mktemp("m") / "eps")
  return path, testing.export_tiny(path, "eps")


def _export(directory, params, **kw):
  return model_dir.export(
    str(directory),
    testing.TINY_MODELS["eps"],
    testing.DIFFUSIONS["eps"],
    params,
    **kw,
  )


@pytest.mark.parametrize("where", ["holds_the_source", "cwd"])
def test_convert_refuses_a_folder_that_is_not_a_model(
  where, tmp_path, capsys, monkeypatch
):
  ckpt = tmp_path / "CDC_params" / "b0.2048.pt"
  ckpt.parent.mkdir()
  ckpt.write_bytes(b"released weights")
  (ckpt.parent / "other.pt").write_bytes(b"more weights")
  out = ckpt.parent
  if where == "cwd":
    monkeypatch.chdir(ckpt.parent)
    out = "."
  before = _snapshot(tmp_path)
  rc, err = _cli(capsys, convert_cli.main, "checkpoint", ckpt, out)
  assert rc == 2 and len(err) == 1, err
  assert "not empty and not a model directory" in err[0]
  assert "nothing was written" in err[0]
  assert _snapshot(tmp_path) == before


def test_convert_refuses_a_file_as_output_dir(tmp_path, capsys):
  (tmp_path / "x.pt").write_bytes(b"w")
  out = tmp_path / "notes.txt"
  out.write_bytes(b"mine")
  rc, err = _cli(capsys, convert_cli.main, "checkpoint", tmp_path / "x.pt", out)
  assert rc == 2 and len(err) == 1 and "not a directory" in err[0], err
  assert out.read_bytes() == b"mine"


def test_export_replaces_a_model_only_with_overwrite(tiny, tmp_path):
  path, params = tiny
  out = tmp_path / "m"
  _export(out, params, source="one")
  (out / "notes.txt").write_text("my notes")
  before = _snapshot(out)
  with pytest.raises(files.WriteError, match="pass --overwrite"):
    _export(out, params, source="two")
  assert _snapshot(out) == before
  # With overwrite only the model's own files change; notes.txt stays.
  _export(out, params, source="two", overwrite=True)
  assert model_dir.load(str(out)).source == "two"
  assert (out / "notes.txt").read_text() == "my notes"
  assert sorted(os.listdir(tmp_path)) == ["m"]


def test_export_refuses_other_directories_even_with_overwrite(tiny, tmp_path):
  _, params = tiny
  (tmp_path / "photos").mkdir()
  (tmp_path / "photos" / "a.jpg").write_bytes(b"jpeg")
  before = _snapshot(tmp_path)
  with pytest.raises(files.WriteError, match="not a model directory"):
    _export(tmp_path / "photos", params, overwrite=True)
  assert _snapshot(tmp_path) == before


def test_export_through_a_link_to_an_empty_directory_keeps_the_link(
  tiny, tmp_path
):
  _, params = tiny
  real = tmp_path / "disk" / "models"
  real.mkdir(parents=True)
  link = tmp_path / "models"
  link.symlink_to(real)
  old = os.umask(0o022)
  try:
    _export(link, params)
  finally:
    os.umask(old)
  assert os.path.islink(link) and model_dir.is_model_dir(str(real))
  mode = os.stat(real / model_dir.PARAMS).st_mode
  assert stat.S_IMODE(mode) == 0o644


def test_export_of_nan_params_writes_nothing(tiny, tmp_path):
  _, params = tiny
  flat = model_dir.flatten(params)
  key = sorted(flat)[0]
  flat[key] = np.full_like(flat[key], np.nan)
  with pytest.raises(model_dir.ModelError, match=f"{key} contains NaN"):
    _export(tmp_path / "m", model_dir.unflatten(flat))
  assert os.listdir(tmp_path) == []
