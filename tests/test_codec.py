"""Tests of cdc_jax.codec: real files from tiny models, end to end.

Two tiny models (eps and x, dim=4) are exported once per module. Their
entropy models are rescaled (see ``_realistic_entropy_model``) so that the
latents and scales look like a trained model's and the rates are realistic;
the U-Nets stay at random init (the decoded pixels are meaningless, but
exact and deterministic). Compiles dominate: few image shapes, S <= 2.
"""

import functools
import os
import random
import re
import shutil
import struct
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image

from cdc_jax import bitstream, checkpoint, codec, metrics
from cdc_jax.models.cdc import CDC

MODEL_CONFIGS = {
  "eps": (
    {"family": "eps", "dim": 4},
    {"schedule": "linear", "timesteps": 20000},
  ),
  "x": (
    {
      "family": "x",
      "dim": 4,
      "reverse_context_dim_mults": [4, 3, 2, 1],
      "context_channels": 4,
    },
    {"schedule": "cosine", "timesteps": 8193},
  ),
}
# eps with S = 2 visits abar ~ 0 first, so the U-Net really shapes the image
# (S = 1 is a single step at abar ~ 1, almost the identity).
STEPS = 2

# Byte offsets of the header fields (docs/bitstream.md).
OFF_VERSION, OFF_TOTAL, OFF_FP, OFF_H, OFF_W = 4, 5, 9, 25, 29
OFF_FAMILY, OFF_STEPS, OFF_GAMMA, OFF_SEED = 33, 34, 36, 40
OFF_SAMPLER, OFF_FLAGS, OFF_NSTREAMS, OFF_LENGTHS = 48, 49, 50, 51


def _photo(h, w, top=0, left=0, name="astronaut"):
  img = getattr(skimage.data, name)()[top : top + h, left : left + w]
  assert img.shape == (h, w, 3)
  return np.ascontiguousarray(img)


def _model(family):
  cfg = MODEL_CONFIGS[family][0]
  return CDC(
    **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  )


def _realistic_entropy_model(model, params, img):
  """Rescales the last layers of g_a, h_a and h_s, calibrated on ``img``.

  At random init y is ~0.2 and sigma sits at its 0.1 floor: nearly all
  symbols are 0, the rare +-1 are 16-30 bit outliers. Afterwards channel c
  of y has std s_c (log-spaced 0.3..8) about its mean, mu = that mean +-
  s_c / 4 and sigma = s_c +- 20 % (both varying in space), z has std 2
  about fractional medians: about 0.2 bpp on natural photos.
  """
  p = jax.tree.map(np.array, jax.device_get(params))
  cf = p["context_fn"]
  variables = {"params": p}
  x = jnp.asarray(metrics.to_float(img))[None]
  axes = (0, 1, 2)

  def run(method, v):
    return np.asarray(model.apply(variables, v, method=method))

  last_enc = cf[max(k for k in cf if k.startswith("enc_3_") and k != "enc_3_0")]
  y = run(CDC.g_a, x)
  target = np.geomspace(0.3, 8.0, y.shape[-1])
  gain = target / (y.std(axis=axes) + 1e-6)
  last_enc["conv"]["kernel"] *= gain
  last_enc["conv"]["bias"] *= gain
  y = run(CDC.g_a, x)
  y_mean = y.mean(axis=axes)

  z = run(CDC.h_a, y)
  gain = 2.0 / (z.std(axis=axes) + 1e-6)
  cf["hyper_enc_2_0"]["kernel"] *= gain
  cf["hyper_enc_2_0"]["bias"] *= gain
  z = run(CDC.h_a, y)
  med = np.median(z, axis=axes).astype(np.float32)
  cf["prior"]["medians"][:] = med

  last = cf["hyper_dec_2_0"]
  c = y.shape[-1]
  last["bias"][c:] = 1e4  # keep the raw scale above the 0.1 clamp
  mu, s = model.apply(variables, np.round(z - med) + med, method=CDC.h_s)
  mu, s = np.asarray(mu), np.asarray(s) - 1e4
  g_mu = 0.25 * target / (mu.std(axis=axes) + 1e-6)
  g_s = 0.2 * target / (s.std(axis=axes) + 1e-6)
  last["kernel"] *= np.concatenate([g_mu, g_s])
  last["bias"][:c] = y_mean - g_mu * mu.mean(axis=axes)
  last["bias"][c:] = target - g_s * s.mean(axis=axes)
  return p


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  calib = _photo(256, 384, 0, 0, name="chelsea")
  dirs = {}
  for family, (model_cfg, diff_cfg) in MODEL_CONFIGS.items():
    model = _model(family)
    params = model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 1))
    )["params"]
    params = _realistic_entropy_model(model, params, calib)
    tables = codec.build_entropy_tables(model, params)
    dirs[family] = str(root / family)
    checkpoint.export_model(dirs[family], model_cfg, diff_cfg, params, tables)
    if family == "eps":
      # Same architecture, other weights: another fingerprint.
      leaves, treedef = jax.tree.flatten(params)
      leaves[-1] = leaves[-1] + 0.5
      other = jax.tree.unflatten(treedef, leaves)
      dirs["other"] = str(root / "other")
      checkpoint.export_model(dirs["other"], model_cfg, diff_cfg, other, tables)
  return dirs


