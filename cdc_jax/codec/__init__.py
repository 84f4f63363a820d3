"""Image <-> bytes: the CDC codec (CLI: ``python -m cdc_jax.codec``).

Encoding, one image at a time so a file never depends on its batch::

  image --pad (edge replicate)--> x --g_a--> y --h_a--> z
  z_sym = Q(z - medians)              coded with per-channel tables
  mu = h_s(z_sym + medians)           float32, jitted
  y_sym = Q(y - mu)                   coded with the Gaussian table of the
                                      smallest table scale >= sigma
  table index = scales(z_sym)         h_s's sigma in exact integer
                                      arithmetic (``coding.scale_index``)

Decoding: z_sym -> table indexes -> y_sym -> y_hat = y_sym + mu ->
context g_s(y_hat) -> DDIM from x_T = gamma * N(0, I; seed) -> crop ->
uint8, whole-image or, when the header records a tile layout, in tiles of
bounded memory (``codec.tiling``).

The table indexes are the same on every machine, so a file decodes to
the same symbols everywhere (the decode contract, docs/bitstream.md);
files of format v1 and v2 chose their tables from the float32 sigma and
decode the same way, portable only where that float path agrees.

``load`` reads a model directory or a training workdir
(``cdc_jax.model_dir.load``); ``compress`` / ``decompress`` are the file
API (``codec.many.decompress_many`` decodes files in batches),
``encode_latents`` / ``entropy_encode`` / ``decode_latents`` the steps in
between. A header's steps, size, gamma, tile layout and memory estimate
are checked against ``codec.limits`` before anything is decoded.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import diffusion, entropy_tables, model_dir
from cdc_jax.codec import fingerprint, limits, tiled_analysis, tiling
from cdc_jax.codec.errors import CodecError, check_family
from cdc_jax.codec.geometry import pad_image, padded_size  # noqa: F401
from cdc_jax.codec.limits import (  # noqa: F401 (the API re-exports them)
  DEFAULT_MAX_PIXELS,
  DEFAULT_MAX_STEPS,
  MAX_PIXELS,
  MAX_SIDE,
  Limits,
  check_size,
)
from cdc_jax.coding import container, range_coder
from cdc_jax.coding import tables as coding_tables
from cdc_jax.coding.errors import BitstreamError
from cdc_jax.coding.scale_index import ScaleIndexer
from cdc_jax.imageio import to_float, to_uint8
from cdc_jax.models.cdc import CDC, from_config, with_dtype
from cdc_jax.models.entropy import gaussian_likelihood, quantize
from cdc_jax.sample import Sampler, initial_noise

FAMILY_IDS = {"eps": container.FAMILY_EPS, "x": container.FAMILY_X}
DEFAULT_STEPS = {"eps": 200, "x": 65}  # the original test scripts'
DEFAULT_GAMMA = 0.8


# -- the loaded codec ---------------------------------------------------------


@dataclasses.dataclass
class CodecModel:
  """A model ready to code: params, tables and the jitted transforms."""

  model: CDC
  params: dict
  schedule: diffusion.Schedule
  fingerprint: bytes  # what a v3 file stores: the bitstream's
  legacy_fingerprint: bytes  # what v1 and v2 files store: the model's
  z_tables: coding_tables.TableSet
  y_tables: coding_tables.TableSet
  scale_table: np.ndarray
  scales: ScaleIndexer
  path: str = ""

  def __post_init__(self):
    self.family = self.model.family
    self.sampler = Sampler(self.model, self.schedule)
    m = self.model

    def apply(p, *args, method):
      return m.apply({"params": p}, *args, method=method)

    @jax.jit
    def analyze(p, x):  # g_a, h_a, and z's symbols
      y = apply(p, x, method=CDC.g_a)
      z = apply(p, y, method=CDC.h_a)
      return y, quantize(z, "symbols", apply(p, method=CDC.medians))

    @jax.jit
    def hyper(p, z_sym):  # h_s: the encoder and the decoder share it
      z_hat = z_sym.astype(jnp.float32) + apply(p, method=CDC.medians)
      return apply(p, z_hat, method=CDC.h_s)

    @jax.jit
    def estimate_bits(p, z_sym, y_sym, mu, sigma):
      z_hat = z_sym.astype(jnp.float32) + apply(p, method=CDC.medians)
      pz = apply(p, z_hat, method=CDC.z_likelihood)
      py = gaussian_likelihood(y_sym.astype(jnp.float32) + mu, mu, sigma)
      return jnp.sum(-jnp.log2(pz)) + jnp.sum(-jnp.log2(py))

    self.analyze, self.hyper, self.estimate_bits = analyze, hyper, estimate_bits
    self.y_symbols = jax.jit(functools.partial(quantize, mode="symbols"))

  @property
  def downsampling_factor(self) -> int:
    return self.model.downsampling_factor

  def y_indexes(self, z_sym, sigma, version: int) -> np.ndarray:
    """The y coding tables' indexes, as the encoder and the decoder of a
    file of format ``version`` choose them: from z's symbols by the exact
    integer path (v3), or from the float32 ``sigma`` (v1, v2)."""
    if version in container.LEGACY_VERSIONS:
      return coding_tables.scale_indexes(np.asarray(sigma), self.scale_table)
    return self.scales(np.asarray(z_sym))


def load(path: str) -> CodecModel:
  """A model directory or a training workdir -> CodecModel (cached)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CodecError(f"{path}: model directory does not exist")
  return _load_cached(path, os.path.getmtime(path))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> CodecModel:
  del mtime  # part of the cache key only
  try:
    loaded = model_dir.load(path)
  except model_dir.ModelError as e:
    raise CodecError(str(e)) from None
  return from_loaded(loaded)


