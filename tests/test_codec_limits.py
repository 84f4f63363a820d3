"""Tests of cdc_jax.codec.limits and the decode progress callback.

Hostile but valid files (CRC re-sealed, built with ``container.pack``):
huge step counts, huge sizes, extreme gammas. Each must be refused by its
limit with the documented one-line message *before* any decoding: the
model handed to ``decompress`` is a copy whose hyper-decoder (the first
device work, right after the host reads z) and sampler raise
AssertionError, so a limit that let a file through shows up as that
error, never as minutes of decoding or an out-of-memory crash.
"""

import copy
import dataclasses
import math
import re
import struct
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import codec, sample, testing
from cdc_jax.codec import cli, decompress_many, memory
from cdc_jax.coding import container

STEPS = 2
T = testing.DIFFUSIONS["eps"]["timesteps"]  # 20000


@pytest.fixture(scope="module")
def small_file(cm):
  """A valid 50x60 eps file (padded to 64x64), S = STEPS."""
  img = testing.photo("astronaut", (50, 60))
  return codec.compress(cm, img, steps=STEPS, seed=1)


class _Forbidden:
  """Stands in for the model's decoding functions: any call fails."""

  def __init__(self, what: str):
    self.what = what

  def __call__(self, *args, **kw):
    raise AssertionError(f"{self.what} was called")

  def __getattr__(self, name):
    return self


@pytest.fixture(scope="module")
def guarded(cm):
  """``cm`` whose decoding (hyper-decoder, sampler) must never run."""
  g = copy.copy(cm)
  g.hyper = _Forbidden("the hyper-decoder")
  g.sampler = _Forbidden("the sampler")
  return g


def _passes_limits(guarded_cm, blob, many=False, **kw) -> bool:
  """True if ``blob`` got past every limit (decoding was about to start);
  a limit's CodecError propagates."""
  try:
    if many:
      decompress_many(guarded_cm, [blob], **kw)
    else:
      codec.decompress(guarded_cm, blob, **kw)
  except AssertionError as e:
    assert "was called" in str(e)
    return True
  raise AssertionError("decompress returned without decoding")


def _craft(blob: bytes, **fields) -> bytes:
  """``blob`` with header fields replaced, CRC re-sealed."""
  header, streams = container.unpack(blob)
  return container.pack(dataclasses.replace(header, **fields), streams)


def _with_raw_gamma(blob: bytes, gamma: float) -> bytes:
  """A gamma ``Header`` refuses (NaN, inf), written into the bytes."""
  old = struct.pack("<f", container.unpack(blob)[0].gamma)
  header_size = len(blob) - len(container.unpack(blob)[1][0]) - 4
  at = blob.find(old)
  assert 0 < at < header_size and blob.count(old, 0, header_size) == 1
  b = bytearray(blob)
  struct.pack_into("<f", b, at, gamma)
  body = bytes(b[:-4])
  return body + struct.pack("<I", zlib.crc32(body))


def _zero_residual_file(cm, h: int, w: int) -> bytes:
  """A valid h x w file: z and y symbols all 0 (y_hat = mu)."""
  f = cm.downsampling_factor
  shapes = cm.model.latent_shapes(1, *codec.padded_size(h, w, f))
  z = np.zeros(shapes["z"], np.int32)
  _, sigma = cm.hyper(cm.params, jnp.asarray(z))
  idx = cm.y_indexes(z, sigma, container.FORMAT_VERSION)
  latents = codec.Latents(z, np.zeros(shapes["y"], np.int32), idx, 0.0)
  header = container.Header(
    fingerprint=cm.fingerprint, height=h, width=w, steps=STEPS, gamma=0.8
  )
  return container.pack(header, [codec.entropy_encode(cm, latents)])


@pytest.fixture(scope="module")
def huge_file(cm):
  """A valid 8192x8192 file (the issue's 288 KB bomb)."""
  return _zero_residual_file(cm, 8192, 8192)


# -- crafted files -------------------------------------------------------------