@pytest.fixture(scope="module")
def eps_cm(model_dirs):
  return codec.load(model_dirs["eps"])


@pytest.fixture(scope="module")
def x_cm(model_dirs):
  return codec.load(model_dirs["x"])


def _encoder_side(cm, img):
  """The encoder's symbols and y_hat, recomputed the way compress does."""
  x = jnp.asarray(metrics.to_float(codec.pad_image(img)))[None]
  y, z_sym = cm._analyze(cm.params, x)
  mu, sigma = cm._hyper(cm.params, z_sym)
  y, mu, sigma = (np.asarray(a) for a in (y, mu, sigma))
  y_sym = np.rint(y - mu).astype(np.int32)
  return {
    "x": x,
    "z_sym": np.asarray(z_sym),
    "y_sym": y_sym,
    "sigma": sigma,
    "y_hat": y_sym.astype(np.float32) + mu,
  }


def _temp_leftovers(directory):
  return [
    n for n in os.listdir(directory) if n.startswith(".tmp-") or ".part" in n
  ]


# -- exactness of the entropy path ---------------------------------------------


@pytest.mark.parametrize("family", ["eps", "x"])
def test_decoder_reproduces_encoder_latents(family, eps_cm, x_cm, monkeypatch):
  cm = {"eps": eps_cm, "x": x_cm}[family]
  img = _photo(97, 130, 200, 150)  # padded to 128 x 192
  res = codec.compress_image(cm, img, steps=1)
  enc = _encoder_side(cm, img)
  assert np.any(enc["z_sym"] != 0) and np.any(enc["y_sym"] != 0)

  seen = []
  hyper = cm._hyper

  def spy(p, z_sym):
    seen.append(np.asarray(z_sym))
    return hyper(p, z_sym)

  monkeypatch.setattr(cm, "_hyper", spy)
  header, stream = codec._parse(cm, res.data)
  y_hat = np.asarray(codec._entropy_decode(cm, header, stream))
  monkeypatch.undo()

  # The decoder's z symbols, and y_hat = y_sym + mu, bit for bit.
  assert len(seen) == 1
  np.testing.assert_array_equal(seen[0], enc["z_sym"])
  assert y_hat.dtype == np.float32
  np.testing.assert_array_equal(y_hat, enc["y_hat"])

  # The model's own eval-mode forward on the padded image: its rounded
  # latents are exactly what the decoder reconstructs.
  fwd = jax.jit(functools.partial(cm.model.apply, method=CDC.compress_context))
  ctx = fwd({"params": cm.params}, enc["x"])
  med = np.asarray(cm.params["context_fn"]["prior"]["medians"], np.float32)
  np.testing.assert_array_equal(
    np.asarray(ctx["q_hyper_latent"]), seen[0].astype(np.float32) + med
  )
  np.testing.assert_array_equal(np.asarray(ctx["q_latent"]), y_hat)
  # ... and its bpp (over the padded size) is the codec's float estimate.
  hp, wp = codec.padded_size(97, 130)
  assert res.estimated_bits == pytest.approx(
    float(ctx["bpp"][0]) * hp * wp, rel=1e-5
  )