PRECISIONS = ("float32", "bfloat16")


def with_precision(cm: CodecModel, precision: str) -> CodecModel:
  """``cm`` decoding with g_s and the U-Net in ``precision`` (params,
  h_s and the entropy decoding stay float32, so any file still decodes).

  A bfloat16 decode is not bit-identical to the float32 decode of the
  same file (the file does not record a precision; float32 is the
  reference): measured on a trained tiny eps model, 1.1-1.2 % of the
  uint8 pixels differ, the two decodes 32.5 dB (S = 8) and 36.6 dB
  (S = 65) apart (benchmarks/bf16_quality.py).
  """
  if precision not in PRECISIONS:
    raise CodecError(
      f"precision {precision!r} is not one of {', '.join(PRECISIONS)}"
    )
  if precision == cm.model.dtype:
    return cm
  return dataclasses.replace(cm, model=with_dtype(cm.model, precision))


def from_loaded(loaded: model_dir.LoadedModel) -> CodecModel:
  z_tables, y_tables, scale_table = entropy_tables.table_sets(loaded.tables)
  dcfg = loaded.diffusion_config
  try:
    scales = entropy_tables.scale_indexer(loaded.params, scale_table)
  except ValueError as e:
    raise CodecError(f"{loaded.path}: unusable entropy model: {e}") from None
  return CodecModel(
    model=from_config(loaded.model_config),
    # One transfer for the whole tree (jnp.asarray per leaf compiles a
    # small program per distinct shape on every load).
    params=jax.device_put(loaded.params),
    schedule=diffusion.make_schedule(dcfg["schedule"], int(dcfg["timesteps"])),
    fingerprint=fingerprint.bitstream(
      loaded.model_config, loaded.params, z_tables, y_tables, scales
    ),
    legacy_fingerprint=fingerprint.legacy(
      loaded.fingerprint, z_tables, y_tables
    ),
    z_tables=z_tables,
    y_tables=y_tables,
    scale_table=scale_table,
    scales=scales,
    path=loaded.path,
  )


# -- latents ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Latents:
  """What the range coder codes: symbols and the indexes of their tables."""

  z_sym: np.ndarray  # int32 [1, H/64, W/64, Cz]
  y_sym: np.ndarray  # int32 [1, H/16, W/16, Cy]
  y_indexes: np.ndarray  # int32, like y_sym: the y coding tables
  estimated_bits: float  # the model's -log2 likelihood of the symbols


def encode_latents(
  cm: CodecModel, x, tile=None, version: int = container.FORMAT_VERSION
) -> Latents:
  """x [1, H, W, 3] in [-1, 1] (padded) -> symbols: g_a, h_a, Q, h_s, Q,
  and y's tables as a file of ``version`` chooses them. With ``tile``
  (core height, width in pixels) g_a runs in tiles of bounded memory
  (``codec.tiled_analysis``), the rest on the whole y."""
  if tile is None:
    y, z_sym = cm.analyze(cm.params, jnp.asarray(x))
  else:
    y, z_sym = tiled_analysis.analyze(cm, x, tile)
  mu, sigma = cm.hyper(cm.params, z_sym)
  y_sym = cm.y_symbols(y, offset=mu)
  bits = cm.estimate_bits(cm.params, z_sym, y_sym, mu, sigma)
  z_sym = np.asarray(z_sym)
  idx = cm.y_indexes(z_sym, sigma, version)
  return Latents(z_sym, np.asarray(y_sym), idx, float(bits))


