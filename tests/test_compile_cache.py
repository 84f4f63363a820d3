"""The persistent compilation cache: where it lives, and that a second
``decompress`` of the same file loads its programs instead of compiling."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from cdc_jax import compile_cache, testing
from cdc_jax.codec import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_dir_follows_xdg():
  assert compile_cache.default_dir({"XDG_CACHE_HOME": "/c"}) == os.path.join(
    "/c", "cdc_jax", "xla"
  )
  home = os.path.expanduser("~")
  assert compile_cache.default_dir({}) == os.path.join(
    home, ".cache", "cdc_jax", "xla"
  )


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", "no"])
def test_off_by_environment(value):
  assert compile_cache.resolve(environ={"CDC_COMPILE_CACHE": value}) is None


def test_flag_wins_over_environment(tmp_path):
  env = {"CDC_COMPILE_CACHE": str(tmp_path)}
  assert compile_cache.resolve(disabled=True, environ=env) is None
  assert compile_cache.resolve(environ=env) == str(tmp_path)


def test_environment_directory_is_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  got = compile_cache.resolve(environ={"CDC_COMPILE_CACHE": "rel/xla"})
  assert got == os.path.join(str(tmp_path), "rel", "xla")


def test_flag():
  p = argparse.ArgumentParser()
  compile_cache.add_flag(p)
  assert p.parse_args(["--no-compile-cache"]).no_compile_cache
  assert not p.parse_args([]).no_compile_cache


_ENABLE = """
import json, os, sys
import jax
from cdc_jax import compile_cache
out = []
for value in sys.argv[1:]:
  os.environ["CDC_COMPILE_CACHE"] = value
  path = compile_cache.enable()
  out.append([path, jax.config.jax_enable_compilation_cache,
              jax.config.jax_compilation_cache_dir])
print(json.dumps(out))
"""


def test_enable_sets_jax_config_or_turns_it_off(tmp_path):
  """In a fresh process (the setting is global): a directory is created
  and handed to JAX; off, and a directory that cannot be made, turn the
  cache off (the latter with one warning) instead of failing the run."""
  blocker = tmp_path / "file"
  blocker.write_text("")
  cache = tmp_path / "a" / "xla"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  res = subprocess.run(
    [sys.executable, "-c", _ENABLE, str(cache), "off", str(blocker / "x")],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert res.returncode == 0, res.stderr
  on, off, bad = json.loads(res.stdout)
  assert on == [str(cache), True, str(cache)] and cache.is_dir()
  assert off[:2] == [None, False]
  assert bad[:2] == [None, False]
  warnings = [ln for ln in res.stderr.splitlines() if "cannot create" in ln]
  assert len(warnings) == 1 and str(blocker / "x") in warnings[0]


def _entries(cache) -> set[str]:
  if not os.path.isdir(cache):
    return set()
  return {n for n in os.listdir(cache) if n.endswith("-cache")}


def _decompress(model, src, dst, cache, *flags):
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",  # as conftest: faster compiles
    "CDC_COMPILE_CACHE": str(cache),
  }
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "cdc_jax.codec", "decompress", *flags]
  res = subprocess.run(
    [*cmd, "--model", str(model), str(src), str(dst)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  with open(dst, "rb") as f:
    return f.read()


@pytest.mark.slow  # three fresh processes, one full decoder compile
def test_second_decompress_loads_from_the_cache(tmp_path):
  from cdc_jax import codec

  model = tmp_path / "model"
  img = testing.photo("chelsea", (64, 64), 100, 200)
  testing.export_tiny(str(model), "eps", calib=img)
  src = tmp_path / "in.cdcj"
  cm = codec.load(str(model))
  cli.compress_file(cm, _png(tmp_path, img), str(src), steps=2)
  cache = tmp_path / "xla"

  first = _decompress(model, src, tmp_path / "1.png", cache)
  written = _entries(cache)
  assert written  # the decode loop at least
  second = _decompress(model, src, tmp_path / "2.png", cache)
  assert _entries(cache) == written  # all loaded, nothing compiled anew
  assert second == first

  off = tmp_path / "off"
  third = _decompress(model, src, tmp_path / "3.png", off, "--no-compile-cache")
  assert not os.path.exists(off)
  assert third == first


def _png(tmp_path, img) -> str:
  from cdc_jax.imageio import save_png

  path = str(tmp_path / "in.png")
  save_png(path, img)
  return path