def test_huge_file_is_valid(cm, huge_file):
  header, stream = container.unpack(huge_file)
  assert (header.height, header.width) == (8192, 8192)
  assert len(huge_file) < 2_000_000
  # Its stream decodes: the decoder's latents are mu, the residuals zero.
  y_hat = codec.decode_latents(cm, header, stream[0])
  assert y_hat.shape == (1, 512, 512, 16) and np.all(np.isfinite(y_hat))


PIXELS = "is over the limit of 40,000,000 pixels (raise it with --max-pixels"
HOSTILE = {
  # name: (header fields, decompress keywords, a phrase of the message)
  "steps_65535": (
    {"steps": 65535},
    {},
    "65535 decode steps, more than the model's 20000 diffusion steps",
  ),
  "steps_5000": (
    {"steps": 5000},
    {},
    "the header asks for 5000 decode steps, over the limit of 1000 (raise "
    "it with --max-steps, or max_steps= in the API)",
  ),
  "steps_1001": ({"steps": 1001}, {}, "1001 decode steps, over the limit"),
  "steps_over_T": (
    {"steps": T + 1},
    {"max_steps": 65535},
    f"{T + 1} decode steps, more than the model's {T} diffusion steps",
  ),
  "size_8192": (
    {"height": 8192, "width": 8192},
    {},
    f"8192x8192 (67,108,864 pixels) {PIXELS}",
  ),
  "pixels_2_28": (
    {"height": 16384, "width": 16384},
    {},
    f"16384x16384 (268,435,456 pixels) {PIXELS}",
  ),
  "over_format_cap": (
    {"height": 16385, "width": 16384},
    {"max_pixels": 2**30},
    "exceeds the codec's limit (32768 per side, 268435456 pixels)",
  ),
  "gamma_3.4e38": ({"gamma": 3.4e38}, {}, "gamma 3.4e+38 is outside [0, 4]"),
  "gamma_-1": ({"gamma": -1.0}, {}, "gamma -1 is outside [0, 4]"),
  "gamma_5": ({"gamma": 5.0}, {}, "gamma 5 is outside [0, 4]"),
}


@pytest.mark.parametrize("many", [False, True], ids=["one", "many"])
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_header_is_refused(kind, many, guarded, small_file):
  fields, kw, phrase = HOSTILE[kind]
  blob = _craft(small_file, **fields)
  with pytest.raises(codec.CodecError) as err:
    _passes_limits(guarded, blob, many=many, **kw)
  msg = str(err.value)
  assert phrase in msg and "\n" not in msg, msg


def test_huge_valid_file_is_refused_before_decoding(guarded, huge_file):
  with pytest.raises(codec.CodecError, match=re.escape(PIXELS)):
    codec.decompress(guarded, huge_file)
  # Allowed by --max-pixels, the memory estimate still refuses a small
  # budget, and names its estimate.
  need = memory.decode_memory(guarded.model, 8192, 8192)
  with pytest.raises(codec.CodecError) as err:
    codec.decompress(guarded, huge_file, max_pixels=2**28, max_memory=1e9)
  msg = str(err.value)
  assert f"decoding 8192x8192 whole needs about {memory.fmt_bytes(need)}" in (
    msg
  )
  assert "x 67,108,864 padded pixels), more than the budget (1.0 GB; " in msg
  assert "set the budget with --max-memory, or max_memory= in the API" in msg
  # ... and a budget that holds the estimate lets it through.
  assert _passes_limits(
    guarded, huge_file, max_pixels=2**28, max_memory=need + 1
  )
  # The pixel limit is inclusive.
  kw = {"max_memory": math.inf}
  assert _passes_limits(guarded, huge_file, max_pixels=8192**2, **kw)
  with pytest.raises(codec.CodecError, match="limit of 67,108,863 pixels"):
    codec.decompress(guarded, huge_file, max_pixels=8192**2 - 1, **kw)


