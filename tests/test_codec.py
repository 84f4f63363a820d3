"""Tests of cdc_jax.codec: real files from tiny models, end to end.

The tiny eps and x models (``cdc_jax.testing``) are exported once per
module, their entropy models calibrated so that latents, scales and rates
look like a trained model's; the U-Nets stay at random init (the decoded
pixels are meaningless, but exact and deterministic). Compiles dominate:
few image shapes, S <= 2. The CLI is tested in test_codec_cli.py.
"""

import dataclasses
import functools
import random
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import codec, testing
from cdc_jax.codec import decompress_many
from cdc_jax.coding import container, range_coder
from cdc_jax.coding import tables as coding_tables
from cdc_jax.imageio import to_float
from cdc_jax.models.cdc import CDC

# eps with S = 2 visits abar ~ 0 first, so the U-Net really shapes the image
# (S = 1 is a single step at abar ~ 1, almost the identity).
STEPS = 2


@pytest.fixture(scope="module")
def eps_cm(cm):
  return cm


@pytest.fixture(scope="module")
def x_cm(x_model_path):
  return codec.load(x_model_path)


def test_loading_a_model_compiles_nothing(model_path):
  """The params go to the device in one transfer: no program per shape."""
  with testing.recorded_events(testing.COMPILED) as compiled:
    cm = codec.load(model_path)
    jax.block_until_ready(cm.params)
  assert compiled == []
  assert all(isinstance(p, jax.Array) for p in jax.tree.leaves(cm.params))


def _cm(request, family):
  return request.getfixturevalue(f"{family}_cm")


def _padded_input(cm, img):
  """The encoder's input: padded, in [-1, 1], [1, H, W, 3]."""
  x = to_float(codec.pad_image(img, cm.downsampling_factor))
  return jnp.asarray(x)[None]


# -- exactness of the entropy path ---------------------------------------------


@pytest.mark.parametrize("family", ["eps", "x"])
def test_decoder_reproduces_encoder_latents(family, request):
  cm = _cm(request, family)
  img = testing.photo("astronaut", (97, 130), 200, 150)  # padded 128 x 192
  res = codec.compress_image(cm, img, steps=1)
  x = _padded_input(cm, img)
  latents = codec.encode_latents(cm, x)
  assert np.any(latents.z_sym != 0) and np.any(latents.y_sym != 0)
  assert res.estimated_bits == latents.estimated_bits

  # The file holds exactly the entropy-coded latents.
  header, stream = codec.parse(cm, res.data)
  assert (header.height, header.width, header.steps) == (97, 130, 1)
  words = codec.entropy_encode(cm, latents)
  assert stream == range_coder.words_to_bytes(words)
  # The stream starts with z: the decoder's z symbols are the encoder's.
  z_shape = latents.z_sym.shape
  z_dec = range_coder.Decoder(stream).decode(
    coding_tables.channel_indexes(z_shape), cm.z_tables
  )
  np.testing.assert_array_equal(z_dec.reshape(z_shape), latents.z_sym)

  # The decoder's y_hat is the encoder's y_sym + mu, bit for bit.
  y_hat = np.asarray(codec.decode_latents(cm, header, stream))
  assert y_hat.dtype == np.float32 and y_hat.shape == latents.y_sym.shape
  mu, _ = cm.hyper(cm.params, jnp.asarray(latents.z_sym))
  np.testing.assert_array_equal(
    y_hat, latents.y_sym.astype(np.float32) + np.asarray(mu)
  )

  # The model's own eval-mode forward on the padded image: its rounded
  # latents are exactly what the decoder reconstructs.
  variables = {"params": cm.params}
  fwd = jax.jit(functools.partial(cm.model.apply, method=CDC.context_model))
  ctx = fwd(variables, x)
  med = np.asarray(cm.model.apply(variables, method=CDC.medians))
  np.testing.assert_array_equal(
    np.asarray(ctx["z_hat"]), latents.z_sym.astype(np.float32) + med
  )
  np.testing.assert_array_equal(np.asarray(ctx["y_hat"]), y_hat)
  # ... and its bpp (over the padded size) is the codec's float estimate.
  hp, wp = codec.padded_size(97, 130, cm.downsampling_factor)
  assert res.estimated_bits == pytest.approx(
    float(ctx["bpp"][0]) * hp * wp, rel=1e-5
  )


