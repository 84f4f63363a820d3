""".npz archives a user hands us, read without trusting them.

``headers`` lists every member's name, shape and dtype from the zip
directory and each ``.npy`` header alone, without reading any array, so a
caller can check them against what it expects (and refuse a member that
declares terabytes) before ``read`` loads anything. Arrays are plain
numbers: object arrays (pickles) are refused from the header, and numpy
reads with ``allow_pickle=False``. A truncated or corrupt archive is an
error naming the file, never numpy's or zipfile's traceback.
"""

from __future__ import annotations

import dataclasses
import math
import zipfile
import zlib

import numpy as np

from cdc_jax import files
from cdc_jax.errors import UserError

MAX_MEMBERS = 100_000


class NpzError(UserError, ValueError):
  """An archive that is not a plain, whole .npz file."""


@dataclasses.dataclass(frozen=True)
class Member:
  """What a member's ``.npy`` header declares."""

  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def headers(path: str, error=NpzError) -> dict[str, Member]:
  """name -> Member for every array in the archive ``path``.

  Raises:
    ``error``: not a regular file, not a zip archive, a member that is not
      an ``.npy`` array of plain numbers, or a member whose size disagrees
      with its header (truncated or padded).
  """
  problem, _ = files.input_problem(path)
  if problem:
    raise error(f"{path}: {problem}")
  if not zipfile.is_zipfile(path):
    raise error(f"{path}: not an .npz archive (no zip directory; truncated?)")
  try:
    with zipfile.ZipFile(path) as zf:
      infos = zf.infolist()
      if len(infos) > MAX_MEMBERS:
        raise error(f"{path}: {len(infos):,} members, more than an .npz has")
      out = {}
      for info in infos:
        name = _member_name(path, info, out, error)
        out[name] = _member(path, zf, info, error)
      return out
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    raise error(f"{path}: a damaged .npz archive ({e})") from None


def _member_name(path: str, info, seen: dict, error) -> str:
  if not info.filename.endswith(".npy"):
    raise error(f"{path}: member {info.filename!r} is not an .npy array")
  name = info.filename[: -len(".npy")]
  if name in seen:
    raise error(f"{path}: member {name!r} appears twice")
  return name


def _member(path: str, zf: zipfile.ZipFile, info, error) -> Member:
  what = f"{path}: member {info.filename!r}"
  with zf.open(info) as f:
    try:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise error(f"{what}: .npy format {version} is not read here")
    except ValueError as e:
      if isinstance(e, error):
        raise
      raise error(f"{what}: not an .npy array ({e})") from None
    start = f.tell()
  if dtype.hasobject or dtype.kind not in "biuf":
    raise error(f"{what}: holds {dtype} values, not plain numbers; refused")
  member = Member(tuple(int(d) for d in shape), dtype)
  if info.file_size != start + member.nbytes:
    raise error(
      f"{what}: its header declares {member.shape} {dtype} "
      f"({member.nbytes:,} bytes) but it holds {info.file_size - start:,}"
    )
  return member


def read(path: str, error=NpzError) -> dict[str, np.ndarray]:
  """Every array of ``path`` (after ``headers`` passed: call that first
  and check what it lists).

  Raises:
    ``error``: the archive is damaged (a bad CRC, truncated data).
  """
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
    raise error(f"{path}: a damaged .npz archive ({e})") from None
