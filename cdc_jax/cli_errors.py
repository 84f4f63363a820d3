"""User errors at the command line: one line on stderr, exit status 2.

A command-line entry point reports an error the user can fix (a
``cdc_jax.errors.UserError``: a missing file, weights of the wrong kind,
a setting out of range) as ``PROG: error: MESSAGE`` and returns 2,
argparse's status for a usage error, never with a traceback; Ctrl-C is
``PROG: interrupted`` and status 130 (128 + SIGINT, the shell's
convention)::

  @cli_errors.user_errors(PROG)
  def main(argv=None) -> int:
    ...

Used by every entry point: ``python -m cdc_jax.convert`` (its
``checkpoint``, ``lpips`` and ``inception`` commands), the codec CLI and
the main job (``prog=None``: ``error: MESSAGE``), ``cdc_jax.evaluate``,
and the absl flag parser (``config_flags_errors``). Nothing else is
caught: any other exception is a bug and keeps its traceback. The
message is the exception's text, which the raising code keeps to one
line.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from cdc_jax.errors import UserError

EXIT_STATUS = 2
INTERRUPTED = 130  # 128 + SIGINT


def report(prog: str | None, error: object) -> int:
  """Prints ``PROG: error: ERROR`` (``error: ERROR`` when ``prog`` is
  None) on stderr; returns the exit status, 2."""
  prefix = f"{prog}: " if prog else ""
  print(f"{prefix}error: {error}", file=sys.stderr)
  return EXIT_STATUS


def interrupted(prog: str | None) -> int:
  """Prints ``PROG: interrupted`` on stderr; returns 130."""
  prefix = f"{prog}: " if prog else ""
  print(f"{prefix}interrupted", file=sys.stderr)
  return INTERRUPTED


def user_errors(
  prog: str | None,
) -> Callable[[Callable[..., int]], Callable[..., int]]:
  """Decorates ``main(argv) -> int``: a ``UserError`` raised inside it is
  ``report``-ed and ``main`` returns 2; a KeyboardInterrupt returns 130
  with one line; any other exception (a bug, with its traceback;
  ``SystemExit`` from ``--help`` or a usage error) passes."""

  def decorate(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
      try:
        return main(*args, **kwargs)
      except UserError as e:
        return report(prog, e)
      except KeyboardInterrupt:
        return interrupted(prog)

    return run

  return decorate


def positive_int(text: str) -> int:
  """An argparse ``type``: a positive integer, else a usage error that
  quotes the value (not int()'s "invalid literal")."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
  return value