def test_file_size_matches_estimates(eps_cm):
  cm = eps_cm
  img = testing.photo("astronaut", (256, 256), 0, 128)
  res = codec.compress_image(cm, img, steps=STEPS)
  latents = codec.encode_latents(cm, _padded_input(cm, img))
  z_sym, y_sym = latents.z_sym, latents.y_sym
  assert y_sym.size >= 4000  # thousands of y symbols
  z_bits = range_coder.estimate_bits(
    z_sym, coding_tables.channel_indexes(z_sym.shape), cm.z_tables
  )
  y_idx = latents.y_indexes
  y_bits = range_coder.estimate_bits(y_sym, y_idx, cm.y_tables)
  int_bits = z_bits + y_bits
  _, streams = container.unpack(res.data)
  payload_bits = 8 * len(streams[0])
  header_bytes = len(res.data) - len(streams[0])
  overhead = payload_bits / int_bits - 1
  float_overhead = payload_bits / res.estimated_bits - 1
  print(
    f"\n{img.shape[0]}x{img.shape[1]}: {len(res.data)} bytes "
    f"({header_bytes} header), {res.bpp:.4f} bpp; {y_sym.size} y + "
    f"{z_sym.size} z symbols; payload {payload_bits} bits vs integer-table "
    f"estimate {int_bits:.1f} ({100 * overhead:+.3f} %) vs model float "
    f"estimate {res.estimated_bits:.1f} ({100 * float_overhead:+.3f} %)"
  )
  assert res.bpp == len(res.data) * 8 / (256 * 256)
  assert 0.05 < res.bpp < 2.0  # a realistic rate, not all-zero symbols
  assert payload_bits >= int_bits
  assert overhead < 0.01
  # The float estimate counts the same symbols; the integer tables differ
  # by the scale-table rounding and the 1/2**16 count floor of outliers.
  assert abs(int_bits / res.estimated_bits - 1) < 0.1


# -- determinism ---------------------------------------------------------------


def test_compress_and_decompress_are_deterministic(eps_cm):
  img = testing.photo("astronaut", (64, 128), 100, 200)
  a = codec.compress(eps_cm, img, steps=STEPS, seed=7)
  b = codec.compress(eps_cm, img.copy(), steps=STEPS, seed=7)
  assert a == b
  out1 = codec.decompress(eps_cm, a)
  out2 = codec.decompress(eps_cm, b)
  assert out1.shape == (64, 128, 3) and out1.dtype == np.uint8
  np.testing.assert_array_equal(out1, out2)
  # The seed in the file picks the decode noise.
  other = codec.decompress(eps_cm, codec.compress(eps_cm, img, steps=STEPS))
  assert not np.array_equal(out1, other)


@pytest.fixture(scope="module", params=["eps", "x"])
def batch_and_alone(request):
  """decompress_many on 4 files (3 of one size) and each file alone."""
  cm = _cm(request, request.param)
  steps = STEPS if request.param == "eps" else 1
  blobs = [
    codec.compress(
      cm,
      testing.photo("astronaut", (64, 128), 64 * i, 100),
      steps=steps,
      seed=i,
    )
    for i in range(3)
  ]
  # A file of another size in the middle: a group of its own, order kept.
  small = testing.photo("astronaut", (50, 60))
  blobs.insert(1, codec.compress(cm, small, steps=steps))
  batch = decompress_many(cm, blobs)
  alone = [codec.decompress(cm, b) for b in blobs]
  return batch, alone


def test_decompress_many_matches_one_at_a_time(batch_and_alone):
  batch, alone = batch_and_alone
  shapes = [(64, 128, 3), (50, 60, 3), (64, 128, 3), (64, 128, 3)]
  assert [a.shape for a in batch] == [a.shape for a in alone] == shapes
  assert not np.array_equal(batch[0], batch[2])  # other seeds and crops
  for i, (got, want) in enumerate(zip(batch, alone, strict=True)):
    # Not bit-exact on XLA:CPU (see decompress_many): the batched decode's
    # floats differ by ~1e-6 relative, which flips a few uint8 values.
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and np.mean(diff != 0) < 1e-3, f"file {i}"


