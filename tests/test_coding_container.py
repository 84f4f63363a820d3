"""Tests of cdc_jax.coding.container (the .cdcj file format)."""

import struct
import zlib

import numpy as np
import pytest

from cdc_jax.coding import container, tables
from cdc_jax.coding import range_coder as rc
from cdc_jax.coding.container import Header
from cdc_jax.coding.errors import BitstreamError


def _header(**kw):
  fields = dict(
    fingerprint=bytes(range(16)),
    height=512,
    width=768,
    family=container.FAMILY_X,
    steps=17,
    gamma=0.8,
    seed=2**40 + 3,
    sampler=container.SAMPLER_DDIM,
  )
  fields.update(kw)
  return Header(**fields)


def _valid_file(rng=None):
  rng = rng or np.random.default_rng(8)
  one_scale = tables.gaussian_tables(np.array([2.0]))
  streams = [
    rng.integers(0, 256, size=40, dtype=np.uint8).tobytes(),
    b"",
    rc.encode_streams(
      [(np.arange(-5, 5, dtype=np.int32), np.zeros(10, np.int32), one_scale)]
    ),
  ]
  return container.pack(_header(), streams), streams


# Layout, found through pack (docs/bitstream.md): the fixed part ends with
# the stream count; the stream lengths follow; a CRC32 ends the file.
_CRC_SIZE = 4
_FIXED = len(container.pack(_header(), [])) - _CRC_SIZE


def _offset_of(**change):
  """The first byte where a header with ``change`` packs differently."""
  a = container.pack(_header(), [])[:_FIXED]
  b = container.pack(_header(**change), [])[:_FIXED]
  return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


def _refresh_crc(body):
  return body + struct.pack("<I", zlib.crc32(body))


def test_pack_unpack_roundtrip():
  data, streams = _valid_file()
  assert data[:4] == container.MAGIC == b"CDCJ"
  assert data[4] == container.FORMAT_VERSION == 3
  assert len(data) == _FIXED + 4 * 3 + 40 + 0 + len(streams[2]) * 4 + 4
  header, back = container.unpack(data)
  assert header == _header()
  assert header.gamma == pytest.approx(0.8) and isinstance(header.gamma, float)
  assert back[:2] == streams[:2]
  np.testing.assert_array_equal(rc.bytes_to_words(back[2]), streams[2])
  assert container.unpack(bytearray(data))[0] == header
  assert container.unpack(memoryview(data))[0] == header
  # Packing what was unpacked gives the same bytes.
  assert container.pack(header, back) == data


def test_versions_and_tile_layouts():
  """v3 holds either layout (zeros: whole image); v1 none, v2 one; each
  version packs and parses as itself (v1 files are 6 bytes shorter)."""
  tiled = dict(tile_height=256, tile_width=512, tile_overlap=64)
  sizes = {}
  for version, tile in ((1, {}), (2, tiled), (3, {}), (3, tiled)):
    header = _header(version=version, **tile)
    data = container.pack(header, [b"abc"])
    assert data[4] == version
    back, streams = container.unpack(data)
    assert back == header and back.version == version and streams == [b"abc"]
    sizes[version, bool(tile)] = len(data)
  assert sizes[2, True] == sizes[3, False] == sizes[3, True]
  assert sizes[1, False] == sizes[3, False] - 6
  for bad, message in (
    (dict(version=1, **tiled), "v1 file has no tile"),
    (dict(version=2), "v2 file has a tile"),
    (dict(version=4), "unknown format version"),
    (dict(version=0), "unknown format version"),
  ):
    with pytest.raises(ValueError, match=message):
      _header(**bad)


def test_pack_dict_header_boundary_values():
  h = dict(
    fingerprint=b"\xff" * 16,
    height=2**32 - 1,
    width=1,
    family=container.FAMILY_EPS,
    steps=2**16 - 1,
    gamma=-1.5,
    seed=2**64 - 1,
  )
  header, back = container.unpack(container.pack(h, []))
  assert header == Header(**h) and back == []
  assert header.flags == 0 and header.sampler == container.SAMPLER_DDIM


def test_gamma_is_stored_as_float32():
  header = _header(gamma=0.1)
  assert header.gamma == float(np.float32(0.1)) != 0.1
  back, _ = container.unpack(container.pack(header, []))
  assert back.gamma == header.gamma
  # np.errstate: container.py warns on the overflowing cast it then rejects.
  with np.errstate(over="ignore"), pytest.raises(ValueError, match="float32"):
    _header(gamma=1e39)


