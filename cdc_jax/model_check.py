"""The model-directory validator: everything a model directory holds is
checked against sane bounds before anything is built or read in full.

* ``check_meta``: model.json's keys and types, the format version, every
  model field (family, dtype, widths, multipliers, channel counts) and
  the diffusion settings (schedule, timesteps) against the bounds below;
* ``expected_params``: the param shapes of that model (``jax.eval_shape``,
  nothing allocated), which ``params.npz``'s member headers must match
  name for name (shape, float32) before its arrays are read;
  ``check_finite``: no NaN or inf among them;
* ``check_tables``: ``entropy_tables.npz``'s members from their headers,
  then the tables themselves (counts, lengths, offsets, precision; a
  finite, positive, strictly increasing scale table).

Every failure is a ``ModelError`` (passed in as ``error``) naming the file,
the field and the value.
"""

from __future__ import annotations

import functools
import json
import math
import re

import numpy as np

from cdc_jax.coding import tables as coding_tables
from cdc_jax.models import cdc
from cdc_jax.npz import Member

FORMAT = "cdc_jax-model"
VERSION = 1
META_KEYS = {
  "format",
  "version",
  "model",
  "diffusion",
  "fingerprint",
  "source",
  "distilled",
}
DISTILLED_KEYS = (
  "base_steps",
  "steps",
  "parameterisation",
  "teacher_bitstream",
)
SCHEDULES = ("linear", "cosine")
MAX_TIMESTEPS = 100_000  # the released models use 20,000 and 8,193
MAX_DIM = 1024  # the released models: 64
MAX_MULT = 16
MAX_LEVELS = 8
MAX_CHANNELS = 1024
MAX_PARAMS = 2**30  # values (4 GiB of float32); the released: ~ 10^8
MAX_TABLES = 4096
MAX_TABLE_LEN = 2**16
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int_in(lo: int, hi: int):
  return lambda v: _is_int(v) and lo <= v <= hi


def _mults(v, levels=(1, MAX_LEVELS)) -> bool:
  return (
    isinstance(v, list)
    and levels[0] <= len(v) <= levels[1]
    and all(_is_int(m) and 1 <= m <= MAX_MULT for m in v)
  )


_MULTS = f"a list of 1 to {MAX_LEVELS} integers in [1, {MAX_MULT}]"
# Model fields: (check, what a valid value is).
FIELDS = {
  "family": (lambda v: v in cdc.FAMILIES, f"one of {cdc.FAMILIES}"),
  "dim": (_int_in(1, MAX_DIM), f"an integer in [1, {MAX_DIM}]"),
  "dim_mults": (_mults, _MULTS),
  "context_dim_mults": (_mults, _MULTS),
  "reverse_context_dim_mults": (
    lambda v: v is None or _mults(v),
    f"null or {_MULTS}",
  ),
  "hyper_dims_mults": (_mults, _MULTS),
  "context_channels": (
    _int_in(1, MAX_CHANNELS),
    f"an integer in [1, {MAX_CHANNELS}]",
  ),
  "channels": (lambda v: v == 3, "3 (RGB)"),
  "dtype": (lambda v: v in cdc.DTYPES, f"one of {cdc.DTYPES}"),
}


def check_model(model, where: str, error) -> dict:
  """A model config (model.json's "model", a workdir's config section)
  field by field; returns it as a dict."""
  if not isinstance(model, dict):
    raise error(f"{where}: 'model' must be an object, got {_show(model)}")
  for key, value in model.items():
    if key not in FIELDS:
      raise error(
        f"{where}: unknown model field {key!r}; known: {', '.join(FIELDS)}"
      )
    ok, valid = FIELDS[key]
    if not ok(value):
      raise error(f"{where}: model.{key} = {_show(value)} must be {valid}")
  return model


def diffusion_config(config) -> dict:
  """The diffusion section as model.json records it, from a run config
  (a missing field is None, for ``check_diffusion`` to name)."""
  d = config.diffusion
  return {"schedule": d.get("schedule"), "timesteps": d.get("timesteps")}