@pytest.mark.parametrize("gamma", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gamma_is_refused(gamma, guarded, small_file):
  blob = _with_raw_gamma(small_file, gamma)
  with pytest.raises(codec.CodecError, match="invalid header: gamma"):
    codec.decompress(guarded, blob)


@pytest.mark.parametrize(
  "fields,kw",
  [
    ({"steps": 1000}, {}),
    ({"steps": T}, {"max_steps": T}),
    ({"steps": 1001}, {"max_steps": 1001}),
    ({"gamma": 0.0}, {}),
    ({"gamma": 4.0}, {}),
  ],
)
def test_headers_within_the_limits_pass(fields, kw, guarded, small_file):
  kw.setdefault("max_memory", math.inf)
  assert _passes_limits(guarded, _craft(small_file, **fields), **kw)


def test_default_memory_budget_is_the_machine_memory(guarded, small_file):
  avail = memory.machine_memory()
  assert avail is not None and 0 < avail < 2**50
  # A stable quantity: the physical memory (or a cgroup limit), not what
  # is free now; the same on every call.
  with open("/proc/meminfo") as f:
    total = int(f.read().split("MemTotal:")[1].split()[0]) * 1024
  assert avail <= total and memory.machine_memory() == avail
  assert _passes_limits(guarded, small_file)  # a 50x60 decode fits
  blob = _craft(small_file, height=16384, width=16384)
  need = memory.decode_memory(guarded.model, 16384, 16384)
  assert need > 16384**2 * 100  # the tiny model: >= 100 bytes per pixel
  if need > avail:  # this machine: refused, naming the machine's memory
    with pytest.raises(codec.CodecError, match="than the machine's memory"):
      codec.decompress(guarded, blob, max_pixels=2**28)
  else:  # a machine with more: the estimate fits
    lim = codec.Limits(max_pixels=2**28)
    assert memory.images_per_batch(guarded.model, 16384, 16384, 1, lim) == 1


def test_decompress_many_checks_every_file_first(guarded, small_file):
  bad = _craft(small_file, steps=5000)
  with pytest.raises(codec.CodecError, match="5000 decode steps"):
    decompress_many(guarded, [small_file, small_file, bad])


# -- the encoder ---------------------------------------------------------------


@pytest.mark.parametrize(
  "kw,phrase",
  [
    ({"steps": 1001}, "--steps 1001 is over the decode-step limit of 1000"),
    ({"steps": T + 1, "max_steps": 65535}, f"model's {T} diffusion steps"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"gamma": 5.0}, "--gamma must be in [0, 4], got 5.0"),
    ({"gamma": -0.5}, "--gamma must be in [0, 4]"),
    ({"gamma": float("nan")}, "--gamma must be in [0, 4]"),
    ({"max_pixels": 2999}, "50x60 (3,000 pixels) is over the limit of 2,999"),
    ({"max_steps": 0}, "max_steps must be a positive integer"),
  ],
)
def test_compress_refuses_settings_outside_the_limits(kw, phrase, cm):
  img = testing.photo("astronaut", (60, 50))
  with pytest.raises(codec.CodecError, match=re.escape(phrase)):
    codec.compress(cm, img, **kw)


def test_compress_with_raised_limits_writes_what_decompress_allows(cm):
  img = testing.photo("astronaut", (60, 50))
  blob = codec.compress(cm, img, steps=1001, max_steps=1001)
  assert container.unpack(blob)[0].steps == 1001
  with pytest.raises(codec.CodecError, match="1001 decode steps"):
    codec.parse(cm, blob)
  assert codec.parse(cm, blob, codec.Limits(max_steps=1001))[0].steps == 1001


# -- the memory estimate and sizes --------------------------------------------


def test_decode_memory_scales_with_pixels_batch_and_dtype(cm):
  m = cm.model
  one = memory.decode_memory(m, 512, 512)
  four = memory.decode_memory(m, 1024, 1024)
  assert four - memory.FIXED == pytest.approx(4 * (one - memory.FIXED))
  assert memory.decode_memory(m, 512, 512, batch=3) - memory.FIXED == (
    pytest.approx(3 * (one - memory.FIXED))
  )
  # Padded to the model's factor (64): 500 px sides cost as 512.
  assert memory.decode_memory(m, 500, 449) == one
  half = m.clone(dtype="bfloat16")
  assert memory.bytes_per_pixel(half) == memory.bytes_per_pixel(m) / 2
  wide = m.clone(dim=64)
  assert memory.bytes_per_pixel(wide) > 4 * memory.bytes_per_pixel(m)


