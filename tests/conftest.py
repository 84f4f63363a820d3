"""Test setup: 8 fake CPU devices, fast compiles, a shared compile cache
(for the test process and the CLI subprocesses it starts).

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  """A tiny eps model directory (random weights, calibrated entropy
  model), one per test module."""
  from cdc_jax import testing

  path = str(tmp_path_factory.mktemp("models") / "eps")
  testing.export_tiny(path, "eps")
  return path


@pytest.fixture(scope="module")
def cm(model_path):
  """``model_path`` loaded for the codec."""
  from cdc_jax import codec

  return codec.load(model_path)