# -- sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
  "family,h,w",
  [("eps", 1, 1), ("eps", 63, 65), ("eps", 97, 130), ("x", 63, 65)],
)
def test_odd_sizes_round_trip(family, h, w, request):
  cm = _cm(request, family)
  img = testing.photo("astronaut", (h, w), 300, 250)
  blob = codec.compress(cm, img, steps=STEPS if family == "eps" else 1)
  header, _ = container.unpack(blob)
  assert (header.height, header.width) == (h, w)
  out = codec.decompress(cm, blob)
  assert out.shape == (h, w, 3) and out.dtype == np.uint8


# -- damaged and crafted files -------------------------------------------------

# The layout, found through container.pack (docs/bitstream.md): magic and
# format version; fixed fields from the total size to the stream count; the
# stream lengths; the streams; a CRC32 of everything before it.
_CRC_SIZE = 4


def _layout():
  h = container.Header(fingerprint=bytes(16), height=1, width=1)
  fixed = len(container.pack(h, [])) - _CRC_SIZE
  # One more (empty) stream changes the total size and the stream count.
  a, b = container.pack(h, [])[:fixed], container.pack(h, [b""])[:fixed]
  diff = [i for i in range(fixed) if a[i] != b[i]]
  return {
    "version": len(container.MAGIC),
    "total": diff[0],
    "nstreams": diff[-1],
    "length": fixed,  # the first stream's
  }


OFFSETS = _layout()


_RAW_FORMATS = {
  "version": "<B",
  "total": "<I",
  "nstreams": "<B",
  "length": "<I",
}


def _reseal(blob: bytes) -> bytes:
  """``blob`` with its CRC32 recomputed over the (edited) body."""
  body = blob[:-_CRC_SIZE]
  return body + struct.pack("<I", zlib.crc32(body))


def _patch(blob: bytes, field: str, value, reseal: bool = True) -> bytes:
  """Overwrites a raw layout field (version, total, nstreams, length)."""
  b = bytearray(blob)
  struct.pack_into(_RAW_FORMATS[field], b, OFFSETS[field], value)
  return _reseal(bytes(b)) if reseal else bytes(b)


def _forge(blob: bytes, reseal: bool = True, **fields) -> bytes:
  """``blob`` with header ``fields`` set, unchecked: what a buggy or hostile
  writer makes (Header validates its fields, pack does not)."""
  header, streams = container.unpack(blob)
  header = dataclasses.replace(header)
  for name, value in fields.items():
    object.__setattr__(header, name, value)
  out = container.pack(header, streams)
  return out if reseal else out[:-_CRC_SIZE] + blob[-_CRC_SIZE:]


@pytest.fixture(scope="module")
def small_file(eps_cm):
  """A valid 50x60 eps file (padded to 64x64), S = STEPS."""
  img = testing.photo("astronaut", (50, 60))
  return codec.compress(eps_cm, img, steps=STEPS, seed=1)


def test_decompress_rejects_an_extreme_gamma(eps_cm, small_file):
  # A valid float32 gamma so large that x_T would overflow (a NaN decode):
  # refused from the header (codec.limits), before decoding.
  blob = _forge(small_file, gamma=3e38)
  assert container.unpack(blob)[0].gamma == pytest.approx(3e38)
  with pytest.raises(codec.CodecError, match=r"gamma 3e\+38 is outside"):
    codec.decompress(eps_cm, blob)
  with pytest.raises(codec.CodecError, match=r"gamma 3e\+38 is outside"):
    decompress_many(eps_cm, [small_file, blob])


# Header fields the fuzzer edits (all of them) with a valid CRC; "size" sets
# height and width together.
FIELDS = (
  "fingerprint",
  "height",
  "width",
  "size",
  "family",
  "steps",
  "gamma",
  "seed",
  "sampler",
  "flags",
  "version",
  "total",
  "nstreams",
  "length",
)
IMAGE, ERROR, EITHER = "image", "error", "image or error"


