"""Directories written as one output, never over what they do not own.

``check_output_dir`` says how a directory may be written (nothing there:
"new"; an empty directory: "fill"; one the caller recognises as its own,
with ``overwrite``: "replace") and refuses a file, any other non-empty
directory, and its own without ``overwrite``. ``write_dir`` then writes:
a new directory is filled beside its place and renamed into it; otherwise
each file goes through ``files.write_atomic``, and of the names the
caller owns only those are removed that this write did not replace.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable

from cdc_jax import files


def check_output_dir(
  directory, is_ours: Callable[[str], bool], overwrite: bool, what: str
) -> str:
  """How ``write_dir`` may write ``directory``: "new" (nothing there),
  "fill" (an empty directory) or "replace" (``is_ours(directory)`` and
  ``overwrite``).

  Raises:
    WriteError: a file is there, a directory that is not empty and not
      ours, or ours without ``overwrite``.
  """
  directory = os.fspath(directory)
  if not directory:
    raise files.WriteError(f"the {what} name is empty; name a directory")
  st = files.stat_or_none(directory, files.WriteError)
  if st is None and os.path.islink(directory):
    raise files.WriteError(f"{directory}: a dangling symbolic link")
  if st is None:
    return "new"
  if not stat.S_ISDIR(st.st_mode):
    raise files.WriteError(
      f"{directory}: is {files.kind_of(st.st_mode)}, not a directory; "
      f"name a new or empty directory for the {what}"
    )
  held = sorted(os.listdir(directory))
  if not held:
    return "fill"
  if not is_ours(directory):
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    raise files.WriteError(
      f"{directory}: not empty and not a {what} (holds {shown}); name a "
      "new or empty directory (nothing was written)"
    )
  if not overwrite:
    raise files.WriteError(
      f"{directory}: a {what} exists there; pass --overwrite "
      "(overwrite=True) to replace it, or name another directory"
    )
  return "replace"


def write_dir(directory, payloads: dict, owned: Iterable[str], how: str):
  """Writes ``payloads`` (file name -> bytes or writer) as the directory
  ``directory``, as ``check_output_dir`` said (``how``). "new": a
  directory beside it is filled, then renamed into place (on failure it
  is removed: only what was written here). Otherwise each file is
  written atomically, in order (put the one that marks the directory
  complete last), and then the ``owned`` names not written this time are
  removed; nothing else is touched."""
  directory = os.path.abspath(os.fspath(directory))
  if how != "new":
    for name, payload in payloads.items():
      files.write_atomic(os.path.join(directory, name), payload)
    for name in set(owned) - set(payloads):
      path = os.path.join(directory, name)
      if os.path.isfile(path) and not os.path.islink(path):
        os.unlink(path)
    return
  parent, base = os.path.split(directory)
  files.make_output_dir(parent, "parent folder")
  tmp = os.path.join(parent, f".tmp-{base}-{secrets.token_hex(4)}")
  os.mkdir(tmp)  # 0777 & ~umask, as any new directory
  try:
    for name, payload in payloads.items():
      files.write_atomic(os.path.join(tmp, name), payload)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