@pytest.mark.parametrize(
  "text,value",
  [
    ("16G", 16e9),
    ("800M", 800e6),
    ("12GiB", 12 * 2**30),
    ("1.5gb", 1.5e9),
    ("1e9", 1e9),
    ("inf", math.inf),
  ],
)
def test_parse_size(text, value):
  assert memory.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12X", "-1G", "0", "G"])
def test_parse_size_refuses_nonsense(text):
  with pytest.raises(ValueError, match="size"):
    memory.parse_size(text)


# -- decompress_many batches within the budget ---------------------------------


class _CountingSampler:
  """Wraps the model's sampler; records the batch size of each decode."""

  def __init__(self, sampler):
    self.sampler, self.batches = sampler, []

  def decode_latent(self, params, y_hat, x_init, steps, progress=None, **kw):
    self.batches.append(x_init.shape[0])
    return self.sampler.decode_latent(
      params, y_hat, x_init, steps, progress, **kw
    )


def test_decompress_many_splits_batches_to_fit_the_budget(cm, small_file):
  crops = [testing.photo("astronaut", (50, 60), 64 * i, 0) for i in (1, 2)]
  blobs = [small_file] + [
    codec.compress(cm, im, steps=STEPS, seed=i) for i, im in enumerate(crops)
  ]
  counting = copy.copy(cm)
  counting.sampler = _CountingSampler(cm.sampler)
  each = memory.decode_memory(cm.model, 50, 60) - memory.FIXED
  budget = memory.FIXED + 2.5 * each  # two images per batch fit, not three
  calls = []
  out = decompress_many(
    counting,
    blobs,
    max_memory=budget,
    progress=lambda d, t: calls.append((d, t)),
  )
  assert counting.sampler.batches == [2, 1]
  # Two batches of STEPS steps, counted as one run; each reports its end.
  done = [d for d, _ in calls]
  assert done == sorted(set(done)) and STEPS in done
  assert calls[-1] == (2 * STEPS, 2 * STEPS)
  assert {t for _, t in calls} == {2 * STEPS}
  alone = [codec.decompress(cm, b) for b in blobs]
  for got, want in zip(out, alone, strict=True):
    assert got.shape == want.shape == (50, 60, 3)
    diff = np.abs(got.astype(int) - want.astype(int))  # see decompress_many
    assert diff.max() <= 1 and np.mean(diff != 0) < 1e-3


# -- progress ------------------------------------------------------------------


def test_progress_gives_identical_pixels_without_a_new_compile(cm, small_file):
  plain = codec.decompress(cm, small_file)  # compiles (once per shape, S)
  with testing.recorded_events(testing.LOWERED) as lowered:
    calls = []
    with_cb = codec.decompress(
      cm, small_file, progress=lambda d, t: calls.append((d, t))
    )
    again = codec.decompress(cm, small_file)
  # Windows of steps (one while untimed); the last report ends the decode.
  done = [d for d, _ in calls]
  assert done == sorted(set(done)) and calls[-1] == (STEPS, STEPS)
  assert lowered == []  # nothing traced or compiled anew
  np.testing.assert_array_equal(with_cb, plain)
  np.testing.assert_array_equal(again, plain)


def test_progress_every_step_gives_identical_pixels(
  cm, small_file, monkeypatch
):
  # Windows of one step each (a report per step, as for a slow model): the
  # same compiled loop, run five times from the host.
  blob = _craft(small_file, steps=5)
  whole = codec.decompress(cm, blob)
  monkeypatch.setattr(sample, "REPORT_EVERY_S", 0.0)
  calls = []
  stepwise = codec.decompress(
    cm, blob, progress=lambda d, t: calls.append((d, t))
  )
  assert calls == [(d, 5) for d in range(1, 6)]
  np.testing.assert_array_equal(stepwise, whole)


