"""Image <-> bytes: a real CDC codec, with a compress/decompress CLI.

  python -m cdc_jax.codec compress --model M INPUT_IMAGE OUTPUT.cdcj \
      [--steps S] [--gamma G] [--seed N]
  python -m cdc_jax.codec decompress --model M INPUT.cdcj OUTPUT.png

M is a model directory (exported by training, or converted from the
released PyTorch weights) or a training workdir (its latest checkpoint,
EMA params where present).

Encoding (one image at a time, so a file never depends on its batch)::

  image --pad to 64k (edge replicate)--> x --g_a--> y --h_a--> z
  z_sym = round(z - medians)          coded with per-channel tables
  (mu, sigma) = h_s(z_sym + medians)   the same jitted function on both sides
  y_sym = round(y - mu)               coded with the Gaussian table of the
                                      smallest table scale >= sigma
Decoding: z_sym -> (mu, sigma) -> y_sym -> y_hat = y_sym + mu -> context
g_s(y_hat) -> DDIM from x_T = gamma * N(0, I; seed) -> crop -> PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cdc_jax import bitstream, checkpoint, data, diffusion, metrics
from cdc_jax.models import cdc as cdc_lib
from cdc_jax.models.analysis import DOWNSAMPLING_FACTOR
from cdc_jax.models.cdc import CDC
from cdc_jax.models.entropy import gaussian_likelihood
from cdc_jax.sample import Sampler, initial_noise

FAMILY_IDS = {"eps": bitstream.FAMILY_EPS, "x": bitstream.FAMILY_X}
DEFAULT_STEPS = {"eps": 200, "x": 65}  # the original test scripts'
DEFAULT_GAMMA = 0.8
Z_TAIL_MASS = 1e-9
Z_SEARCH = 2048  # the hyperprior's support is searched in +-Z_SEARCH
# Largest image the codec accepts (per side, and in pixels): a file whose
# header claims more is rejected before anything is allocated.
MAX_SIDE = 32768
MAX_PIXELS = 2**28


class CodecError(ValueError):
  """A user-facing codec error; the message names the file and problem."""


# -- entropy tables -----------------------------------------------------------


def build_entropy_tables(model: CDC, params) -> dict[str, np.ndarray]:
  """Integer coding tables of a model, stored with it (``model dir``).

  z: for each channel, the factorized prior's bin probabilities on the
  integer grid around its median, from the tail_mass/2 to the
  1 - tail_mass/2 quantile; y: Gaussian tables for 64 log-spaced scales
  from 0.1 (the model's scale floor) to 256.
  """
  variables = {"params": params}
  med = np.asarray(model.apply(variables, method=CDC.medians), np.float64)
  c = med.shape[0]
  grid = np.arange(-Z_SEARCH, Z_SEARCH + 1, dtype=np.float32)  # [G]
  u = (med[None, :] + grid[:, None]).astype(np.float32)  # [G, C]
  logits = lambda v: np.asarray(
    model.apply(variables, jnp.asarray(v), method=CDC.z_logits_cdf),
    np.float64,
  )
  cdf_hi = _sigmoid(logits(u + 0.5))  # P(z < m + k + 0.5)
  cdf_lo = _sigmoid(logits(u - 0.5))
  lo = np.empty(c, np.int64)
  hi = np.empty(c, np.int64)
  for ch in range(c):
    below = np.flatnonzero(cdf_lo[:, ch] < Z_TAIL_MASS / 2)
    above = np.flatnonzero(cdf_hi[:, ch] > 1 - Z_TAIL_MASS / 2)
    lo[ch] = below[-1] if below.size else 0
    hi[ch] = above[0] if above.size else len(grid) - 1
  width = int(np.max(hi - lo) + 1)
  pmfs = np.zeros((c, width))
  offsets = np.zeros(c, np.int32)
  for ch in range(c):
    start = min(lo[ch], len(grid) - width)
    rows = slice(start, start + width)
    pmfs[ch] = np.abs(cdf_hi[rows, ch] - cdf_lo[rows, ch])
    offsets[ch] = int(grid[start])
  z_tables = bitstream.factorized_tables(pmfs, offsets)
  scale_table = bitstream.gaussian_scale_table()
  y_tables = bitstream.gaussian_tables(scale_table)
  out = {}
  out.update(z_tables.to_arrays("z_"))
  out.update(y_tables.to_arrays("y_"))
  out["y_scale_table"] = scale_table
  return out


def _sigmoid(v):
  return 0.5 * (1.0 + np.tanh(0.5 * v))


# -- the loaded codec ---------------------------------------------------------


@dataclasses.dataclass
class CodecModel:
  """A model ready to code: params, tables, jitted pieces."""

  model: CDC
  params: dict
  schedule: diffusion.Schedule
  fingerprint: bytes
  z_tables: bitstream.TableSet
  y_tables: bitstream.TableSet
  scale_table: np.ndarray
  path: str = ""

  def __post_init__(self):
    self.family = self.model.family
    self.sampler = Sampler(self.model, self.schedule)
    m = self.model
    med = lambda p: m.apply({"params": p}, method=CDC.medians)

    @jax.jit
    def analyze(p, x):
      y = m.apply({"params": p}, x, method=CDC.g_a)
      z = m.apply({"params": p}, y, method=CDC.h_a)
      return y, _to_int32(jnp.round(z - med(p)))

    @jax.jit
    def hyper(p, z_sym):
      z_hat = z_sym.astype(jnp.float32) + med(p)
      return m.apply({"params": p}, z_hat, method=CDC.h_s)

    @jax.jit
    def estimate_bits(p, z_sym, y_sym, mu, sigma):
      z_hat = z_sym.astype(jnp.float32) + med(p)
      pz = m.apply(
        {"params": p}, z_hat, method=lambda mod, v: mod.context_fn.prior(v)
      )
      py = gaussian_likelihood(y_sym.astype(jnp.float32) + mu, mu, sigma)
      return jnp.sum(-jnp.log2(pz)) + jnp.sum(-jnp.log2(py))

    self._analyze, self._hyper, self._estimate = analyze, hyper, estimate_bits


def _to_int32(v):
  lim = 2.0**31 - 128  # float32 cannot hold 2**31 - 1 exactly
  return jnp.clip(v, -lim, lim).astype(jnp.int32)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> CodecModel:
  del mtime
  return _load_uncached(path)


def load(path: str) -> CodecModel:
  """A model directory or a training workdir -> CodecModel."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CodecError(f"{path}: model directory does not exist")
  stamp = os.path.getmtime(path)
  return _load_cached(path, stamp)


def _load_uncached(path: str) -> CodecModel:
  if checkpoint.is_model_dir(path):
    loaded = checkpoint.load_model(path)
    model_cfg, diff_cfg = loaded.model_config, loaded.diffusion_config
    params, tables, fp = loaded.params, loaded.tables, loaded.fingerprint
  elif os.path.isfile(os.path.join(path, "config.json")):
    model_cfg, diff_cfg, params = _restore_workdir(path)
    tables = None
    fp = checkpoint.fingerprint(model_cfg, diff_cfg, params)
  else:
    raise CodecError(
      f"{path}: neither a model directory (model.json) nor a training "
      "workdir (config.json + checkpoints/)"
    )
  model = cdc_lib.from_config(model_cfg)
  params = jax.tree.map(jnp.asarray, params)
  if tables is None:
    tables = build_entropy_tables(model, params)
  schedule = diffusion.make_schedule(
    diff_cfg["schedule"], int(diff_cfg["timesteps"])
  )
  z_tables = bitstream.TableSet.from_arrays(tables, "z_")
  y_tables = bitstream.TableSet.from_arrays(tables, "y_")
  return CodecModel(
    model=model,
    params=params,
    schedule=schedule,
    fingerprint=file_fingerprint(fp, z_tables, y_tables),
    z_tables=z_tables,
    y_tables=y_tables,
    scale_table=np.asarray(tables["y_scale_table"], np.float64),
    path=path,
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


def _restore_workdir(workdir: str):
  import ml_collections

  from cdc_jax import train

  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  params = train.restore_export_params(config, workdir)
  if params is None:
    raise CodecError(f"{workdir}: the workdir has no complete checkpoint")
  return (
    train.model_config_dict(config),
    {
      "schedule": config.diffusion.schedule,
      "timesteps": int(config.diffusion.timesteps),
    },
    jax.device_get(params),
  )


# -- compress / decompress ----------------------------------------------------


def padded_size(h: int, w: int) -> tuple[int, int]:
  f = DOWNSAMPLING_FACTOR
  return math.ceil(h / f) * f, math.ceil(w / f) * f


def pad_image(img: np.ndarray) -> np.ndarray:
  """Edge-replicate padding (bottom/right) to the model's 64-multiple."""
  h, w, _ = img.shape
  hp, wp = padded_size(h, w)
  return np.pad(img, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")


@dataclasses.dataclass(frozen=True)
class Compressed:
  data: bytes
  estimated_bits: float
  height: int
  width: int

  @property
  def bpp(self) -> float:
    return metrics.bpp(len(self.data), self.height, self.width)

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
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
    raise CodecError(
      f"expected a uint8 [H, W, 3] image, got {img.dtype} {img.shape}"
    )
  h, w, _ = img.shape
  if h < 1 or w < 1:
    raise CodecError("the image is empty")
  _check_size(h, w)
  steps = DEFAULT_STEPS[cm.family] if steps is None else int(steps)
  if not 1 <= steps <= 65535:
    raise CodecError(f"--steps must be in [1, 65535], got {steps}")
  if not math.isfinite(gamma) or not math.isfinite(float(np.float32(gamma))):
    raise CodecError(f"--gamma must be a finite float32, got {gamma}")
  if not 0 <= seed < 2**64:
    raise CodecError(f"--seed must be in [0, 2**64), got {seed}")
  x = jnp.asarray(metrics.to_float(pad_image(img)))[None]
  y, z_sym = cm._analyze(cm.params, x)
  mu, sigma = cm._hyper(cm.params, z_sym)
  y, mu, sigma = (np.asarray(a) for a in (y, mu, sigma))
  y_sym = np.rint(y - mu).astype(np.int32)
  z_np = np.asarray(z_sym)
  enc = bitstream.Encoder()
  enc.encode(z_np, bitstream.channel_indexes(z_np.shape), cm.z_tables)
  enc.encode(y_sym, bitstream.scale_indexes(sigma, cm.scale_table), cm.y_tables)
  header = bitstream.Header(
    fingerprint=cm.fingerprint,
    height=h,
    width=w,
    family=FAMILY_IDS[cm.family],
    steps=steps,
    gamma=gamma,
    seed=seed,
  )
  blob = bitstream.pack(header, [enc.get_words()])
  est = float(
    cm._estimate(
      cm.params, z_sym, jnp.asarray(y_sym), jnp.asarray(mu), jnp.asarray(sigma)
    )
  )
  return Compressed(blob, est, h, w)


def compress(cm: CodecModel, img: np.ndarray, **kw) -> bytes:
  """uint8 [H, W, 3] -> file bytes."""
  return compress_image(cm, img, **kw).data


def _check_size(h: int, w: int):
  if h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
    raise CodecError(
      f"image size {w}x{h} exceeds the codec's limit ({MAX_SIDE} per side, "
      f"{MAX_PIXELS} pixels)"
    )


def _parse(cm: CodecModel, blob: bytes):
  try:
    header, streams = bitstream.unpack(blob)
  except bitstream.BitstreamError as e:
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
  _check_size(header.height, header.width)
  return header, streams[0]


def _entropy_decode(cm: CodecModel, header, stream):
  hp, wp = padded_size(header.height, header.width)
  c = cm.z_tables.num_tables
  zshape = (1, hp // 64, wp // 64, c)
  try:
    dec = bitstream.Decoder(stream)
    z_sym = dec.decode(bitstream.channel_indexes(zshape), cm.z_tables)
    mu, sigma = cm._hyper(cm.params, jnp.asarray(z_sym))
    idx = bitstream.scale_indexes(np.asarray(sigma), cm.scale_table)
    y_sym = dec.decode(idx, cm.y_tables)
  except bitstream.BitstreamError as e:
    raise CodecError(str(e)) from None
  return jnp.asarray(y_sym).astype(jnp.float32) + mu


def decompress_many(cm: CodecModel, blobs: Sequence[bytes]) -> list:
  """Decodes files; files of one size and step count share one batch.

  Faster than one by one on accelerators, but not bit-exact with
  ``decompress``: XLA may round a batch differently, so a pixel can differ
  by one level (seen on <0.1% of values). ``decompress`` of one file is the
  reference, reproducible bit for bit on one platform.
  """
  parsed = [_parse(cm, b) for b in blobs]
  out: list = [None] * len(blobs)
  groups: dict = {}
  for i, (hdr, _) in enumerate(parsed):
    key = (*padded_size(hdr.height, hdr.width), hdr.steps)
    groups.setdefault(key, []).append(i)
  for (hp, wp, steps), members in groups.items():
    y_hat = jnp.concatenate(
      [_entropy_decode(cm, *parsed[i]) for i in members], axis=0
    )
    x_init = jnp.concatenate(
      [
        initial_noise(parsed[i][0].seed, (1, hp, wp, 3), parsed[i][0].gamma)
        for i in members
      ],
      axis=0,
    )
    rec = np.asarray(cm.sampler.decode_latent(cm.params, y_hat, x_init, steps))
    for j, i in enumerate(members):
      hdr = parsed[i][0]
      out[i] = metrics.to_uint8(rec[j, : hdr.height, : hdr.width])
  return out


def decompress(cm: CodecModel, blob: bytes) -> np.ndarray:
  """File bytes -> uint8 [H, W, 3]."""
  return decompress_many(cm, [blob])[0]


# -- files and CLI ------------------------------------------------------------


def _write_atomic(path: str, payload: bytes | None = None, image=None):
  """Writes to a temp file in the target directory, then renames."""
  d = os.path.dirname(os.path.abspath(path)) or "."
  if not os.path.isdir(d):
    raise CodecError(f"{path}: output directory {d} does not exist")
  try:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=d)
  except OSError as e:
    raise CodecError(f"{path}: cannot write ({e.strerror})") from None
  try:
    with os.fdopen(fd, "wb") as f:
      if image is not None:
        Image.fromarray(image).save(f, format="PNG")
      else:
        f.write(payload)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise CodecError(f"{path}: cannot write ({e.strerror or e})") from None
    raise


def compress_file(cm, src: str, dst: str, **kw) -> Compressed:
  try:
    img = data.load_image(src)
  except data.ImageError as e:
    raise CodecError(str(e)) from None
  res = compress_image(cm, img, **kw)
  _write_atomic(dst, res.data)
  return res


def decompress_file(cm, src: str, dst: str) -> np.ndarray:
  try:
    with open(src, "rb") as f:
      blob = f.read()
  except OSError as e:
    raise CodecError(f"{src}: cannot read ({e.strerror})") from None
  try:
    img = decompress(cm, blob)
  except CodecError as e:
    raise CodecError(f"{src}: {e}") from None
  _write_atomic(dst, image=img)
  return img


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m cdc_jax.codec",
    description="Compress images to .cdcj files with a CDC model, and back.",
  )
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser(
    "compress",
    help="image -> .cdcj file",
    description="Compress an image (any size; PNG/JPEG/...; grayscale, "
    "RGBA, palette and 16-bit inputs become 8-bit RGB) to a .cdcj file. "
    "Prints the real bpp (file bytes * 8 / pixels) and the model's estimate.",
  )
  c.add_argument(
    "--model", required=True, help="model directory or training workdir"
  )
  c.add_argument("input", help="input image")
  c.add_argument("output", help="output .cdcj file")
  c.add_argument(
    "--steps",
    type=int,
    default=None,
    help="DDIM decode steps stored in the file (default: 200 "
    "for eps models, 65 for x models)",
  )
  c.add_argument(
    "--gamma",
    type=float,
    default=DEFAULT_GAMMA,
    help="scale of the initial decode noise x_T (default 0.8)",
  )
  c.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the initial decode noise (default 0)",
  )
  d = sub.add_parser(
    "decompress",
    help=".cdcj file -> PNG",
    description="Decompress a .cdcj file to a PNG, with the model that "
    "compressed it.",
  )
  d.add_argument(
    "--model", required=True, help="model directory or training workdir"
  )
  d.add_argument("input", help="input .cdcj file")
  d.add_argument("output", help="output PNG")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    if not os.path.isdir(args.model):
      raise CodecError(f"{args.model}: model directory does not exist")
    try:
      cm = load(args.model)
    except checkpoint.ModelError as e:
      raise CodecError(str(e)) from None
    if args.cmd == "compress":
      res = compress_file(
        cm,
        args.input,
        args.output,
        steps=args.steps,
        gamma=args.gamma,
        seed=args.seed,
      )
      print(
        f"{args.output}: {len(res.data)} bytes, {res.height}x{res.width}, "
        f"{res.bpp:.4f} bpp (model estimate {res.estimated_bpp:.4f} bpp)"
      )
    else:
      img = decompress_file(cm, args.input, args.output)
      print(f"{args.output}: {img.shape[0]}x{img.shape[1]}")
  except CodecError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