def _field_edit(rng, blob, field, reseal=True):
  """(description, bytes, expected outcome) of one header field edit.

  Sizes stay <= 64 (the file's padded size, nothing compiles anew) unless
  they exceed the codec's limits; steps stay in 0..2.
  """
  header, streams = container.unpack(blob)
  n = len(blob)
  if field in ("version", "total", "nstreams", "length"):
    value = {
      "version": rng.choice([0, container.FORMAT_VERSION + 1, 255]),
      "total": rng.choice([0, n - 1, n + 4, rng.getrandbits(32)]),
      "nstreams": rng.choice([0, 2, 255]),
      "length": rng.choice(
        [0, len(streams[0]) + rng.choice([-5, -4, -1, 1, 4]), 2**32 - 1]
      ),
    }[field]
    out, expect = _patch(blob, field, value, reseal), ERROR
  else:
    if field == "fingerprint":
      fp = bytearray(header.fingerprint)
      fp[rng.randrange(16)] ^= 1 << rng.randrange(8)
      value, expect = {"fingerprint": bytes(fp)}, ERROR  # another model
    elif field in ("height", "width"):
      side = rng.choice(
        [0, rng.randint(1, 64), rng.randint(1, 64), codec.MAX_SIDE + 1]
        + [2**32 - 1]
      )
      value, expect = {field: side}, IMAGE if 1 <= side <= 64 else ERROR
    elif field == "size":
      if rng.random() < 0.5:  # within limits per side, not in pixels
        value, expect = (
          {"height": codec.MAX_SIDE, "width": codec.MAX_SIDE},
          ERROR,
        )
      else:
        value = {"height": rng.randint(1, 64), "width": rng.randint(1, 64)}
        expect = IMAGE
    elif field == "family":
      fam = rng.choice([container.FAMILY_EPS, container.FAMILY_X, 2, 255])
      value, expect = {"family": fam}, IMAGE if fam == header.family else ERROR
    elif field == "steps":
      steps = rng.choice([0, 1, 2])
      value, expect = {"steps": steps}, IMAGE if steps else ERROR
    elif field == "gamma":
      # codec.limits: gamma in [0, 4]
      gamma, expect = rng.choice(
        [(0.0, IMAGE), (-0.0, IMAGE), (1.0, IMAGE), (-3.5, ERROR)]
        + [(1e-40, IMAGE), (1e30, ERROR), (3e38, ERROR)]
        + [(float("inf"), ERROR), (float("-inf"), ERROR), (float("nan"), ERROR)]
      )
      value = {"gamma": gamma}
    elif field == "seed":
      value, expect = {"seed": rng.getrandbits(64)}, IMAGE
    elif field == "sampler":
      value, expect = {"sampler": rng.choice([7, 200, 255])}, ERROR
    else:  # flags: reserved, ignored by v1 readers
      value, expect = {"flags": rng.randint(1, 255)}, IMAGE
    out = _forge(blob, reseal, **value)
  if not reseal:
    expect = ERROR
  return f"{field}={value!r}", out, expect


