"""Image <-> bytes: the CDC codec (CLI: ``python -m cdc_jax.codec``).

Encoding, one image at a time so a file never depends on its batch::

  image --pad (edge replicate)--> x --g_a--> y --h_a--> z
  z_sym = Q(z - medians)              coded with per-channel tables
  (mu, sigma) = h_s(z_sym + medians)   the same jitted function on both sides
  y_sym = Q(y - mu)                   coded with the Gaussian table of the
                                      smallest table scale >= sigma

Decoding: z_sym -> (mu, sigma) -> y_sym -> y_hat = y_sym + mu -> context
g_s(y_hat) -> DDIM from x_T = gamma * N(0, I; seed) -> crop -> uint8.

``load`` reads a model directory or a training workdir
(``cdc_jax.model_dir.load``); ``compress`` / ``decompress`` are the file
API, ``encode_latents`` / ``entropy_encode`` / ``decode_latents`` the
steps in between.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cdc_jax import diffusion, entropy_tables, model_dir
from cdc_jax.coding import container, range_coder
from cdc_jax.coding import tables as coding_tables
from cdc_jax.coding.errors import BitstreamError
from cdc_jax.imageio import to_float, to_uint8
from cdc_jax.models.cdc import CDC, from_config
from cdc_jax.models.entropy import gaussian_likelihood, quantize
from cdc_jax.sample import Sampler, initial_noise

FAMILY_IDS = {"eps": container.FAMILY_EPS, "x": container.FAMILY_X}
DEFAULT_STEPS = {"eps": 200, "x": 65}  # the original test scripts'
DEFAULT_GAMMA = 0.8
# Largest image the codec accepts (per side, and in pixels): a file whose
# header claims more is rejected before anything is allocated.
MAX_SIDE = 32768
MAX_PIXELS = 2**28


class CodecError(ValueError):
  """A user-facing codec error; the message names the file and problem."""


# -- the loaded codec ---------------------------------------------------------


@dataclasses.dataclass
class CodecModel:
  """A model ready to code: params, tables and the jitted transforms."""

  model: CDC
  params: dict
  schedule: diffusion.Schedule
  fingerprint: bytes
  z_tables: coding_tables.TableSet
  y_tables: coding_tables.TableSet
  scale_table: np.ndarray
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


def from_loaded(loaded: model_dir.LoadedModel) -> CodecModel:
  z_tables, y_tables, scale_table = entropy_tables.table_sets(loaded.tables)
  dcfg = loaded.diffusion_config
  return CodecModel(
    model=from_config(loaded.model_config),
    params=jax.tree.map(jnp.asarray, loaded.params),
    schedule=diffusion.make_schedule(dcfg["schedule"], int(dcfg["timesteps"])),
    fingerprint=file_fingerprint(loaded.fingerprint, z_tables, y_tables),
    z_tables=z_tables,
    y_tables=y_tables,
    scale_table=scale_table,
    path=loaded.path,
  )


def file_fingerprint(model_fp: str, z_tables, y_tables) -> bytes:
  """The 16 bytes a file stores: the params and configs (model.json's
  fingerprint) and the integer tables, so a file decodes only with the very
  tables that coded it."""
  h = hashlib.blake2b(digest_size=16)
  h.update(bytes.fromhex(model_fp))
  h.update(z_tables.digest())
  h.update(y_tables.digest())
  return h.digest()


# -- geometry -----------------------------------------------------------------


def padded_size(h: int, w: int, factor: int) -> tuple[int, int]:
  return math.ceil(h / factor) * factor, math.ceil(w / factor) * factor


def pad_image(img: np.ndarray, factor: int) -> np.ndarray:
  """Edge-replicate padding (bottom/right) to multiples of ``factor``."""
  h, w, _ = img.shape
  hp, wp = padded_size(h, w, factor)
  return np.pad(img, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")


def check_size(h: int, w: int):
  if h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
    raise CodecError(
      f"image size {w}x{h} exceeds the codec's limit ({MAX_SIDE} per side, "
      f"{MAX_PIXELS} pixels)"
    )


# -- latents ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Latents:
  """What the range coder codes: symbols and the scales that pick tables."""

  z_sym: np.ndarray  # int32 [1, H/64, W/64, Cz]
  y_sym: np.ndarray  # int32 [1, H/16, W/16, Cy]
  sigma: np.ndarray  # float32, like y_sym
  estimated_bits: float  # the model's -log2 likelihood of the symbols


def encode_latents(cm: CodecModel, x) -> Latents:
  """x [1, H, W, 3] in [-1, 1] (padded) -> symbols: g_a, h_a, Q, h_s, Q."""
  y, z_sym = cm.analyze(cm.params, x)
  mu, sigma = cm.hyper(cm.params, z_sym)
  y_sym = cm.y_symbols(y, offset=mu)
  bits = cm.estimate_bits(cm.params, z_sym, y_sym, mu, sigma)
  return Latents(
    np.asarray(z_sym), np.asarray(y_sym), np.asarray(sigma), float(bits)
  )


def entropy_encode(cm: CodecModel, latents: Latents) -> np.ndarray:
  """One range-coded stream (uint32 words): z, then y."""
  enc = range_coder.Encoder()
  z = latents.z_sym
  enc.encode(z, coding_tables.channel_indexes(z.shape), cm.z_tables)
  idx = coding_tables.scale_indexes(latents.sigma, cm.scale_table)
  enc.encode(latents.y_sym, idx, cm.y_tables)
  return enc.get_words()


def decode_latents(cm: CodecModel, header: container.Header, stream: bytes):
  """The stream of one file -> y_hat [1, H/16, W/16, C] (device array)."""
  f = cm.downsampling_factor
  hp, wp = padded_size(header.height, header.width, f)
  zshape = cm.model.latent_shapes(1, hp, wp)["z"]
  try:
    dec = range_coder.Decoder(stream)
    z_sym = dec.decode(coding_tables.channel_indexes(zshape), cm.z_tables)
    mu, sigma = cm.hyper(cm.params, jnp.asarray(z_sym))
    idx = coding_tables.scale_indexes(np.asarray(sigma), cm.scale_table)
    y_sym = dec.decode(idx, cm.y_tables)
  except BitstreamError as e:
    raise CodecError(str(e)) from None
  return jnp.asarray(y_sym).astype(jnp.float32) + mu


# -- files --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compressed:
  """A compressed image: the file bytes and the model's estimate."""

  data: bytes
  estimated_bits: float
  height: int
  width: int

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
) -> Compressed:
  """uint8 [H, W, 3] -> Compressed (the file bytes and the estimate)."""
  h, w = _check_image(img)
  header = container.Header(
    fingerprint=cm.fingerprint,
    height=h,
    width=w,
    family=FAMILY_IDS[cm.family],
    steps=_check_steps(cm, steps),
    gamma=_check_gamma(gamma),
    seed=_check_seed(seed),
  )
  x = to_float(pad_image(img, cm.downsampling_factor))[None]
  latents = encode_latents(cm, jnp.asarray(x))
  blob = container.pack(header, [entropy_encode(cm, latents)])
  return Compressed(blob, latents.estimated_bits, h, w)