@pytest.mark.parametrize(
  "change",
  [
    dict(fingerprint=b"short"),
    dict(fingerprint="x" * 16),
    dict(family=2),
    dict(steps=2**16),
    dict(steps=-1),
    dict(gamma=float("nan")),
    dict(gamma=float("inf")),
    dict(height=0),
    dict(width=2**32),
    dict(seed=-1),
    dict(seed=2**64),
    dict(sampler=1),
    dict(flags=256),
    dict(height=2.0),
  ],
)
def test_header_validation(change):
  with pytest.raises(ValueError):
    _header(**change)


def test_pack_rejects():
  with pytest.raises(ValueError, match="at most 255 streams"):
    container.pack(_header(), [b""] * 256)
  assert len(container.unpack(container.pack(_header(), [b""] * 255))[1]) == 255


def test_unpack_errors():
  data, _ = _valid_file()
  newer = container.FORMAT_VERSION + 1
  cases = [
    (b"", "truncated"),
    (b"CD", "truncated"),
    (b"PNG\x89" + data[4:], "not a cdc_jax file"),
    (b"X", "not a cdc_jax file"),
    (
      data[:4] + bytes([newer]) + data[5:],
      rf"newer cdc_jax \(format v{newer}\); this ver",
    ),
    (data[:4] + b"\x00" + data[5:], "unknown format version"),
    (data[:20], "file is truncated: expected at least"),
    (data[:-1], f"file is truncated: expected {len(data)} bytes, got"),
    (data + b"\x00", "trailing garbage"),
    (data[:30] + bytes([data[30] ^ 1]) + data[31:], "checksum mismatch"),
    (data[:-4] + b"\x00\x00\x00\x00", "checksum mismatch"),
  ]
  # A stream length that does not add up (CRC recomputed by a bad writer).
  body = bytearray(data[:-4])
  body[_FIXED : _FIXED + 4] = struct.pack("<I", 41)
  cases.append((_refresh_crc(bytes(body)), "stream lengths inconsistent"))
  body = bytearray(data[:-4])
  body[container._FIXED - 1] = 200  # the stream count ends the v1 fields
  cases.append((_refresh_crc(bytes(body)), "stream lengths inconsistent"))
  body = bytearray(data[:-4])
  body[_offset_of(family=container.FAMILY_EPS)] = 9
  cases.append((_refresh_crc(bytes(body)), "invalid header"))
  for bad, message in cases:
    with pytest.raises(BitstreamError, match=message):
      container.unpack(bad)
  with pytest.raises(BitstreamError, match="expected bytes"):
    container.unpack(1.5)


def test_unpack_fuzz():
  """Mutated files raise BitstreamError; any that parse are well formed."""
  rng = np.random.default_rng(9)
  data, _ = _valid_file()
  outcomes = {"ok": 0, "error": 0}
  for _ in range(300):
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
      kind = rng.integers(0, 4)
      pos = int(rng.integers(0, len(buf) + 1))
      if kind == 0 and buf:
        pos = min(pos, len(buf) - 1)
        buf[pos] ^= 1 << int(rng.integers(0, 8))
      elif kind == 1:
        del buf[pos:]
      elif kind == 2:
        ins = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8)
        buf[pos:pos] = ins.tobytes()
      else:
        del buf[pos : pos + int(rng.integers(1, 9))]
    try:
      header, streams = container.unpack(bytes(buf))
    except BitstreamError as e:
      assert str(e)
      outcomes["error"] += 1
    else:
      outcomes["ok"] += 1
      assert container.pack(header, streams) == bytes(buf)
  assert outcomes["error"] > 250, outcomes
  for n in range(0, 80):  # random byte strings, including short ones
    with pytest.raises(BitstreamError):
      container.unpack(rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def test_file_roundtrip_with_coded_stream():
  rng = np.random.default_rng(10)
  scale_table = tables.gaussian_scale_table()
  gauss = tables.gaussian_tables(scale_table)
  sigma = rng.uniform(0.1, 10, 500)
  sym = np.round(rng.normal(0, sigma)).astype(np.int32)
  idx = tables.scale_indexes(sigma, scale_table)
  data = container.pack(_header(), [rc.encode_streams([(sym, idx, gauss)])])
  header, (stream,) = container.unpack(data)
  assert header == _header()
  (out,) = rc.decode_streams(stream, [(idx, gauss)])
  np.testing.assert_array_equal(out, sym)
