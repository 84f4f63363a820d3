"""The loaded codec: a model directory or workdir, ready to code.

``load`` reads a model directory or a training workdir
(``cdc_jax.model_dir.load``) into a ``CodecModel``: params on the device,
the integer coding tables, the exact scale path
(``entropy_tables.scale_indexer``), the two fingerprints a file can
carry (``codec.fingerprint``) and the jitted transforms the encoder and
the decoder share.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import cdc_jax.codec.fingerprint as fingerprint
from cdc_jax import diffusion, entropy_tables, model_dir, samplers
from cdc_jax.codec.errors import CodecError
from cdc_jax.coding import container
from cdc_jax.coding import tables as coding_tables
from cdc_jax.coding.scale_index import ScaleIndexer
from cdc_jax.models.cdc import CDC, from_config, with_dtype
from cdc_jax.models.entropy import gaussian_likelihood, quantize
from cdc_jax.sample import Sampler

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
  student: samplers.Student | None = None  # a distilled student's decoder

  def __post_init__(self):
    self.family = self.model.family
    self.sampler = Sampler(self.model, self.schedule, self.student)
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
  bits = fingerprint.bitstream(
    loaded.model_config, loaded.params, z_tables, y_tables, scales
  )
  return CodecModel(
    model=from_config(loaded.model_config),
    # One transfer for the whole tree (jnp.asarray per leaf compiles a
    # small program per distinct shape on every load).
    params=jax.device_put(loaded.params),
    schedule=diffusion.make_schedule(dcfg["schedule"], int(dcfg["timesteps"])),
    fingerprint=bits,
    legacy_fingerprint=fingerprint.legacy(
      loaded.fingerprint, z_tables, y_tables
    ),
    z_tables=z_tables,
    y_tables=y_tables,
    scale_table=scale_table,
    scales=scales,
    path=loaded.path,
    student=_student(loaded, bits),
  )


def _student(loaded: model_dir.LoadedModel, bits: bytes):
  """A student's decoder; CodecError if its bitstream is not the one its
  teacher's files carry (its entropy model was changed)."""
  d = loaded.distilled
  if d is None:
    return None
  if d["teacher_bitstream"] != bits.hex():
    raise CodecError(
      f"{loaded.path}: a distilled model whose entropy model is not its "
      f"teacher's (bitstream {bits.hex()[:12]}..., the teacher's "
      f"{d['teacher_bitstream'][:12]}...): it cannot decode the teacher's "
      "files; distil again with the entropy model frozen"
    )
  return samplers.Student(d["base_steps"], d["steps"], d["parameterisation"])