def test_file_size_matches_estimates(eps_cm):
  cm = eps_cm
  img = _photo(256, 256, 0, 128)
  res = codec.compress_image(cm, img, steps=STEPS)
  enc = _encoder_side(cm, img)
  z_sym, y_sym = enc["z_sym"], enc["y_sym"]
  assert y_sym.size >= 4000  # thousands of y symbols
  z_bits = bitstream.estimate_bits(
    z_sym, bitstream.channel_indexes(z_sym.shape), cm.z_tables
  )
  y_bits = bitstream.estimate_bits(
    y_sym, bitstream.scale_indexes(enc["sigma"], cm.scale_table), cm.y_tables
  )
  int_bits = z_bits + y_bits
  _, streams = bitstream.unpack(res.data)
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
  assert 0.05 < res.bpp < 2.0  # a realistic rate, not all-zero symbols
  assert payload_bits >= int_bits
  assert overhead < 0.01
  # The float estimate counts the same symbols; the integer tables differ
  # by the scale-table rounding and the 1/2**16 count floor of outliers.
  assert abs(int_bits / res.estimated_bits - 1) < 0.1


# -- determinism ---------------------------------------------------------------


def test_compress_and_decompress_are_deterministic(eps_cm, tmp_path):
  img = _photo(64, 128, 100, 200)
  a = codec.compress(eps_cm, img, steps=STEPS, seed=7)
  b = codec.compress(eps_cm, img.copy(), steps=STEPS, seed=7)
  assert a == b
  src = tmp_path / "a.cdcj"
  src.write_bytes(a)
  out1 = codec.decompress_file(eps_cm, str(src), str(tmp_path / "1.png"))
  out2 = codec.decompress_file(eps_cm, str(src), str(tmp_path / "2.png"))
  assert (tmp_path / "1.png").read_bytes() == (tmp_path / "2.png").read_bytes()
  np.testing.assert_array_equal(out1, out2)
  with Image.open(tmp_path / "1.png") as png:
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), out1)
  assert _temp_leftovers(tmp_path) == []


@pytest.fixture(scope="module", params=["eps", "x"])
def batch_and_alone(request, eps_cm, x_cm):
  """decompress_many on 4 files (3 of one size) and each file alone."""
  cm = {"eps": eps_cm, "x": x_cm}[request.param]
  steps = STEPS if request.param == "eps" else 1
  blobs = [
    codec.compress(cm, _photo(64, 128, 64 * i, 100), steps=steps, seed=i)
    for i in range(3)
  ]
  # A file of another size in the middle: a group of its own, order kept.
  blobs.insert(1, codec.compress(cm, _photo(50, 60), steps=steps))
  batch = codec.decompress_many(cm, blobs)
  alone = [codec.decompress(cm, b) for b in blobs]
  return batch, alone


def test_decompress_many_matches_one_at_a_time(batch_and_alone):
  batch, alone = batch_and_alone
  shapes = [(64, 128, 3), (50, 60, 3), (64, 128, 3), (64, 128, 3)]
  assert [a.shape for a in batch] == [a.shape for a in alone] == shapes
  assert not np.array_equal(batch[0], batch[2])  # other seeds and crops
  for i, (got, want) in enumerate(zip(batch, alone, strict=True)):
    # Not bit-exact on XLA:CPU (see the next test): the batched decode's
    # floats differ by ~1e-6 relative, which flips a few uint8 values.
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and np.mean(diff != 0) < 1e-3, f"file {i}"


@pytest.mark.xfail(
  strict=False,
  reason="XLA:CPU convolutions/matmuls round differently for batch 3 than "
  "for batch 1 (~1e-6 relative in the decoded floats), so a few uint8 "
  "values of a batched decode differ by one level from decoding alone",
)
def test_decompress_many_is_bit_exact(batch_and_alone):
  batch, alone = batch_and_alone
  for i, (got, want) in enumerate(zip(batch, alone, strict=True)):
    np.testing.assert_array_equal(got, want, err_msg=f"file {i}")


