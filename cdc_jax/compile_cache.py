"""The persistent XLA compilation cache of the command-line tools.

``python -m cdc_jax.codec``, ``python -m cdc_jax.main`` and
``python -m cdc_jax.evaluate`` call ``enable`` before they compile
anything, so a second run with the same shapes (a second ``decompress``
of an image of the same size, a restarted training job) loads its
executables from disk instead of compiling them again.

Where the cache lives, first match wins:

1. ``--no-compile-cache`` (codec CLI) or ``--nocompile_cache`` (main
   job): off.
2. ``CDC_COMPILE_CACHE``: ``off`` (or ``0``, ``false``, ``no``) turns it
   off; any other value is the cache directory.
3. ``jax_compilation_cache_dir`` when already set (e.g. through
   ``JAX_COMPILATION_CACHE_DIR``): JAX's setting is kept.
4. ``$XDG_CACHE_HOME/cdc_jax/xla``, else ``~/.cache/cdc_jax/xla``.

Entries are keyed by JAX on the program, the devices, the compile options
and the jax/jaxlib versions, so a stale entry is never used; the
directory can be deleted at any time. It is not size-capped.

Multi-process runs on CPU never use it: JAX writes entries from process
0 only and the other processes compute other keys, so with a warm cache
process 0 starts seconds to minutes ahead of the rest and the CPU
collectives' fixed 30 s start-up deadline can pass. Multi-process runs on
accelerators keep it (JAX's own design: process 0 writes, all read).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

logger = logging.getLogger(__name__)

ENV = "CDC_COMPILE_CACHE"
OFF = ("off", "0", "false", "no")
# Programs that compile faster than this are not written (a cache read
# costs a few ms; tiny eager ops would otherwise litter the directory).
MIN_COMPILE_TIME_S = 0.2
MIN_ENTRY_SIZE_BYTES = 0


def default_dir(environ: Mapping[str, str] | None = None) -> str:
  """``$XDG_CACHE_HOME/cdc_jax/xla``, else ``~/.cache/cdc_jax/xla``."""
  env = os.environ if environ is None else environ
  base = env.get("XDG_CACHE_HOME") or os.path.join(
    os.path.expanduser("~"), ".cache"
  )
  return os.path.join(base, "cdc_jax", "xla")


def resolve(
  disabled: bool = False, environ: Mapping[str, str] | None = None
) -> str | None:
  """The cache directory per the rules above, or None when it is off."""
  env = os.environ if environ is None else environ
  if disabled:
    return None
  value = env.get(ENV, "").strip()
  if value.lower() in OFF:
    return None
  if value:
    return os.path.abspath(os.path.expanduser(value))
  return jax.config.jax_compilation_cache_dir or default_dir(env)


def _multi_process_cpu() -> bool:
  # Only after jax.distributed.initialize (if any): asks the backend.
  return jax.process_count() > 1 and jax.default_backend() == "cpu"


def enable(disabled: bool = False) -> str | None:
  """Turns the persistent cache on (or off); returns its directory.

  Call it before the first compile (it is read once, at the first
  compile) and, in multi-process runs, after
  ``cdc_jax.distributed.initialize``. A directory that cannot be created
  turns the cache off with one warning; the run goes on.
  """
  path = resolve(disabled)
  if path is not None and _multi_process_cpu():
    logger.info("compilation cache off: a multi-process CPU run")
    path = None
  if path is not None:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      logger.warning(
        "compilation cache off: cannot create %s (%s); set %s=DIR or %s=off",
        path,
        e.strerror or e,
        ENV,
        ENV,
      )
      path = None
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update(
    "jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S
  )
  jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_SIZE_BYTES
  )
  logger.info("compilation cache: %s", path)
  return path


def add_flag(parser) -> None:
  """Adds ``--no-compile-cache`` to an argparse parser."""
  parser.add_argument(
    "--no-compile-cache",
    action="store_true",
    help=f"do not use the persistent XLA compilation cache (default dir "
    f"{default_dir()}; {ENV}=DIR moves it, {ENV}=off turns it off)",
  )