def check_diffusion(diffusion, where: str, error) -> dict:
  if not isinstance(diffusion, dict):
    raise error(f"{where}: 'diffusion' must be an object")
  for key in diffusion:
    if key not in ("schedule", "timesteps"):
      raise error(
        f"{where}: unknown diffusion field {key!r}; known: schedule, timesteps"
      )
  s, t = diffusion.get("schedule"), diffusion.get("timesteps")
  if s not in SCHEDULES:
    raise error(
      f"{where}: diffusion.schedule = {_show(s)} must be one of {SCHEDULES}"
    )
  if not (_is_int(t) and 1 <= t <= MAX_TIMESTEPS):
    raise error(
      f"{where}: diffusion.timesteps = {_show(t)} must be an integer in "
      f"[1, {MAX_TIMESTEPS:,}]"
    )
  return diffusion


def check_meta(meta, where: str, error) -> dict:
  """model.json's content (``where``: its path)."""
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise error(f"{where}: not a cdc_jax model description")
  version = meta.get("version")
  if not _is_int(version):
    raise error(f"{where}: version = {_show(version)} is not an integer")
  if version > VERSION:
    raise error(
      f"{where}: model format v{version} is newer than this cdc_jax reads "
      f"(v{VERSION}); upgrade cdc_jax"
    )
  if version < 1:
    raise error(f"{where}: version = {version} is not a model format")
  for key in ("model", "diffusion", "fingerprint"):
    if key not in meta:
      raise error(f"{where}: the key {key!r} is missing")
  unknown = sorted(set(meta) - META_KEYS)
  if unknown:
    raise error(f"{where}: unknown key {unknown[0]!r}")
  fp = meta["fingerprint"]
  if not (isinstance(fp, str) and _HEX64.fullmatch(fp)):
    raise error(f"{where}: the fingerprint is not 64 hex digits")
  if not isinstance(meta.get("source", ""), str):
    raise error(f"{where}: 'source' must be a string")
  check_model(meta["model"], where, error)
  check_diffusion(meta["diffusion"], where, error)
  if "distilled" in meta:
    timesteps = meta["diffusion"]["timesteps"]
    check_distilled(meta["distilled"], timesteps, where, error)
  return meta


def check_distilled(d, timesteps: int, where: str, error) -> dict:
  """A distilled student's decoder (``cdc_jax.samplers.Student``) and the
  bitstream fingerprint of its teacher."""
  from cdc_jax.distill_target import PARAMETERISATIONS

  if not isinstance(d, dict) or sorted(d) != sorted(DISTILLED_KEYS):
    raise error(
      f"{where}: 'distilled' must hold exactly {', '.join(DISTILLED_KEYS)}"
    )
  base, steps = d["base_steps"], d["steps"]
  if not _int_in(2, timesteps)(base):
    raise error(
      f"{where}: distilled.base_steps = {_show(base)} must be an integer in "
      f"[2, {timesteps}]"
    )
  if not (_int_in(1, base)(steps) and base % steps == 0):
    raise error(
      f"{where}: distilled.steps = {_show(steps)} must divide base_steps "
      f"({base})"
    )
  ratio = base // steps
  if ratio < 2 or ratio & (ratio - 1):
    raise error(
      f"{where}: distilled base_steps / steps = {ratio} is not a power of "
      "two >= 2 (each round halves the steps)"
    )
  if d["parameterisation"] not in PARAMETERISATIONS:
    raise error(
      f"{where}: distilled.parameterisation = {_show(d['parameterisation'])} "
      f"must be one of {', '.join(PARAMETERISATIONS)}"
    )
  fp = d["teacher_bitstream"]
  if not (isinstance(fp, str) and _HEX32.fullmatch(fp)):
    raise error(f"{where}: distilled.teacher_bitstream is not 32 hex digits")
  return d


def _show(value) -> str:
  text = json.dumps(value) if _jsonable(value) else repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _jsonable(value) -> bool:
  try:
    json.dumps(value)
  except (TypeError, ValueError):
    return False
  return True


# -- params --------------------------------------------------------------------


def expected_params(model_config: dict, where: str, error) -> dict:
  """Flat param name -> shape of the model (nothing allocated)."""
  key = json.dumps(model_config, sort_keys=True)
  try:
    shapes = _shapes(key)
  except (ValueError, TypeError) as e:  # fields that do not fit together
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise error(
      f"{where}: the model fields do not fit together ({msg})"
    ) from None
  n = sum(math.prod(s) for s in shapes.values())
  if n > MAX_PARAMS:
    raise error(
      f"{where}: the model would have {n:,} parameters, more than "
      f"{MAX_PARAMS:,}; lower model.dim or its multipliers"
    )
  return shapes