# -- sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
  "family,h,w",
  [("eps", 1, 1), ("eps", 63, 65), ("eps", 97, 130), ("x", 63, 65)],
)
def test_odd_sizes_round_trip(family, h, w, eps_cm, x_cm):
  cm = {"eps": eps_cm, "x": x_cm}[family]
  img = _photo(h, w, 300, 250)
  blob = codec.compress(cm, img, steps=STEPS if family == "eps" else 1)
  header, _ = bitstream.unpack(blob)
  assert (header.height, header.width) == (h, w)
  out = codec.decompress(cm, blob)
  assert out.shape == (h, w, 3) and out.dtype == np.uint8


# -- CLI -----------------------------------------------------------------------


def _cli(capsys, *argv):
  rc = codec.main([str(a) for a in argv])
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


def test_cli_compress_and_decompress(model_dirs, eps_cm, tmp_path, capsys):
  h, w = 50, 60
  src = tmp_path / "in.png"
  Image.fromarray(_photo(h, w)).save(src)
  cdcj = tmp_path / "in.cdcj"
  rc, out, err = _cli(
    capsys,
    "compress",
    "--model",
    model_dirs["eps"],
    src,
    cdcj,
    "--steps",
    STEPS,
    "--seed",
    3,
  )
  assert rc == 0, err
  m = re.search(r"([\d.]+) bpp \(model estimate ([\d.]+) bpp\)", out)
  assert m, out
  size = os.path.getsize(cdcj)
  assert float(m.group(1)) == round(size * 8 / (h * w), 4)
  assert float(m.group(2)) > 0
  header, _ = bitstream.unpack(cdcj.read_bytes())
  assert (header.steps, header.seed, header.height) == (STEPS, 3, h)

  png = tmp_path / "out.png"
  rc, out, err = _cli(
    capsys, "decompress", "--model", model_dirs["eps"], cdcj, png
  )
  assert rc == 0, err
  assert f"{h}x{w}" in out
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size == (w, h) and im.mode == "RGB"
  assert _temp_leftovers(tmp_path) == []


def _with_crc(blob: bytes) -> bytes:
  body = blob[:-4]
  return body + struct.pack("<I", zlib.crc32(body))


def _patch(blob: bytes, offset: int, fmt: str, value, fix_crc=True) -> bytes:
  b = bytearray(blob)
  struct.pack_into(fmt, b, offset, value)
  return _with_crc(bytes(b)) if fix_crc else bytes(b)


@pytest.fixture(scope="module")
def small_file(eps_cm):
  """A valid 50x60 eps file (padded to 64x64), S = STEPS."""
  return codec.compress(eps_cm, _photo(50, 60), steps=STEPS, seed=1)


