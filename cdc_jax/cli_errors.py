"""User errors at the command line: one line on stderr, exit status 2.

A command-line entry point reports an error the user can fix (a missing
file, weights of the wrong kind) as ``PROG: error: MESSAGE`` and returns 2,
argparse's status for a usage error, never with a traceback::

  @cli_errors.user_errors(PROG, ConversionError)
  def main(argv=None) -> int:
    ...

Used by ``python -m cdc_jax.convert`` and its ``lpips_cli`` and
``inception_cli``, the codec CLI (``prog=None``: ``error: MESSAGE``),
``cdc_jax.evaluate`` and the main job (``report``). The message is the
exception's text, which the raising code keeps to one line.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_STATUS = 2


def report(prog: str | None, error: object) -> int:
  """Prints ``PROG: error: ERROR`` (``error: ERROR`` when ``prog`` is
  None) on stderr; returns the exit status, 2."""
  prefix = f"{prog}: " if prog else ""
  print(f"{prefix}error: {error}", file=sys.stderr)
  return EXIT_STATUS


def user_errors(
  prog: str | None, *types: type[BaseException]
) -> Callable[[Callable[..., int]], Callable[..., int]]:
  """Decorates ``main(argv) -> int``: an exception of ``types`` raised
  inside it is ``report``-ed and ``main`` returns 2; any other exception
  (``SystemExit`` from ``--help`` or a usage error included) passes."""
  if not types:
    raise TypeError("user_errors needs at least one exception type")

  def decorate(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
      try:
        return main(*args, **kwargs)
      except types as e:
        return report(prog, e)

    return run

  return decorate
