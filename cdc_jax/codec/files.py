"""Files: image <-> bytes, and the one decode path.

``compress_image`` encodes one image at a time (a file never depends on
its batch) and records in the header what the decoder runs: size, decode
steps, gamma, seed, sampler and tile layout. ``decompress_many`` decodes
files, those of one padded size, step count, layout and sampler in one
batch within the memory budget; ``decompress`` is its one-file case.
Every header is checked against the model and ``codec.limits`` before
anything is decoded (``parse``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

import cdc_jax.codec.limits as limits
import cdc_jax.codec.memory as memory
import cdc_jax.codec.tiled_analysis as tiled_analysis
import cdc_jax.codec.tiling as tiling
from cdc_jax import samplers
from cdc_jax.codec.errors import CodecError, check_family
from cdc_jax.codec.geometry import pad_image, padded_size
from cdc_jax.codec.latents import decode_latents, encode_latents, entropy_encode
from cdc_jax.codec.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_STEPS, Limits
from cdc_jax.codec.model import CodecModel
from cdc_jax.coding import container
from cdc_jax.coding.errors import BitstreamError
from cdc_jax.imageio import to_float, to_uint8
from cdc_jax.sample import initial_noise

FAMILY_IDS = {"eps": container.FAMILY_EPS, "x": container.FAMILY_X}
DEFAULT_STEPS = {"eps": 200, "x": 65}  # the original test scripts'
DEFAULT_GAMMA = 0.8

# -- files --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compressed:
  """A compressed image: the file bytes and the model's estimate."""

  data: bytes
  estimated_bits: float
  height: int
  width: int
  layout: tiling.Layout | None = None  # the tile layout, None: whole
  analysis_tile: tuple[int, int] | None = None  # the encoder's g_a tiles

  @property
  def bpp(self) -> float:
    """Real bits per pixel: file bytes (header included) x 8 / pixels."""
    return len(self.data) * 8.0 / (self.height * self.width)

  @property
  def estimated_bpp(self) -> float:
    return self.estimated_bits / (self.height * self.width)


def compress_image(
  cm: CodecModel,
  img: np.ndarray,
  steps: int | None = None,
  gamma: float = DEFAULT_GAMMA,
  seed: int = 0,
  max_steps: int = DEFAULT_MAX_STEPS,
  max_pixels: int = DEFAULT_MAX_PIXELS,
  tile=None,
  tile_overlap: int | None = None,
  max_memory: float | None = None,
  sampler: str = samplers.DEFAULT_SAMPLER,
) -> Compressed:
  """uint8 [H, W, 3] -> Compressed (the file bytes and the estimate).

  Steps, gamma and size must be within the decoder's limits
  (``codec.limits``): the file records them, and ``decompress`` with the
  same ``max_steps`` / ``max_pixels`` accepts it. ``tile`` (pixels: N or
  (height, width), multiples of the model's downsampling factor; or
  ``"auto"``: tiles only if a whole-image decode would not fit
  ``max_memory``) and ``tile_overlap`` record a tile layout for a
  bounded-memory decode (``codec.tiling.plan``); None decodes whole.
  ``sampler`` (a ``cdc_jax.samplers.SAMPLERS`` name) is recorded with the
  steps, gamma and seed: the decoder runs what the file says.
  The encoder's g_a runs in tiles (``codec.tiled_analysis``) when the
  file is tiled or a whole-image g_a would not fit ``max_memory``.
  """
  lim = Limits(max_steps, max_pixels, max_memory)  # checked here
  h, w = limits.check_image(img, lim.max_pixels)
  steps = DEFAULT_STEPS[cm.family] if steps is None else steps
  layout = tiling.plan(cm.model, h, w, tile, tile_overlap, lim.max_memory)
  header = container.Header(
    fingerprint=cm.fingerprint,
    height=h,
    width=w,
    family=FAMILY_IDS[cm.family],
    steps=limits.check_steps(steps, cm.schedule.timesteps, lim.max_steps),
    gamma=limits.check_gamma(gamma),
    seed=limits.check_seed(seed),
    sampler=_sampler_id(sampler),
    **(layout.header_fields() if layout else {}),
  )
  at = tiled_analysis.analysis_tile(
    cm.model, h, w, bool(layout), lim.max_memory
  )
  x = to_float(pad_image(img, cm.downsampling_factor))[None]
  latents = encode_latents(cm, x, at)
  blob = container.pack(header, [entropy_encode(cm, latents)])
  return Compressed(blob, latents.estimated_bits, h, w, layout, at)


def compress(cm: CodecModel, img: np.ndarray, **kw) -> bytes:
  """uint8 [H, W, 3] -> file bytes (keywords as ``compress_image``)."""
  return compress_image(cm, img, **kw).data


def decompress(
  cm: CodecModel,
  blob: bytes,
  *,
  max_steps: int = DEFAULT_MAX_STEPS,
  max_pixels: int = DEFAULT_MAX_PIXELS,
  max_memory: float | None = None,
  progress=None,
) -> np.ndarray:
  """File bytes -> uint8 [H, W, 3]: ``decompress_many`` of one file.

  The header must be within the limits (``codec.limits``): decode steps
  <= ``max_steps`` and the model's T, pixels <= ``max_pixels``, gamma in
  [0, 4], a known sampler, a tile layout the model can decode, and the
  estimated memory of the decode (per tile for a tiled file) <=
  ``max_memory`` bytes (None: the machine's memory; ``math.inf``: no
  check); else a CodecError, raised before anything is decoded.
  ``progress(done, total)`` is called on the host as the steps run
  (``cdc_jax.sample``, ``codec.tiling``); an exception it raises stops
  the decode.
  """
  kw = dict(max_steps=max_steps, max_pixels=max_pixels, max_memory=max_memory)
  return decompress_many(cm, [blob], progress=progress, **kw)[0]