def entropy_encode(cm: CodecModel, latents: Latents) -> np.ndarray:
  """One range-coded stream (uint32 words): z, then y."""
  enc = range_coder.Encoder()
  z = latents.z_sym
  enc.encode(z, coding_tables.channel_indexes(z.shape), cm.z_tables)
  enc.encode(latents.y_sym, latents.y_indexes, cm.y_tables)
  return enc.get_words()


def decode_symbols(cm: CodecModel, header: container.Header, stream: bytes):
  """The stream of one file -> (z_sym, y_sym, mu): the symbols (numpy,
  the same on every machine for a v3 file) and y's float32 means."""
  f = cm.downsampling_factor
  hp, wp = padded_size(header.height, header.width, f)
  zshape = cm.model.latent_shapes(1, hp, wp)["z"]
  try:
    dec = range_coder.Decoder(stream)
    z_sym = dec.decode(coding_tables.channel_indexes(zshape), cm.z_tables)
    mu, sigma = cm.hyper(cm.params, jnp.asarray(z_sym))
    idx = cm.y_indexes(z_sym, sigma, header.version)
    y_sym = dec.decode(idx, cm.y_tables)
  except BitstreamError as e:
    raise CodecError(str(e)) from None
  return z_sym, y_sym, mu


def decode_latents(cm: CodecModel, header: container.Header, stream: bytes):
  """The stream of one file -> y_hat [1, H/16, W/16, C] (device array)."""
  _, y_sym, mu = decode_symbols(cm, header, stream)
  return jnp.asarray(y_sym).astype(jnp.float32) + mu


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
) -> Compressed:
  """uint8 [H, W, 3] -> Compressed (the file bytes and the estimate).

  Steps, gamma and size must be within the decoder's limits
  (``codec.limits``): the file records them, and ``decompress`` with the
  same ``max_steps`` / ``max_pixels`` accepts it. ``tile`` (pixels: N or
  (height, width), multiples of the model's downsampling factor; or
  ``"auto"``: tiles only if a whole-image decode would not fit
  ``max_memory``) and ``tile_overlap`` record a tile layout for a
  bounded-memory decode (``codec.tiling.plan``); None decodes whole.
  The encoder's g_a runs in tiles (``codec.tiled_analysis``) when the
  file is tiled or a whole-image g_a would not fit ``max_memory``.
  """
  h, w = limits.check_image(img, Limits(max_steps, max_pixels).max_pixels)
  steps = DEFAULT_STEPS[cm.family] if steps is None else steps
  layout = tiling.plan(cm.model, h, w, tile, tile_overlap, max_memory)
  header = container.Header(
    fingerprint=cm.fingerprint,
    height=h,
    width=w,
    family=FAMILY_IDS[cm.family],
    steps=limits.check_steps(steps, cm.schedule.timesteps, max_steps),
    gamma=limits.check_gamma(gamma),
    seed=limits.check_seed(seed),
    **(layout.header_fields() if layout else {}),
  )
  at = tiled_analysis.analysis_tile(cm.model, h, w, bool(layout), max_memory)
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
  """File bytes -> uint8 [H, W, 3].

  The header must be within the limits (``codec.limits``): decode steps
  <= ``max_steps`` and the model's T, pixels <= ``max_pixels``, gamma in
  [0, 4], a tile layout the model can decode, and the estimated memory
  of the decode (per tile for a tiled file) <= ``max_memory`` bytes (None:
  the machine's memory; ``math.inf``: no check); else a CodecError,
  raised before anything is decoded. ``progress(done, total)`` is called
  on the host as the steps run (``cdc_jax.sample``, ``codec.tiling``); an
  exception it raises stops the decode.
  """
  lim = Limits(max_steps, max_pixels, max_memory)
  header, stream = parse(cm, blob, lim)
  h, w, layout = header.height, header.width, tiling.Layout.of(header)
  limits.images_per_batch(cm.model, h, w, 1, lim, tiling.tile_of(header))
  y_hat = decode_latents(cm, header, stream)
  x_init = initial_noise(header.seed, noise_shape(cm, header), header.gamma)
  x = tiling.run(cm, y_hat, x_init, header.steps, layout, progress)
  return to_image(np.asarray(x)[0], header)


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
  return header, streams[0]


def noise_shape(cm: CodecModel, header: container.Header):
  hp, wp = padded_size(header.height, header.width, cm.downsampling_factor)
  return (1, hp, wp, cm.model.channels)
