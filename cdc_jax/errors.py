"""The one base class of the errors a user can fix.

Every error a user's input can cause (a file that is missing or of the
wrong kind, a setting out of range, a damaged model directory) derives
from ``UserError``; the command-line entry points catch it and print its
message as one line with exit status 2 (``cdc_jax.cli_errors``), while
any other exception is a bug and keeps its traceback. The message is one
line naming the file or setting, the value and the fix.

The concrete classes keep a second, built-in base where callers catch
that (``CodecError`` is also a ``ValueError``, ``WriteError`` an
``OSError``), so code written against those still works.
"""

from __future__ import annotations


class UserError(Exception):
  """An error the user can fix; ``str(e)`` is one line saying what and
  how."""


class SettingError(UserError, ValueError):
  """A setting (flag, config field, keyword) out of range; the message
  names the setting, the value and what it may be."""