class _Stop(Exception):
  pass


def test_progress_exception_stops_the_decode(cm, small_file, monkeypatch):
  monkeypatch.setattr(sample, "REPORT_EVERY_S", 0.0)  # one-step windows
  calls = []

  def stop(done, total):
    calls.append(done)
    raise _Stop

  with pytest.raises(_Stop):
    codec.decompress(cm, _craft(small_file, steps=5), progress=stop)
  assert calls == [1]  # steps 2..5 never ran


# -- the CLI -------------------------------------------------------------------


def _cli(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


@pytest.mark.parametrize(
  "fields,flags,phrase",
  [
    ({"steps": 5000}, [], "5000 decode steps, over the limit of 1000"),
    ({}, ["--max-steps", 1], "2 decode steps, over the limit of 1"),
    ({"height": 8192, "width": 8192}, [], PIXELS),
    ({}, ["--max-pixels", 2999], "is over the limit of 2,999 pixels"),
    ({"gamma": 3.4e38}, [], "gamma 3.4e+38 is outside [0, 4]"),
    ({}, ["--max-memory", "1M"], "more than the budget (1 MB; set the"),
  ],
)
def test_cli_refuses_with_one_line_naming_the_file(
  fields, flags, phrase, model_path, small_file, tmp_path, capsys
):
  src = tmp_path / "hostile.cdcj"
  src.write_bytes(_craft(small_file, **fields))
  dst = tmp_path / "out.png"
  rc, out, err = _cli(
    capsys, "decompress", "--model", model_path, src, dst, *flags
  )
  assert rc == 2 and out == "", (out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {src}: "), err
  assert phrase in lines[0], err
  assert not dst.exists()


def test_cli_flags_raise_the_limits(model_path, small_file, tmp_path, capsys):
  src = tmp_path / "a.cdcj"
  src.write_bytes(small_file)
  png = tmp_path / "a.png"
  argv = ["decompress", "--model", model_path, src, png]
  rc, out, err = _cli(capsys, *argv, "--max-memory", "inf", "--progress")
  assert rc == 0, err
  assert "60x50" in out  # width x height, as every message writes sizes
  # The bar: steps done of the total, the unit, on stderr.
  assert "decoding" in err and f"{STEPS}/{STEPS}" in err and "step" in err
  rc, out, err = _cli(capsys, *argv, "--max-steps", STEPS, "--no-progress")
  assert rc == 0 and err == "", err
  # compress: --max-steps lets a file ask for more steps.
  img = tmp_path / "in.png"
  from PIL import Image

  Image.fromarray(testing.photo("astronaut", (50, 60))).save(img)
  out_file = tmp_path / "b.cdcj"
  compress = ["compress", "--model", model_path, img, out_file]
  rc, _, err = _cli(capsys, *compress, "--steps", 1500)
  assert rc == 2 and "--max-steps" in err
  rc, _, err = _cli(capsys, *compress, "--steps", 1500, "--max-steps", 1500)
  assert rc == 0, err
  assert container.unpack(out_file.read_bytes())[0].steps == 1500


@pytest.mark.parametrize(
  "flag,value,phrase",
  [
    ("--max-memory", "lots", "not a size: 'lots'"),
    ("--max-steps", "0", "not a positive integer: '0'"),
    ("--max-pixels", "many", "not a positive integer: 'many'"),
  ],
)
def test_cli_rejects_a_bad_limit_flag(
  flag, value, phrase, model_path, small_file, tmp_path, capsys
):
  src = tmp_path / "a.cdcj"
  src.write_bytes(small_file)
  argv = ["decompress", "--model", model_path, src, tmp_path / "x.png"]
  with pytest.raises(SystemExit) as e:
    _cli(capsys, *argv, flag, value)
  assert e.value.code == 2
  assert phrase in capsys.readouterr().err