def decompress_many(
  cm: CodecModel,
  blobs: Sequence[bytes],
  *,
  max_steps: int = DEFAULT_MAX_STEPS,
  max_pixels: int = DEFAULT_MAX_PIXELS,
  max_memory: float | None = None,
  progress=None,
) -> list:
  """Decodes files (limits and ``progress`` as in ``decompress``). Every
  file is checked before any is decoded; files of one padded size, step
  count, tile layout and sampler share a batch, as many as the memory
  budget allows; progress counts the steps of all batches.

  Faster than one by one on accelerators, but a batch of several files is
  not bit-exact with decoding them one at a time: XLA may round a batch
  differently, so a pixel can differ by one level. One file at a time is
  the reference, reproducible bit for bit on one platform.
  """
  lim = Limits(max_steps, max_pixels, max_memory)
  parsed = [parse(cm, b, lim) for b in blobs]
  groups: dict = {}
  for i, (hdr, _) in enumerate(parsed):
    layout = tiling.Layout.of(hdr)
    key = (noise_shape(cm, hdr), *decode_plan(cm, hdr), layout)
    groups.setdefault(key, []).append(i)
  batches = []
  for members in groups.values():
    hdr = parsed[members[0]][0]
    n = memory.images_per_batch(
      cm.model, hdr.height, hdr.width, len(members), lim, tiling.tile_of(hdr)
    )
    batches += [members[k : k + n] for k in range(0, len(members), n)]
  total = sum(decode_plan(cm, parsed[m[0]][0])[0] for m in batches)
  out: list = [None] * len(blobs)
  done = 0
  for members in batches:
    report = None
    if progress is not None:
      report = functools.partial(_offset, progress, done, total)
    images = _decode_batch(cm, [parsed[i] for i in members], report)
    for i, img in zip(members, images, strict=True):
      out[i] = img
    done += decode_plan(cm, parsed[members[0]][0])[0]
  return out


def _offset(progress, before: int, total: int, done: int, _):
  progress(before + done, total)


def _decode_batch(cm: CodecModel, parsed: list, progress) -> list:
  """(header, stream) pairs of one padded size, step count, tile layout
  and sampler -> images."""
  first = parsed[0][0]
  shape = noise_shape(cm, first)
  y_hat = [decode_latents(cm, *p) for p in parsed]
  x_init = [initial_noise(h.seed, shape, h.gamma) for h, _ in parsed]
  if len(parsed) > 1:
    y_hat, x_init = jnp.concatenate(y_hat), jnp.concatenate(x_init)
  else:
    (y_hat,), (x_init,) = y_hat, x_init
  steps, sampler = decode_plan(cm, first)
  x = tiling.run(
    cm, y_hat, x_init, steps, tiling.Layout.of(first), progress, sampler=sampler
  )
  x = np.asarray(x)
  return [to_image(x[j], h) for j, (h, _) in enumerate(parsed)]


def _sampler_id(name: str) -> int:
  try:
    return samplers.sampler_id(name)
  except ValueError as e:
    raise CodecError(str(e)) from None


def decode_plan(cm: CodecModel, header: container.Header) -> tuple[int, str]:
  """(S, sampler) of a decode of ``header`` with ``cm``: the file's, or,
  for a distilled student, its own S-step decode whatever the file's S
  and sampler (the encoder's choice for its teacher)."""
  if cm.student is not None:
    return cm.student.steps, cm.sampler.student_sampler
  return header.steps, sampler_of(header)


def sampler_of(header: container.Header) -> str:
  """The name of the sampler a file's header records (CodecError for an
  id this version does not know)."""
  try:
    return samplers.sampler_name(header.sampler)
  except ValueError:
    known = ", ".join(f"{i} {n}" for n, i in samplers.SAMPLERS.items())
    raise CodecError(
      f"the header names sampler {header.sampler}, which this cdc_jax does "
      f"not know ({known}): the file was made by a newer cdc_jax or is "
      "damaged"
    ) from None


def to_image(x: np.ndarray, header: container.Header) -> np.ndarray:
  """Decoded floats [Hp, Wp, 3] -> the uint8 image, cropped. A decode that
  is not finite (e.g. a crafted header's gamma of 3e38 overflows x_T) is an
  error, not a black image."""
  x = x[: header.height, : header.width]
  if not np.all(np.isfinite(x)):
    raise CodecError(
      f"decoding produced NaN or inf (gamma {header.gamma:g} in the header "
      "is out of range, or the file was not made by this codec)"
    )
  return to_uint8(x)


def parse(
  cm: CodecModel, blob: bytes, lim: Limits | None = None
) -> tuple[container.Header, bytes]:
  """Checks a file against ``cm`` and the decoder's limits (default
  ``Limits()``, memory aside); returns its header and stream."""
  try:
    header, streams = container.unpack(blob)
  except BitstreamError as e:
    raise CodecError(str(e)) from None
  legacy = header.version in container.LEGACY_VERSIONS
  expected = cm.legacy_fingerprint if legacy else cm.fingerprint
  if header.fingerprint != expected:
    raise CodecError(
      "the file was made with another model (fingerprint "
      f"{header.fingerprint.hex()[:12]}..., this model "
      f"{expected.hex()[:12]}...); decode it with the model that "
      "compressed it"
    )
  check_family(header.family, cm.family, FAMILY_IDS, len(streams))
  limits.check_header(header, cm.schedule.timesteps, lim or Limits(), cm.model)
  sampler_of(header)
  return header, streams[0]


def noise_shape(cm: CodecModel, header: container.Header):
  hp, wp = padded_size(header.height, header.width, cm.downsampling_factor)
  return (1, hp, wp, cm.model.channels)
