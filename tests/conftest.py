"""Test setup: 8 fake CPU devices, fast compiles, a shared compile cache
(for the test process and the CLI subprocesses it starts), and the tiny
model directories the test modules share.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import hashlib
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Tiny models: compile time dominates, runtime does not.
jax.config.update("jax_disable_most_optimizations", True)
_cache = os.environ.get(
  "CDC_TEST_COMPILE_CACHE",
  os.path.join(tempfile.gettempdir(), "cdc_jax_test_compile_cache"),
)
jax.config.update("jax_compilation_cache_dir", _cache)
# CLI subprocesses the tests start use it too, not the user's
# ~/.cache/cdc_jax/xla (tests that test the cache set their own).
os.environ.setdefault("CDC_COMPILE_CACHE", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402

# -- shared fixtures -----------------------------------------------------------


def _digest(directory: str) -> dict[str, str]:
  """{relative path: SHA-256} of every file under ``directory``."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
      out[os.path.relpath(path, directory)] = digest
  return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
  """``tiny_models(family)``: the path of a tiny ``family`` ("eps", "x")
  model directory (random weights, entropy model calibrated on the
  default photo of ``testing.export_tiny``), built on first use, once per
  test process. Shared and read-only: a test that changes a model
  directory copies it first (``shutil.copytree`` into its ``tmp_path``);
  the session's end checks that none changed."""
  from cdc_jax import testing

  built = {}

  def get(family: str) -> str:
    if family not in built:
      path = str(tmp_path_factory.mktemp("tiny_models") / family)
      testing.export_tiny(path, family)
      built[family] = (path, _digest(path))
    return built[family][0]

  yield get
  changed = [p for p, digest in built.values() if _digest(p) != digest]
  assert not changed, f"tests changed the shared tiny models {changed}"


@pytest.fixture(scope="session")
def model_path(tiny_models):
  """The tiny eps model directory (``tiny_models("eps")``)."""
  return tiny_models("eps")


@pytest.fixture(scope="session")
def x_model_path(tiny_models):
  """The tiny x model directory (``tiny_models("x")``)."""
  return tiny_models("x")


@pytest.fixture(scope="module")
def cm(model_path):
  """``model_path`` loaded for the codec."""
  from cdc_jax import codec

  return codec.load(model_path)
