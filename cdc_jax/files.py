"""Files the user names: the one way outputs are written and inputs read.

Outputs (``write_atomic``; ``check_output`` runs the same checks up front,
before any expensive work):

* the name must not be empty and its folder must exist;
* an output that is one of the command's inputs (the same file, also
  through a symbolic or hard link: same device and inode) is refused;
* nothing or a regular file at the path: the bytes go to a temporary file
  beside it (``.tmp-NAME-XXXXXXXX.part``), which is then renamed over the
  path, so the old file stays whole until the new one is complete. A new
  file gets the umask's permissions (0666 & ~umask), a replaced one keeps
  its own. An error, Ctrl-C or SIGTERM removes the temporary file;
* a symbolic link: written through to its target (the link stays); a
  dangling link creates its target;
* a character device or a FIFO (``/dev/null``, ``/dev/stdout``, a pipe):
  written to in place, not replaced; ``-`` is standard output;
* a directory, a block device, a socket or a link loop: refused.

A directory written as one output (a model directory) follows
``cdc_jax.output_dirs``, file by file through ``write_atomic``.

Inputs (``read_input``, ``check_input``): a regular file (or a link to
one), never a FIFO or a device, which could block or never end; its size
checked against a cap from ``stat`` and its magic bytes from the first
read, before the rest is read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterable
from typing import BinaryIO

from cdc_jax.errors import UserError

STDOUT = "-"
Payload = bytes | Callable[[BinaryIO], None]


class WriteError(UserError, OSError):
  """An output cannot be written; the message names it and why."""


class ReadError(UserError, OSError):
  """An input cannot be read; the message names it and why."""


def kind_of(mode: int) -> str:
  """What a file of ``mode`` is, for messages: "a FIFO", ..."""
  for test, name in (
    (stat.S_ISREG, "a file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
  ):
    if test(mode):
      return name
  return "of an unknown kind"


def stat_or_none(path: str, fail) -> os.stat_result | None:
  """``os.stat`` (links followed); None when nothing is there."""
  try:
    return os.stat(path)
  except FileNotFoundError:
    return None
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise fail(f"{path}: a symbolic link loop") from None
    raise fail(f"{path}: {e.strerror}") from None


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _check_not_input(path: str, st, inputs: Iterable) -> None:
  for src in inputs:
    other = stat_or_none(os.fspath(src), WriteError) if src else None
    if st is not None and other is not None and same_file(st, other):
      raise WriteError(
        f"{path}: the output is the input {os.fspath(src)} (the same file); "
        "choose another output name"
      )


def check_output(path, inputs: Iterable = ()) -> tuple[str, str]:
  """Checks that ``path`` may be written (the rules above) without
  writing it; returns (how, where): ``("replace", file)`` for an atomic
  write of ``file`` (the link's target for a link), ``("stream", path)``
  for a device or FIFO, ``("stdout", "-")``.

  Raises:
    WriteError: the name is empty, its folder is missing, it is an input
      or a kind that is never replaced.
  """
  path = os.fspath(path)
  if not path:
    raise WriteError("the output file name is empty; name a file")
  if path == STDOUT:
    return "stdout", path
  st = stat_or_none(path, WriteError)
  _check_not_input(path, st, inputs)
  if st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
    return "stream", path
  if st is not None and not stat.S_ISREG(st.st_mode):
    raise WriteError(
      f"{path}: cannot write: it is {kind_of(st.st_mode)}, not a file; name "
      "a file"
    )
  target = os.path.realpath(path) if os.path.islink(path) else path
  folder = os.path.dirname(os.path.abspath(target))
  if not os.path.isdir(folder):
    raise WriteError(f"{path}: output directory {folder} does not exist")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise WriteError(f"{path}: cannot write: {folder} is not writable")
  return "replace", target


def write_atomic(path, payload: Payload, inputs: Iterable = ()) -> None:
  """Writes ``payload`` (bytes, or ``write(f)`` given the open binary
  file) to ``path`` by the rules above.

  Raises:
    WriteError: as ``check_output``, or the write itself fails (disk
      full, ...); the message names the file.
  """
  path = os.fspath(path)
  how, where = check_output(path, inputs)
  try:
    if how == "stdout":
      _write_to(sys.stdout.buffer, payload)
      sys.stdout.buffer.flush()
    elif how == "stream":
      with open(where, "wb") as f:
        _write_to(f, payload)
    else:
      _replace(where, payload)
  except OSError as e:
    if isinstance(e, WriteError):
      raise
    raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None


def _write_to(f: BinaryIO, payload: Payload) -> None:
  if isinstance(payload, bytes | bytearray | memoryview):
    f.write(payload)
  else:
    payload(f)


def _replace(target: str, payload: Payload) -> None:
  """Temp file beside ``target``, then a rename; removed on any failure."""
  folder, name = os.path.split(os.path.abspath(target))
  old = stat_or_none(target, WriteError)
  tmp = os.path.join(folder, f".tmp-{name}-{secrets.token_hex(4)}.part")
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
  with _cleanup_on_sigterm():
    fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any file
    try:
      with os.fdopen(fd, "wb") as f:
        _write_to(f, payload)
      if old is not None:
        os.chmod(tmp, stat.S_IMODE(old.st_mode))
      os.replace(tmp, target)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise


class _Terminated(BaseException):
  pass  # SIGTERM arrived while a temporary file existed


@contextlib.contextmanager
def _cleanup_on_sigterm():
  """Turns SIGTERM into an exception for the block (so the temporary
  file is removed), then dies of it as the default handler would. Only
  where SIGTERM has the default handler (the trainer's own is kept)."""
  main = threading.current_thread() is threading.main_thread()
  if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
    yield
    return

  def handler(signum, frame):
    raise _Terminated()

  signal.signal(signal.SIGTERM, handler)
  try:
    yield
  except _Terminated:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # dies here, as by the signal
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def writes_stdout(path) -> bool:
  """Whether writing ``path`` goes to this process's stdout."""
  path = os.fspath(path)
  if path == STDOUT:
    return True
  try:
    return same_file(os.stat(path), os.fstat(sys.stdout.fileno()))
  except (OSError, ValueError, AttributeError):
    return False


def check_folder(path, what: str = "output folder") -> str:
  """Checks, creating nothing, that ``path`` is a folder or can become
  one (``make_output_dir``); returns ``path``.

  Raises:
    WriteError: ``path`` is empty, a file, a dangling link or a loop.
  """
  path = os.fspath(path)
  if not path:
    raise WriteError(f"the {what} name is empty; name a folder")
  st = stat_or_none(path, WriteError)
  if st is not None and not stat.S_ISDIR(st.st_mode):
    raise WriteError(
      f"{path}: the {what} is {kind_of(st.st_mode)}, not a folder; name a "
      "folder (it is created if missing)"
    )
  if st is None and os.path.islink(path):
    raise WriteError(f"{path}: the {what} is a dangling symbolic link")
  return path


def make_output_dir(path, what: str = "output folder") -> str:
  """Creates the folder ``path`` (and its parents) unless it is one;
  returns ``path``.

  Raises:
    WriteError: as ``check_folder``, or it cannot be created.
  """
  path = check_folder(path, what)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WriteError(
      f"{path}: cannot create the {what} ({e.strerror})"
    ) from None
  return path


def input_problem(
  path, max_bytes: int | None = None, hint: str = ""
) -> tuple[str, int]:
  """What keeps ``path`` from being read as an input ('' if nothing) and
  its size: it must be a regular file (links followed) of at most
  ``max_bytes`` (``hint``: how to raise that)."""
  path = os.fspath(path)
  try:
    st = os.stat(path) if path else None
  except FileNotFoundError:
    st = None
  except OSError as e:
    loop = e.errno == errno.ELOOP
    return ("a symbolic link loop" if loop else e.strerror), 0
  if st is None:
    return "file not found", 0
  if not stat.S_ISREG(st.st_mode):
    return f"not a regular file ({kind_of(st.st_mode)})", 0
  if max_bytes is not None and st.st_size > max_bytes:
    fix = f"; {hint}" if hint else ""
    return (
      f"the file is {st.st_size:,} bytes, more than the {max_bytes:,} it "
      f"may be{fix}"
    ), st.st_size
  return "", st.st_size


def check_input(
  path, what: str = "input", max_bytes: int | None = None, hint: str = ""
) -> int:
  """Checks that ``path`` is a regular file (links followed) of at most
  ``max_bytes``; returns its size.

  Raises:
    ReadError: missing, not a regular file, or too large.
  """
  problem, size = input_problem(path, max_bytes, hint)
  if problem:
    raise ReadError(f"{os.fspath(path)}: cannot read the {what}: {problem}")
  return size


def read_input(
  path,
  what: str = "input",
  max_bytes: int | None = None,
  magic: bytes = b"",
  hint: str = "",
) -> bytes:
  """The bytes of ``path`` after ``check_input``; with ``magic``, the
  file's first bytes are compared before the rest is read (a file shorter
  than the magic is returned for its parser to call truncated).

  Raises:
    ReadError: as ``check_input``, a wrong magic, or a read error.
  """
  path = os.fspath(path)
  size = check_input(path, what, max_bytes, hint)
  try:
    with open(path, "rb") as f:
      head = f.read(len(magic))
      if head != magic[: len(head)]:  # a shorter file: the parser says
        raise ReadError(
          f"{path}: not a {what} (bad magic bytes {head!r}, expected {magic!r})"
        )
      rest = f.read(size - len(head) + 1)
  except OSError as e:
    if isinstance(e, ReadError):
      raise
    raise ReadError(f"{path}: cannot read the {what} ({e.strerror})") from None
  data = head + rest
  if max_bytes is not None and len(data) > max_bytes:  # it grew meanwhile
    raise ReadError(f"{path}: the {what} is larger than {max_bytes:,} bytes")
  return data