def _payload_edit(rng, blob, kind):
  """A valid header (CRC re-sealed) in front of a damaged stream."""
  header, streams = container.unpack(blob)
  s = bytearray(streams[0])
  if kind == "payload_flips":  # flips, sometimes a random run
    for _ in range(rng.randint(1, 6)):
      s[rng.randrange(len(s))] ^= 1 << rng.randrange(8)
    if rng.random() < 0.5:
      k = rng.randint(1, 16)
      at = rng.randrange(len(s) - k)
      s[at : at + k] = rng.randbytes(k)
  elif kind == "payload_resize":  # any length, not only whole words
    delta = rng.randint(-len(s), 16)
    s = s[: len(s) + delta] if delta < 0 else s + rng.randbytes(delta)
  else:  # payload_random
    s = rng.randbytes(4 * rng.randint(0, len(s) // 2))
  return kind, container.pack(header, [bytes(s)]), EITHER


def _broken(rng, blob, kind):
  """Damage the CRC does not match: always an error."""
  b = bytearray(blob)
  while bytes(b) == blob:
    if kind == "flip":
      for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
      del b[rng.randrange(len(b)) :]
    elif kind == "insert":
      at = rng.randrange(len(b) + 1)
      b[at:at] = rng.randbytes(rng.randint(1, 12))
    elif kind == "overwrite":
      k = rng.randint(1, 32)
      at = rng.randrange(len(b))
      for i in range(at, min(at + k, len(b))):
        b[i] ^= rng.randint(1, 255)
    else:  # garbage after a prefix of the file
      prefix = blob[: rng.choice([0, 4, 5, OFFSETS["length"]])]
      b = bytearray(prefix + rng.randbytes(rng.randint(0, 200)))
  return kind, bytes(b), ERROR


KINDS = (
  "field",
  "payload_flips",
  "field",
  "payload_resize",
  "field_stale_crc",
  "payload_random",
  "field",
  "flip",
  "truncate",
  "insert",
  "overwrite",
  "garbage",
)


def _mutations(blob: bytes, n: int, seed: int = 0):
  """n (description, bytes, expected outcome), cycling through KINDS and
  the header fields (each edited with a valid CRC in the first 60)."""
  rng = random.Random(seed)
  fields = {"field": 0, "field_stale_crc": 0}
  for i in range(n):
    kind = KINDS[i % len(KINDS)]
    if kind in fields:
      field = FIELDS[fields[kind] % len(FIELDS)]
      fields[kind] += 1
      reseal = kind == "field"
      desc, out, expect = _field_edit(rng, blob, field, reseal)
      while out == blob and not reseal:  # the edit kept the value
        desc, out, expect = _field_edit(rng, blob, field, reseal)
      desc = f"{kind} {desc}"
    elif kind.startswith("payload"):
      desc, out, expect = _payload_edit(rng, blob, kind)
    else:
      desc, out, expect = _broken(rng, blob, kind)
    yield f"#{i} {desc}", out, expect


def _fuzz(cm, blob, n, seed=0):
  """Decompresses n mutations of blob: each gives an image of the header's
  size or a one-line CodecError, as expected; returns outcome counts."""
  outcomes = {IMAGE: 0, ERROR: 0}
  seen = set()
  for desc, data, expect in _mutations(blob, n, seed):
    seen.add(desc.split()[1])
    try:
      img = codec.decompress(cm, data)
    except codec.CodecError as e:
      msg = str(e)
      assert msg and "\n" not in msg, desc
      assert expect != IMAGE, f"{desc}: {msg}"
      outcomes[ERROR] += 1
    except Exception as e:
      raise AssertionError(f"{desc}: {type(e).__name__}: {e}") from e
    else:
      assert expect != ERROR, f"{desc}: decoded"
      hdr = container.unpack(data)[0]
      assert img.dtype == np.uint8, desc
      assert img.shape == (hdr.height, hdr.width, 3), desc
      outcomes[IMAGE] += 1
  assert seen == set(KINDS), seen
  print(f"\nfuzz, {n} mutations: {outcomes}")
  return outcomes


def test_fuzz_decompress_returns_image_or_codec_error(eps_cm, small_file):
  outcomes = _fuzz(eps_cm, small_file, 96)
  # Both paths were exercised: damaged data decoded, malformed rejected.
  assert outcomes[IMAGE] >= 20 and outcomes[ERROR] >= 45


@pytest.mark.slow
def test_fuzz_decompress_thoroughly(eps_cm, small_file):
  outcomes = _fuzz(eps_cm, small_file, 1200, seed=1)
  assert outcomes[IMAGE] >= 250 and outcomes[ERROR] >= 700


def test_bfloat16_decode_is_close_but_not_the_reference(eps_cm, small_file):
  """``with_precision``: g_s and the U-Net in bf16, the same latents
  (h_s and the entropy decoding stay float32): an image of the header's
  size near the float32 decode, not bit-identical to it."""
  ref = codec.decompress(eps_cm, small_file)
  half = codec.with_precision(eps_cm, "bfloat16")
  assert half.model.dtype == "bfloat16" and half.params is eps_cm.params
  assert codec.with_precision(eps_cm, "float32") is eps_cm
  img = codec.decompress(half, small_file)
  assert img.shape == ref.shape and img.dtype == np.uint8
  diff = np.abs(img.astype(int) - ref.astype(int))
  assert 0 < np.mean(diff != 0) < 0.1, np.mean(diff != 0)
  assert diff.mean() < 3.0, diff.mean()
  with pytest.raises(codec.CodecError, match="float16"):
    codec.with_precision(eps_cm, "float16")