@functools.lru_cache(maxsize=8)
def _shapes(model_json: str) -> dict:
  import jax

  model = cdc.from_config(json.loads(model_json))
  tree = jax.eval_shape(lambda: cdc.init_params(model, jax.random.key(0)))
  return _flat_shapes(tree)


def _flat_shapes(tree, prefix: str = "") -> dict[str, tuple[int, ...]]:
  """{"a/b/c": shape} of a nested dict of arrays (as ``model_dir.flatten``
  names them)."""
  out = {}
  for k in sorted(tree):
    key = f"{prefix}/{k}" if prefix else str(k)
    v = tree[k]
    if hasattr(v, "items"):
      out.update(_flat_shapes(dict(v), key))
    else:
      out[key] = tuple(v.shape)
  return out


def check_param_headers(path: str, found: dict[str, Member], shapes, error):
  """``params.npz``'s members (``npz.headers``) against the model's."""
  missing = sorted(set(shapes) - set(found))
  extra = sorted(set(found) - set(shapes))
  if missing or extra:
    which = f"missing {missing[0]!r}" if missing else f"extra {extra[0]!r}"
    raise error(
      f"{path}: the parameters do not fit model.json's model ({which}; "
      f"{len(missing)} missing, {len(extra)} extra)"
    )
  for k, shape in shapes.items():
    m = found[k]
    if m.shape != shape or m.dtype != np.float32:
      raise error(
        f"{path}: {k} is {m.dtype} {m.shape}, model.json's model needs "
        f"float32 {shape}"
      )


def check_finite(
  path: str, flat: dict[str, np.ndarray], error, fix="re-export the model"
) -> None:
  """No NaN or inf in any of ``flat``'s arrays."""
  for k, v in flat.items():
    if not np.all(np.isfinite(v)):
      bad = "NaN" if np.any(np.isnan(v)) else "inf"
      raise error(f"{path}: parameter {k} contains {bad}; {fix}")


# -- entropy tables ------------------------------------------------------------

TABLE_KEYS = ("counts", "lengths", "offsets", "precision_bits")


def check_table_headers(path: str, found: dict[str, Member], z_channels, error):
  """``entropy_tables.npz``'s members from their headers."""
  want = {p + k for p in ("z_", "y_") for k in TABLE_KEYS} | {"y_scale_table"}
  if set(found) != want:
    odd = sorted(set(found) ^ want)[0]
    what = "missing" if odd in want else "unexpected"
    raise error(f"{path}: {what} member {odd!r}; re-export the model")
  n_y = found["y_scale_table"].shape
  if len(n_y) != 1 or not 2 <= n_y[0] <= MAX_TABLES:
    raise error(f"{path}: y_scale_table has shape {n_y}, not [2..{MAX_TABLES}]")
  for prefix, n in (("z_", z_channels), ("y_", n_y[0])):
    counts = found[prefix + "counts"]
    if len(counts.shape) != 2 or counts.shape[0] != n:
      raise error(
        f"{path}: {prefix}counts has shape {counts.shape}, expected ({n}, L)"
      )
    if not 2 <= counts.shape[1] <= MAX_TABLE_LEN:
      raise error(f"{path}: {prefix}counts rows of {counts.shape[1]} bins")
    for k, shape in (
      ("lengths", (n,)),
      ("offsets", (n,)),
      ("precision_bits", ()),
    ):
      m = found[prefix + k]
      if m.shape != shape or m.dtype.kind not in "iu":
        raise error(
          f"{path}: {prefix}{k} is {m.dtype} {m.shape}, expected integers "
          f"{shape}"
        )
    if counts.dtype.kind not in "iu":
      raise error(f"{path}: {prefix}counts is {counts.dtype}, not integers")


def check_tables(path: str, arrays: dict[str, np.ndarray], error) -> None:
  """The tables' values: what ``coding.tables.TableSet`` accepts, and a
  finite, positive, strictly increasing scale table."""
  for prefix in ("z_", "y_"):
    try:
      coding_tables.TableSet.from_arrays(arrays, prefix)
    except (ValueError, TypeError, OverflowError) as e:
      raise error(f"{path}: the {prefix[0]} tables are invalid ({e})") from None
  s = np.asarray(arrays["y_scale_table"])
  if s.dtype.kind != "f" or not np.all(np.isfinite(s)) or not np.all(s > 0):
    raise error(f"{path}: y_scale_table must be finite positive floats")
  if not np.all(np.diff(s) > 0):
    raise error(f"{path}: y_scale_table is not strictly increasing")