def compress(cm: CodecModel, img: np.ndarray, **kw) -> bytes:
  """uint8 [H, W, 3] -> file bytes (keywords as ``compress_image``)."""
  return compress_image(cm, img, **kw).data


def decompress(cm: CodecModel, blob: bytes) -> np.ndarray:
  """File bytes -> uint8 [H, W, 3]."""
  header, stream = parse(cm, blob)
  y_hat = decode_latents(cm, header, stream)
  x_init = initial_noise(header.seed, _noise_shape(cm, header), header.gamma)
  x = cm.sampler.decode_latent(cm.params, y_hat, x_init, header.steps)
  return _to_image(np.asarray(x[0]), header)


def decompress_many(cm: CodecModel, blobs: Sequence[bytes]) -> list:
  """Decodes files; files of one size and step count share one batch.

  Faster than one by one on accelerators, but not bit-exact with
  ``decompress``: XLA may round a batch differently, so a pixel can differ
  by one level. ``decompress`` of one file is the reference, reproducible
  bit for bit on one platform.
  """
  parsed = [parse(cm, b) for b in blobs]
  groups: dict = {}
  for i, (hdr, _) in enumerate(parsed):
    key = (_noise_shape(cm, hdr), hdr.steps)
    groups.setdefault(key, []).append(i)
  out: list = [None] * len(blobs)
  for (shape, steps), members in groups.items():
    y_hat = jnp.concatenate([decode_latents(cm, *parsed[i]) for i in members])
    x_init = jnp.concatenate(
      [
        initial_noise(parsed[i][0].seed, shape, parsed[i][0].gamma)
        for i in members
      ]
    )
    x = np.asarray(cm.sampler.decode_latent(cm.params, y_hat, x_init, steps))
    for j, i in enumerate(members):
      out[i] = _to_image(x[j], parsed[i][0])
  return out


def _to_image(x: np.ndarray, header: container.Header) -> np.ndarray:
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


def parse(cm: CodecModel, blob: bytes) -> tuple[container.Header, bytes]:
  """Checks a file against ``cm``; returns its header and stream."""
  try:
    header, streams = container.unpack(blob)
  except BitstreamError as e:
    raise CodecError(str(e)) from None
  if header.fingerprint != cm.fingerprint:
    raise CodecError(
      "the file was made with another model (fingerprint "
      f"{header.fingerprint.hex()[:12]}..., this model "
      f"{cm.fingerprint.hex()[:12]}...); decode it with the model that "
      "compressed it"
    )
  if header.family != FAMILY_IDS[cm.family] or len(streams) != 1:
    raise CodecError("the file's header does not match the model")
  if header.steps < 1:
    raise CodecError("invalid header: 0 decode steps")
  check_size(header.height, header.width)
  return header, streams[0]


def _noise_shape(cm: CodecModel, header: container.Header):
  hp, wp = padded_size(header.height, header.width, cm.downsampling_factor)
  return (1, hp, wp, cm.model.channels)


def _check_image(img) -> tuple[int, int]:
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
    raise CodecError(
      f"expected a uint8 [H, W, 3] image, got {img.dtype} {img.shape}"
    )
  h, w, _ = img.shape
  if h < 1 or w < 1:
    raise CodecError("the image is empty")
  check_size(h, w)
  return h, w


def _check_steps(cm: CodecModel, steps) -> int:
  steps = DEFAULT_STEPS[cm.family] if steps is None else int(steps)
  if not 1 <= steps <= 65535:
    raise CodecError(f"--steps must be in [1, 65535], got {steps}")
  return steps


def _check_gamma(gamma) -> float:
  if not math.isfinite(gamma) or not math.isfinite(float(np.float32(gamma))):
    raise CodecError(f"--gamma must be a finite float32, got {gamma}")
  return gamma


def _check_seed(seed) -> int:
  if not 0 <= seed < 2**64:
    raise CodecError(f"--seed must be in [0, 2**64), got {seed}")
  return seed
