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