def _bad_input(kind, tmp, blob, dirs):
  """(command, input path, model dir, the file the message must name)."""
  m = dirs["eps"]
  p = tmp / "input"
  if kind == "not_an_image":
    p = tmp / "notes.png"
    p.write_text("just some text\n")
  elif kind == "empty_image":
    p = tmp / "empty.png"
    p.write_bytes(b"")
  elif kind == "truncated_image":
    p = tmp / "cut.png"
    Image.fromarray(_photo(50, 60)).save(p)
    p.write_bytes(p.read_bytes()[:200])
  elif kind in ("missing_image", "missing_cdcj"):
    p = tmp / "nowhere" / "gone.png"
  elif kind in ("directory_image", "directory_cdcj"):
    p = tmp / "a_dir.png"
    p.mkdir()
  elif kind == "truncated":
    p.write_bytes(blob[: len(blob) // 2])
  elif kind == "empty_cdcj":
    p.write_bytes(b"")
  elif kind == "flipped":
    b = bytearray(blob)
    b[len(b) // 2] ^= 0x10
    p.write_bytes(bytes(b))
  elif kind == "wrong_magic":
    p.write_bytes(b"PNG!" + blob[4:])
  elif kind == "newer_version":
    p.write_bytes(_patch(blob, OFF_VERSION, "<B", bitstream.FORMAT_VERSION + 1))
  elif kind == "newer_version_bad_crc":  # the version is checked first
    p.write_bytes(
      _patch(blob, OFF_VERSION, "<B", bitstream.FORMAT_VERSION + 1, False)
    )
  elif kind == "other_model":
    p.write_bytes(blob)
    m = dirs["other"]
  elif kind == "missing_model":
    p.write_bytes(blob)
    m = str(tmp / "no_such_model")
  elif kind == "not_a_model":
    p.write_bytes(blob)
    m = str(tmp / "empty_model")
    os.mkdir(m)
  elif kind == "tampered_model":
    p.write_bytes(blob)
    m = str(tmp / "tampered")
    shutil.copytree(dirs["eps"], m)
    meta_path = os.path.join(m, "model.json")
    with open(meta_path) as f:
      meta = f.read()
    with open(meta_path, "w") as f:
      f.write(re.sub(r'"fingerprint": "\w', '"fingerprint": "x', meta))
  else:
    raise AssertionError(kind)
  cmd = "compress" if "image" in kind else "decompress"
  named = m if "model" in kind and kind != "other_model" else str(p)
  return cmd, str(p), m, named


ERROR_CASES = {
  # kind: a phrase of the expected message
  "not_an_image": "not a recognised image",
  "empty_image": "empty",
  "truncated_image": "cannot decode",
  "missing_image": "not found",
  "directory_image": "not a regular file",
  "missing_cdcj": "cannot read",
  "directory_cdcj": "cannot read",
  "empty_cdcj": "truncated",
  "truncated": "truncated",
  "flipped": "checksum",
  "wrong_magic": "magic",
  "newer_version": "newer",
  "newer_version_bad_crc": "newer",
  "other_model": "another model",
  "missing_model": "does not exist",
  "not_a_model": "neither a model directory",
  "tampered_model": "fingerprint",
}


@pytest.mark.parametrize("kind", list(ERROR_CASES))
def test_cli_rejects_bad_input(kind, small_file, model_dirs, tmp_path, capsys):
  cmd, src, model, named = _bad_input(kind, tmp_path, small_file, model_dirs)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  dst = out_dir / ("x.cdcj" if cmd == "compress" else "x.png")
  for existing in (None, b"keep me"):
    if existing is not None:
      dst.write_bytes(existing)
    rc, out, err = _cli(capsys, cmd, "--model", model, src, dst)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and named in lines[0], err
    assert ERROR_CASES[kind] in lines[0], err
    if existing is None:
      assert not dst.exists()
    else:
      assert dst.read_bytes() == existing
    assert _temp_leftovers(out_dir) == []


@pytest.mark.parametrize("where", ["missing_directory", "is_a_directory"])
def test_cli_rejects_unwritable_output(where, model_dirs, tmp_path, capsys):
  src = tmp_path / "in.png"
  Image.fromarray(_photo(50, 60)).save(src)
  if where == "missing_directory":
    dst = tmp_path / "no_dir" / "x.cdcj"
  else:
    dst = tmp_path / "taken.cdcj"
    dst.mkdir()
  rc, _, err = _cli(capsys, "compress", "--model", model_dirs["eps"], src, dst)
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert str(dst) in err, err
  assert dst.is_dir() if where == "is_a_directory" else not dst.parent.exists()
  assert _temp_leftovers(tmp_path) == []


# -- fuzzing -------------------------------------------------------------------


def _mutations(blob: bytes, n: int, seed: int = 0):
  """n (description, bytes): most break the CRC; some fix it up so the
  header and the range-coded data reach the decoder. Shapes are kept
  (height, width <= 64, steps 0..2) so that nothing compiles anew."""
  rng = random.Random(seed)
  n_streams = blob[OFF_NSTREAMS]
  stream_at = OFF_LENGTHS + 4 * n_streams
  stream_end = len(blob) - 4

  def rand_bytes(k):
    return bytes(rng.getrandbits(8) for _ in range(k))

  def header_edit():
    field = rng.choice(
      [
        "seed",
        "gamma",
        "steps",
        "height",
        "width",
        "family",
        "sampler",
        "flags",
        "nstreams",
        "length",
        "total",
        "fingerprint",
        "version",
      ]
    )
    if field == "seed":
      return _patch(blob, OFF_SEED, "<Q", rng.getrandbits(64))
    if field == "gamma":
      g = rng.choice(
        [0.0, -0.0, 1.0, -3.5, 1e-40, 1e30, float("inf"), float("nan")]
      )
      return _patch(blob, OFF_GAMMA, "<f", g)
    if field == "steps":
      return _patch(blob, OFF_STEPS, "<H", rng.choice([0, 1, 2]))
    if field in ("height", "width"):
      off = OFF_H if field == "height" else OFF_W
      return _patch(blob, off, "<I", rng.randint(0, 64))
    if field in ("family", "sampler", "flags", "nstreams", "version"):
      off = {
        "family": OFF_FAMILY,
        "sampler": OFF_SAMPLER,
        "flags": OFF_FLAGS,
        "nstreams": OFF_NSTREAMS,
        "version": OFF_VERSION,
      }[field]
      return _patch(blob, off, "<B", rng.choice([0, 1, 2, 255]))
    if field == "length":
      n = len(blob) - stream_at - 4 + rng.randint(-8, 8)
      return _patch(blob, OFF_LENGTHS, "<I", max(n, 0))
    if field == "total":
      return _patch(blob, OFF_TOTAL, "<I", rng.getrandbits(32))
    b = bytearray(blob)
    b[OFF_FP + rng.randrange(16)] ^= 1 << rng.randrange(8)
    return _with_crc(bytes(b))

  def payload_edit():
    b = bytearray(blob)
    if rng.random() < 0.7:  # flips and random runs inside the stream
      for _ in range(rng.randint(1, 6)):
        b[rng.randrange(stream_at, stream_end)] ^= 1 << rng.randrange(8)
      if rng.random() < 0.5:
        k = rng.randint(1, 16)
        at = rng.randrange(stream_at, stream_end - k)
        b[at : at + k] = rand_bytes(k)
      return _with_crc(bytes(b))
    # Shorten or lengthen the stream by whole words, consistently.
    cut = 4 * rng.randint(-4, (stream_end - stream_at) // 4)
    body = bytes(b[:stream_at]) + (
      bytes(b[stream_at : stream_end - cut])
      if cut >= 0
      else bytes(b[stream_at:stream_end]) + rand_bytes(-cut)
    )
    b = bytearray(body + b"\0\0\0\0")
    struct.pack_into("<I", b, OFF_TOTAL, len(b))
    struct.pack_into("<I", b, OFF_LENGTHS, len(b) - stream_at - 4)
    return _with_crc(bytes(b))

  def crc_breaking():
    kind = rng.choice(["flip", "truncate", "insert", "random", "overwrite"])
    b = bytearray(blob)
    if kind == "flip":
      for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
      del b[rng.randrange(len(b)) :]
    elif kind == "insert":
      at = rng.randrange(len(b) + 1)
      b[at:at] = rand_bytes(rng.randint(1, 12))
    elif kind == "random":
      prefix = blob[: rng.choice([0, 4, 5, 51])]
      b = bytearray(prefix + rand_bytes(rng.randint(0, 200)))
    else:
      k = rng.randint(1, 32)
      at = rng.randrange(len(b))
      b[at : at + k] = rand_bytes(k)
    return kind, bytes(b)

  for i in range(n):
    r = rng.random()
    if r < 0.25:
      yield f"#{i} header edit", header_edit()
    elif r < 0.45:
      yield f"#{i} payload edit", payload_edit()
    else:
      kind, b = crc_breaking()
      yield f"#{i} {kind}", b


def test_fuzz_decompress_returns_image_or_codec_error(eps_cm, small_file):
  outcomes = {"image": 0, "error": 0}
  start = time.monotonic()
  for desc, blob in _mutations(small_file, 300):
    try:
      img = codec.decompress(eps_cm, blob)
    except codec.CodecError as e:
      assert str(e) and "\n" not in str(e), desc
      outcomes["error"] += 1
    except Exception as e:
      raise AssertionError(f"{desc}: {type(e).__name__}: {e}") from e
    else:
      hdr = bitstream.unpack(blob)[0]
      assert img.dtype == np.uint8, desc
      assert img.shape == (hdr.height, hdr.width, 3), desc
      outcomes["image"] += 1
  elapsed = time.monotonic() - start
  print(f"\nfuzz: {outcomes} in {elapsed:.1f} s")
  assert elapsed < 60
  # Both paths were exercised: corrupted data decoded, malformed rejected.
  assert outcomes["image"] >= 30 and outcomes["error"] >= 150
