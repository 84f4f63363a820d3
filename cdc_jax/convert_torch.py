"""Released PyTorch CDC checkpoints -> cdc_jax model directories.

Usage::

  python -m cdc_jax.convert_torch CHECKPOINT.pt OUTPUT_DIR [--family eps|x]
      [--ema | --no-ema]

The released files (spec §9) are ``{"step", "model"}`` (eps family) or
``{"step", "model", "ema"}`` (x family, EMA weights under ``ema_model.``).
The converter

1. loads the file with ``torch.load(weights_only=True)`` (torch is only
   needed here: ``pip install -r requirements-torch.txt``),
2. picks the state dict (EMA weights when present and ``--ema``),
3. detects the family from the keys and infers the model config from the
   tensor shapes, so other widths/depths of the same architecture convert,
4. checks the ``train_*`` schedule buffers against
   ``cdc_jax.diffusion.reference_buffers``,
5. maps every tensor through one table, ``mapping_table(model_config)``:
   rows (torch key, Flax path, transform) generated from the architecture,
   checked against ``jax.eval_shape`` of the model's init (every source
   tensor used once, every Flax leaf filled once, every shape as expected),
6. writes a model directory with ``cdc_jax.checkpoint.export_model``
   (params and the codec's entropy tables, ``cdc_jax.codec``) plus, for
   LPIPS-trained (rho > 0) checkpoints, ``lpips_vgg.npz`` with the LPIPS-VGG
   weights in NHWC/HWIO layout (see ``lpips_table``).

``to_torch_state_dict`` is the inverse (Flax params -> the released key set,
schedule buffers included), used by the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from cdc_jax import checkpoint, diffusion

LPIPS_FILE = "lpips_vgg.npz"
# The released diffusion settings per family (spec §0).
RELEASE_DIFFUSION = {
  "eps": {"schedule": "linear", "timesteps": 20000},
  "x": {"schedule": "cosine", "timesteps": 8193},
}
_LPIPS_PREFIX = "loss_fn_vgg."
_BUFFER_PREFIX = "train_"
_EMA_PREFIX = "ema_model."
_EMA_BOOKKEEPING = ("initted", "step")
_EMA_ONLINE_PREFIX = "online_model."
_MAX_LISTED = 8


class ConversionError(ValueError):
  """The input is not a (consistent) CDC checkpoint; the message says why."""


# -- tensor transforms ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
  """A layout change between a torch tensor and a Flax leaf.

  ``to_flax`` / ``to_torch`` convert arrays; ``torch_shape`` gives the torch
  shape that a Flax leaf of a given shape comes from.
  """

  name: str
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]
  torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


# nn.Conv2d weight (O, I, kh, kw) <-> kernel (kh, kw, I, O).
CONV = Transform(
  "conv",
  lambda w: w.transpose(2, 3, 1, 0),
  lambda k: k.transpose(3, 2, 0, 1),
  lambda s: (s[3], s[2], s[0], s[1]),
)
# nn.ConvTranspose2d weight (I, O, kh, kw) <-> spatially flipped HWIO kernel
# (layers.ConvTranspose runs a stride-1 conv over the dilated input).
CONV_T = Transform(
  "conv_transpose",
  lambda w: w.transpose(2, 3, 0, 1)[::-1, ::-1],
  lambda k: k[::-1, ::-1].transpose(2, 3, 0, 1),
  lambda s: (s[2], s[3], s[0], s[1]),
)
# nn.Linear weight (out, in) <-> Dense kernel (in, out).
LINEAR = Transform("linear", lambda w: w.T, lambda k: k.T, lambda s: s[::-1])
# Biases: unchanged.
SAME = Transform("same", lambda w: w, lambda k: k, lambda s: s)
# LayerNorm g/b and the prior's _medians: (1, C, 1, 1) <-> (C,).
CHANNELS = Transform(
  "channels",
  lambda w: w.reshape(-1),
  lambda k: k.reshape(1, -1, 1, 1),
  lambda s: (1, s[0], 1, 1),
)
# FlexiblePrior affine weight: (C, 1, 1, in, out) <-> (C, in, out).
PRIOR_MATRIX = Transform(
  "prior_matrix",
  lambda w: w.reshape(w.shape[0], w.shape[3], w.shape[4]),
  lambda k: k.reshape(k.shape[0], 1, 1, k.shape[1], k.shape[2]),
  lambda s: (s[0], 1, 1, s[1], s[2]),
)
# FlexiblePrior affine bias and factor a: (C, 1, 1, 1, out) <-> (C, out).
PRIOR_VECTOR = Transform(
  "prior_vector",
  lambda w: w.reshape(w.shape[0], w.shape[4]),
  lambda k: k.reshape(k.shape[0], 1, 1, 1, k.shape[1]),
  lambda s: (s[0], 1, 1, 1, s[1]),
)


@dataclasses.dataclass(frozen=True)
class Row:
  """One tensor: torch state_dict key, Flax param path, layout transform."""

  torch_key: str
  flax_path: str
  transform: Transform


# -- the mapping table ---------------------------------------------------------


def _conv(t: str, f: str, bias: bool = True) -> Iterator[Row]:
  yield Row(f"{t}.weight", f"{f}/kernel", CONV)
  if bias:
    yield Row(f"{t}.bias", f"{f}/bias", SAME)


def _conv_t(t: str, f: str) -> Iterator[Row]:
  yield Row(f"{t}.weight", f"{f}/kernel", CONV_T)
  yield Row(f"{t}.bias", f"{f}/bias", SAME)


def _linear(t: str, f: str) -> Iterator[Row]:
  yield Row(f"{t}.weight", f"{f}/kernel", LINEAR)
  yield Row(f"{t}.bias", f"{f}/bias", SAME)


def _norm(t: str, f: str) -> Iterator[Row]:
  yield Row(f"{t}.g", f"{f}/scale", CHANNELS)
  yield Row(f"{t}.b", f"{f}/bias", CHANNELS)


def _resnet(t: str, f: str, din: int, dout: int, temb: bool) -> Iterator[Row]:
  """ResnetBlock: [mlp.1], block1 (conv, LN), block2 (conv, LN), [res_conv]."""
  if temb:
    yield from _linear(f"{t}.mlp.1", f"{f}/mlp_1")
  for blk in ("block1", "block2"):
    yield from _conv(f"{t}.{blk}.block.0", f"{f}/{blk}/conv")
    yield from _norm(f"{t}.{blk}.block.1", f"{f}/{blk}/norm")
  if din != dout:
    yield from _conv(f"{t}.res_conv", f"{f}/res_conv")


def _attention(t: str, f: str) -> Iterator[Row]:
  """Residual(PreNorm(LinearAttention)): torch ``t.fn.{fn,norm}`` -> ``f``."""
  yield from _conv(f"{t}.fn.fn.to_qkv", f"{f}/to_qkv", bias=False)
  yield from _conv(f"{t}.fn.fn.to_out", f"{f}/to_out")
  yield from _norm(f"{t}.fn.norm", f"{f}/norm")


def _widths(cfg: Mapping[str, Any]):
  """Channel bookkeeping of the compressor (spec §4.1)."""
  d = cfg["dim"]
  dims = [cfg["channels"], *(d * m for m in cfg["context_dim_mults"])]
  if cfg["family"] == "eps":
    rdims = list(reversed([cfg["context_channels"], *dims[1:]]))
  else:
    rdims = [*(d * m for m in cfg["reverse_context_dim_mults"])]
    rdims.append(cfg["context_channels"])
  hdims = [dims[-1], *(d * m for m in cfg["hyper_dims_mults"])]
  # Context maps c0 (full resolution) ... c_{n-1}: decoder outputs reversed.
  context = rdims[1:][::-1]
  return dims, rdims, hdims, context


def _unet_rows(cfg: Mapping[str, Any], context: list[int]) -> Iterator[Row]:
  d = cfg["dim"]
  dims = [cfg["channels"], *(d * m for m in cfg["dim_mults"])]
  in_out = list(zip(dims[:-1], dims[1:], strict=True))
  t, f = "denoise_fn", "denoise_fn"
  yield from _linear(f"{t}.time_mlp.0", f"{f}/time_mlp_0")
  yield from _linear(f"{t}.time_mlp.2", f"{f}/time_mlp_2")
  for lvl, (din, dout) in enumerate(in_out):
    cin = din + (context[lvl] if lvl < len(context) else 0)
    tl, fl = f"{t}.downs.{lvl}", f"{f}/downs_{lvl}"
    yield from _resnet(f"{tl}.0", f"{fl}_0", cin, dout, temb=True)
    yield from _resnet(f"{tl}.1", f"{fl}_1", dout, dout, temb=True)
    yield from _attention(f"{tl}.2", f"{fl}_2")
    if lvl < len(in_out) - 1:
      yield from _conv(f"{tl}.3.conv", f"{fl}_3/conv")
  for j, (din, dout) in enumerate(reversed(in_out[1:])):
    tj, fj = f"{t}.ups.{j}", f"{f}/ups_{j}"
    yield from _resnet(f"{tj}.0", f"{fj}_0", 2 * dout, din, temb=True)
    yield from _resnet(f"{tj}.1", f"{fj}_1", din, din, temb=True)
    yield from _attention(f"{tj}.2", f"{fj}_2")
    yield from _conv_t(f"{tj}.3.conv", f"{fj}_3/conv")
  # torch registers the middle blocks after the up path.
  mid = dims[-1]
  yield from _resnet(f"{t}.mid_block1", f"{f}/mid_block1", mid, mid, True)
  yield from _attention(f"{t}.mid_attn", f"{f}/mid_attn")
  yield from _resnet(f"{t}.mid_block2", f"{f}/mid_block2", mid, mid, True)
  yield from _norm(f"{t}.final_conv.0", f"{f}/final_conv_0")
  yield from _conv(f"{t}.final_conv.1", f"{f}/final_conv_1")


def _compressor_rows(cfg: Mapping[str, Any], widths) -> Iterator[Row]:
  dims, rdims, hdims, _ = widths
  t, f = "context_fn", "context_fn"
  # FlexiblePrior: chain 1-3-3-3-1 (spec §4.6).
  yield Row(f"{t}.prior._medians", f"{f}/prior/medians", CHANNELS)
  for k in range(4):
    p = f"{t}.prior.affine.{k}"
    yield Row(f"{p}.weight", f"{f}/prior/affine_{k}_weight", PRIOR_MATRIX)
    yield Row(f"{p}.bias", f"{f}/prior/affine_{k}_bias", PRIOR_VECTOR)
  for k in range(3):
    yield Row(f"{t}.prior.a.{k}", f"{f}/prior/a_{k}", PRIOR_VECTOR)
  # eps (BigCompressor) keeps an Identity VBR slot at index 1.
  slot = 2 if cfg["family"] == "eps" else 1
  for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
    ti, fi = f"{t}.enc.{i}", f"{f}/enc_{i}"
    yield from _resnet(f"{ti}.0", f"{fi}_0", din, dout, temb=False)
    yield from _conv(f"{ti}.{slot}.conv", f"{fi}_{slot}/conv")
  n = len(rdims) - 1
  for i, (din, dout) in enumerate(zip(rdims[:-1], rdims[1:], strict=True)):
    ti, fi = f"{t}.dec.{i}", f"{f}/dec_{i}"
    res_out = din if i == n - 1 else dout  # the last block keeps its width
    yield from _resnet(f"{ti}.0", f"{fi}_0", din, res_out, temb=False)
    yield from _conv_t(f"{ti}.{slot}.conv", f"{fi}_{slot}/conv")
  for i in range(len(hdims) - 1):
    yield from _conv(f"{t}.hyper_enc.{i}.0", f"{f}/hyper_enc_{i}_0")
  for i in range(len(hdims) - 1):
    last = i == len(hdims) - 2  # the last hyper-decoder layer is a 3x3 conv
    rows = _conv if last else _conv_t
    yield from rows(f"{t}.hyper_dec.{i}.0", f"{f}/hyper_dec_{i}_0")


def mapping_table(model_config: Mapping[str, Any]) -> list[Row]:
  """Every (torch key, Flax path, transform) of a CDC model, in torch order.

  ``model_config`` holds the ``CDC`` kwargs (JSON-able: lists, strings,
  numbers; as in ``model.json``). The rows follow the torch
  module registration order (U-Net, then compressor), so the torch keys come
  out in the released state_dict order.
  """
  widths = _widths(model_config)
  rows = [*_unet_rows(model_config, widths[3])]
  rows += _compressor_rows(model_config, widths)
  return rows


def _param_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple]:
  """Flax leaf path -> shape, from ``jax.eval_shape`` of the model init."""
  return dict(_param_shapes_cached(json.dumps(model_config, sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _param_shapes_cached(config_json: str) -> dict[str, tuple]:
  import jax
  import jax.numpy as jnp

  from cdc_jax.models.cdc import CDC

  model_config = json.loads(config_json)
  model = CDC(**model_config)
  c = model_config["channels"]
  x = jnp.zeros((1, 64, 64, c), jnp.float32)
  time = jnp.zeros((1, 1), jnp.float32)
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), x, time))
  leaves = jax.tree_util.tree_leaves_with_path(tree["params"])
  return {
    "/".join(str(k.key) for k in path): tuple(v.shape) for path, v in leaves
  }


def checked_table(model_config: Mapping[str, Any]) -> list[tuple[Row, tuple]]:
  """``mapping_table`` rows paired with their Flax leaf shapes.

  Asserts that the table and the Flax model agree: every leaf of the
  model's param tree is filled by exactly one row and every torch key
  appears once (a mismatch is a bug in cdc_jax, not in the checkpoint).
  """
  rows = mapping_table(model_config)
  shapes = _param_shapes(model_config)
  flax_paths = [r.flax_path for r in rows]
  torch_keys = [r.torch_key for r in rows]
  dup = {p for p in flax_paths if flax_paths.count(p) > 1}
  dup |= {k for k in torch_keys if torch_keys.count(k) > 1}
  unfilled = sorted(set(shapes) - set(flax_paths))
  unknown = sorted(set(flax_paths) - set(shapes))
  if dup or unfilled or unknown:
    raise AssertionError(
      "convert_torch.mapping_table disagrees with the Flax model: "
      f"duplicates {_listing(sorted(dup))}, unfilled leaves "
      f"{_listing(unfilled)}, unknown paths {_listing(unknown)}"
    )
  return [(r, shapes[r.flax_path]) for r in rows]


# -- LPIPS-VGG (rho > 0 checkpoints) ------------------------------------------

# torchvision VGG16 `features` convs as (LPIPS slice, index, in, out); the
# slices 1..5 end at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG_CONVS = (
  (1, 0, 3, 64),
  (1, 2, 64, 64),
  (2, 5, 64, 128),
  (2, 7, 128, 128),
  (3, 10, 128, 256),
  (3, 12, 256, 256),
  (3, 14, 256, 256),
  (4, 17, 256, 512),
  (4, 19, 512, 512),
  (4, 21, 512, 512),
  (5, 24, 512, 512),
  (5, 26, 512, 512),
  (5, 28, 512, 512),
)
_LPIPS_WIDTHS = (64, 128, 256, 512, 512)


def lpips_table() -> list[tuple[Row, tuple]]:
  """Rows and Flax shapes of the LPIPS-VGG weights (``lpips_vgg.npz``).

  Names in the npz: ``scaling_layer/{shift,scale}`` (3,),
  ``features_{k}/{kernel,bias}`` (torchvision VGG16 ``features[k]``, HWIO),
  ``lin_{i}/kernel`` (1, 1, C, 1), the bias-free 1x1 convs of LPIPS.
  The checkpoint's ``lins.{i}`` aliases of ``lin{i}`` are checked equal.
  """
  p = _LPIPS_PREFIX
  out = []
  for name in ("shift", "scale"):
    out.append(
      (Row(f"{p}scaling_layer.{name}", f"scaling_layer/{name}", CHANNELS), (3,))
    )
  for s, k, cin, cout in _VGG_CONVS:
    t = f"{p}net.slice{s}.{k}"
    out.append(
      (Row(f"{t}.weight", f"features_{k}/kernel", CONV), (3, 3, cin, cout))
    )
    out.append((Row(f"{t}.bias", f"features_{k}/bias", SAME), (cout,)))
  for i, c in enumerate(_LPIPS_WIDTHS):
    row = Row(f"{p}lin{i}.model.1.weight", f"lin_{i}/kernel", CONV)
    out.append((row, (1, 1, c, 1)))
  return out


def _lpips_aliases() -> dict[str, str]:
  p = _LPIPS_PREFIX
  return {
    f"{p}lins.{i}.model.1.weight": f"{p}lin{i}.model.1.weight"
    for i in range(len(_LPIPS_WIDTHS))
  }


# -- reading checkpoints -------------------------------------------------------


def _listing(keys, limit: int = _MAX_LISTED) -> str:
  keys = list(keys)
  shown = ", ".join(keys[:limit])
  if len(keys) > limit:
    shown += f", ... ({len(keys) - limit} more)"
  return f"[{shown}]"


def _shape_of(v) -> tuple[int, ...] | None:
  shape = getattr(v, "shape", None)
  return None if shape is None else tuple(int(n) for n in shape)


def _to_numpy(v) -> np.ndarray:
  """torch.Tensor or array-like -> numpy (floating tensors as float32)."""
  if hasattr(v, "detach"):  # a torch tensor, without importing torch
    v = v.detach().cpu()
    if v.is_floating_point():
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def load_torch_checkpoint(path: str) -> Any:
  """``torch.load(path, map_location="cpu", weights_only=True)``."""
  try:
    import torch
  except ImportError:
    raise ConversionError(
      "converting PyTorch checkpoints needs torch: "
      "pip install -r requirements-torch.txt"
    ) from None
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many kinds
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ConversionError(
      f"{path}: not a PyTorch checkpoint readable with weights_only=True "
      f"({type(e).__name__}: {msg[:200]})"
    ) from None


def select_state_dict(ckpt: Any, use_ema: bool = True) -> tuple[dict, str]:
  """Picks the weights of a released checkpoint; returns (state, source).

  ``ckpt["ema"]``'s ``ema_model.*`` (prefix stripped) when ``use_ema`` and
  present, else ``ckpt["model"]``; a bare state dict (``denoise_fn.*``
  keys at the top level) is accepted as is. EMA bookkeeping (``initted``,
  ``step``, ``online_model.*``) is dropped.
  """
  if not isinstance(ckpt, Mapping):
    raise ConversionError(
      f"not a CDC checkpoint: expected a dict, got {type(ckpt).__name__}"
    )
  if any(str(k).startswith("denoise_fn.") for k in ckpt):
    return dict(ckpt), "state_dict"
  ema = ckpt.get("ema")
  if use_ema and isinstance(ema, Mapping):
    n = len(_EMA_PREFIX)
    state = {k[n:]: v for k, v in ema.items() if k.startswith(_EMA_PREFIX)}
    other = [
      k
      for k in ema
      if not k.startswith((_EMA_PREFIX, _EMA_ONLINE_PREFIX))
      and k not in _EMA_BOOKKEEPING
    ]
    if other:
      raise ConversionError(
        f"unexpected keys in the checkpoint's 'ema' dict: {_listing(other)}"
      )
    if state:
      return state, "ema"
  model = ckpt.get("model")
  if not isinstance(model, Mapping):
    raise ConversionError(
      "not a CDC checkpoint: no 'model' state dict (top-level keys: "
      f"{_listing(sorted(map(str, ckpt)))})"
    )
  return dict(model), "model"


# -- config inference ----------------------------------------------------------


def detect_family(keys) -> str:
  """'eps' or 'x' from the compressor's Downsample key (spec §9.4)."""
  keys = set(keys)
  eps = "context_fn.enc.0.2.conv.weight" in keys
  x = "context_fn.enc.0.1.conv.weight" in keys
  if eps == x:
    raise ConversionError(
      "cannot tell the model family: expected exactly one of "
      "context_fn.enc.0.2.conv.weight (eps) and "
      "context_fn.enc.0.1.conv.weight (x)"
    )
  family = "eps" if eps else "x"
  buffers = [k for k in keys if k.startswith(_BUFFER_PREFIX)]
  if buffers and (("train_snr" in keys) != (family == "x")):
    raise ConversionError(
      f"inconsistent checkpoint: {family}-family compressor keys, but "
      f"train_snr is {'present' if family == 'eps' else 'missing'}"
    )
  return family


def _mults(state: Mapping, pattern: str, axis: int, dim: int) -> list[int]:
  """Widths of ``pattern.format(i)`` for i = 0, 1, ... divided by dim."""
  out = []
  for i in itertools.count():
    key = pattern.format(i)
    if key not in state:
      break
    width = _shape(state, key)[axis]
    if width % dim:
      raise ConversionError(
        f"{key}: width {width} is not a multiple of dim = {dim}"
      )
    out.append(width // dim)
  if not out:
    raise ConversionError(f"missing key {pattern.format(0)}")
  return out


def _shape(state: Mapping, key: str) -> tuple[int, ...]:
  if key not in state:
    raise ConversionError(f"missing key {key} (needed to infer the config)")
  shape = _shape_of(state[key])
  if shape is None or len(shape) < 2:  # all keys read here are weights
    raise ConversionError(f"{key}: expected a weight tensor, got {shape}")
  return shape


def infer_model_config(state: Mapping, family: str) -> dict[str, Any]:
  """``CDC`` kwargs from the tensor shapes of a state dict (JSON-able).

  dim: ``time_mlp.2`` output width; dim_mults: ``downs.*.0`` output widths;
  context/hyper mults: the encoders' output widths; context_channels: the
  last context-decoder upsampling's output; x family: the decoder stages'
  input widths give ``reverse_context_dim_mults``.
  """
  u, c = "denoise_fn", "context_fn"
  dim = _shape(state, f"{u}.time_mlp.2.weight")[0]
  channels = _shape(state, f"{u}.final_conv.1.weight")[0]
  dim_mults = _mults(state, u + ".downs.{}.0.block1.block.0.weight", 0, dim)
  ctx_mults = _mults(state, c + ".enc.{}.0.block1.block.0.weight", 0, dim)
  hyper = _mults(state, c + ".hyper_enc.{}.0.weight", 0, dim)
  slot = 2 if family == "eps" else 1
  last = len(ctx_mults) - 1
  context_channels = _shape(state, f"{c}.dec.{last}.{slot}.conv.weight")[1]
  reverse = None
  if family == "x":
    reverse = _mults(state, c + ".dec.{}.0.block1.block.0.weight", 1, dim)
  return {
    "family": family,
    "dim": int(dim),
    "dim_mults": dim_mults,
    "context_dim_mults": ctx_mults,
    "reverse_context_dim_mults": reverse,
    "hyper_dims_mults": hyper,
    "context_channels": int(context_channels),
    "channels": int(channels),
    "dtype": "float32",
  }


def check_buffers(buffers: Mapping[str, np.ndarray], family: str) -> dict:
  """Checks ``train_*`` buffers; returns the diffusion config they imply.

  T is the buffer length (release default when there are none); the
  schedule is linear for eps, cosine for x.
  """
  kind = RELEASE_DIFFUSION[family]["schedule"]
  if not buffers:
    return dict(RELEASE_DIFFUSION[family])
  lengths = {k: int(np.shape(v)[0]) for k, v in buffers.items()}
  if len(set(lengths.values())) != 1:
    raise ConversionError(f"train_* buffers differ in length: {lengths}")
  timesteps = next(iter(lengths.values()))
  ref = diffusion.reference_buffers(kind, timesteps)
  missing = sorted(set(ref) - set(buffers))
  unexpected = sorted(set(buffers) - set(ref))
  if missing or unexpected:
    raise ConversionError(
      f"train_* buffers of a {family} checkpoint: missing "
      f"{_listing(missing)}, unexpected {_listing(unexpected)}"
    )
  for key, want in ref.items():
    got = np.asarray(buffers[key], np.float64)
    if not np.allclose(got, want, rtol=1e-5, atol=1e-12):
      err = np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30))
      raise ConversionError(
        f"{key} does not match the {kind} schedule with T={timesteps} "
        f"(max relative error {err:.3g}); not a released {family} model?"
      )
  return {"schedule": kind, "timesteps": timesteps}


# -- conversion ----------------------------------------------------------------


@dataclasses.dataclass
class Converted:
  """The result of a conversion (everything ``export_model`` needs)."""

  model_config: dict[str, Any]
  diffusion_config: dict[str, Any]
  params: dict
  lpips: dict[str, np.ndarray] | None
  source: str


def _apply_table(
  state: Mapping[str, Any], table: list[tuple[Row, tuple]], what: str
) -> dict[str, np.ndarray]:
  """Checks keys and shapes against the table, then converts every tensor."""
  missing = [r.torch_key for r, _ in table if r.torch_key not in state]
  wanted = {r.torch_key for r, _ in table}
  unexpected = [k for k in state if k not in wanted]
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} keys {_listing(missing)}")
    if unexpected:
      parts.append(f"unexpected {len(unexpected)} keys {_listing(unexpected)}")
    raise ConversionError(f"{what}: " + "; ".join(parts))
  bad = []
  for row, shape in table:
    want = row.transform.torch_shape(shape)
    got = _shape_of(state[row.torch_key])
    if got != want:
      bad.append(f"{row.torch_key}: expected {want}, got {got}")
  if bad:
    more = f"; ... ({len(bad) - 4} more)" if len(bad) > 4 else ""
    raise ConversionError(f"{what}: wrong shapes: " + "; ".join(bad[:4]) + more)
  out = {}
  for row, _ in table:
    a = _to_numpy(state[row.torch_key]).astype(np.float32)
    out[row.flax_path] = np.ascontiguousarray(row.transform.to_flax(a))
  return out


def convert_state_dict(
  state: Mapping[str, Any], family: str | None = None, source: str = ""
) -> Converted:
  """A CDC state dict (numpy arrays or torch tensors) -> ``Converted``.

  ``family`` ('eps' / 'x') is detected when None and checked when given.
  ``train_*`` buffers are checked against the schedule, ``loss_fn_vgg.*``
  (LPIPS) goes to ``Converted.lpips``; every other tensor must map to
  exactly one Flax leaf.
  """
  detected = detect_family(state)
  if family is not None and family != detected:
    raise ConversionError(
      f"--family {family} given, but the checkpoint is a {detected} model"
    )
  buffers = {
    k: _to_numpy(v) for k, v in state.items() if k.startswith(_BUFFER_PREFIX)
  }
  lpips_state = {k: v for k, v in state.items() if k.startswith(_LPIPS_PREFIX)}
  model_state = {
    k: v
    for k, v in state.items()
    if not k.startswith((_BUFFER_PREFIX, _LPIPS_PREFIX))
  }
  diffusion_config = check_buffers(buffers, detected)
  model_config = infer_model_config(model_state, detected)
  try:
    table = checked_table(model_config)
  except (ValueError, TypeError) as e:  # the model rejects the config
    raise ConversionError(f"inconsistent model shapes: {e}") from None
  flat = _apply_table(model_state, table, f"{detected} model")
  lpips = None
  if lpips_state:
    lpips = _convert_lpips(lpips_state)
  return Converted(
    model_config,
    diffusion_config,
    checkpoint.unflatten(flat),
    lpips,
    source,
  )


def _convert_lpips(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  state = dict(state)
  for alias, key in _lpips_aliases().items():
    if alias in state and key in state:
      a, b = _to_numpy(state.pop(alias)), _to_numpy(state[key])
      if a.shape != b.shape or not np.array_equal(a, b):
        raise ConversionError(f"{alias} differs from {key}")
  return _apply_table(state, lpips_table(), "LPIPS weights (loss_fn_vgg)")


def convert_checkpoint(
  ckpt: Any, family: str | None = None, use_ema: bool = True
) -> Converted:
  """A loaded checkpoint object (``torch.load`` result) -> ``Converted``."""
  state, source = select_state_dict(ckpt, use_ema)
  return convert_state_dict(state, family, source)


def entropy_tables(conv: Converted) -> dict[str, np.ndarray]:
  """The codec's integer coding tables for converted weights."""
  from cdc_jax import codec
  from cdc_jax.models.cdc import from_config

  return codec.build_entropy_tables(from_config(conv.model_config), conv.params)


def convert_file(
  path: str, out_dir: str, family: str | None = None, use_ema: bool = True
) -> tuple[Converted, str]:
  """Converts ``path`` into the model directory ``out_dir``.

  Returns the conversion and the model fingerprint. Writes
  ``OUTPUT_DIR/lpips_vgg.npz`` when the checkpoint has LPIPS weights.
  """
  conv = convert_checkpoint(load_torch_checkpoint(path), family, use_ema)
  desc = f"{os.path.basename(path)} ({conv.source} weights)"
  fp = checkpoint.export_model(
    out_dir,
    conv.model_config,
    conv.diffusion_config,
    conv.params,
    tables=entropy_tables(conv),
    source=f"convert_torch: {desc}",
  )
  if conv.lpips is not None:
    np.savez(os.path.join(out_dir, LPIPS_FILE), **conv.lpips)
  return conv, fp


# -- the inverse (tests, round trips) ------------------------------------------


def to_torch_state_dict(
  params, model_config: Mapping[str, Any], diffusion_config=None
) -> dict[str, np.ndarray]:
  """Flax params -> the released torch state_dict (numpy, released order).

  ``diffusion_config`` ({"schedule", "timesteps"}) defaults to the release
  of ``model_config["family"]``; its ``train_*`` buffers come first, as in
  the released files.
  """
  family = model_config["family"]
  dcfg = diffusion_config or RELEASE_DIFFUSION[family]
  buffers = diffusion.reference_buffers(dcfg["schedule"], dcfg["timesteps"])
  order = ["train_snr"] if "train_snr" in buffers else []
  order += [k for k in buffers if k != "train_snr"]
  out = {k: buffers[k] for k in order}
  flat = checkpoint.flatten(params)
  for row, shape in checked_table(model_config):
    a = np.asarray(flat[row.flax_path], np.float32)
    if a.shape != shape:
      raise ValueError(f"{row.flax_path}: expected {shape}, got {a.shape}")
    out[row.torch_key] = np.ascontiguousarray(row.transform.to_torch(a))
  return out


# -- CLI -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m cdc_jax.convert_torch",
    description=(
      "Convert a released PyTorch CDC checkpoint (buggyyang/CDC_compression"
      ", eps- or x-param) into a cdc_jax model directory (model.json, "
      "params.npz; lpips_vgg.npz when the checkpoint has LPIPS weights). "
      "Needs torch: pip install -r requirements-torch.txt"
    ),
  )
  p.add_argument("checkpoint", help="the .pt file")
  p.add_argument("output_dir", help="model directory to write (replaced)")
  p.add_argument(
    "--family",
    choices=("eps", "x"),
    default=None,
    help="expected model family; detected from the keys when omitted, "
    "an error when it disagrees",
  )
  p.add_argument(
    "--ema",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="use the EMA weights (ckpt['ema'], ema_model.*) when present, "
    "as the original x-param test does; --no-ema takes ckpt['model'] "
    "(default: --ema)",
  )
  return p


def main(argv: list[str] | None = None) -> int:
  """CLI entry; returns the exit status (2 on a conversion error)."""
  args = _parser().parse_args(argv)
  try:
    conv, fp = convert_file(
      args.checkpoint, args.output_dir, args.family, args.ema
    )
  except ConversionError as e:
    print(f"convert_torch: error: {e}", file=sys.stderr)
    return 2
  m, d = conv.model_config, conv.diffusion_config
  n = len(checkpoint.flatten(conv.params))
  print(
    f"converted {args.checkpoint} ({conv.source} weights): family "
    f"{m['family']}, dim {m['dim']}, {n} tensors, {d['schedule']} schedule "
    f"T={d['timesteps']}"
  )
  if conv.lpips is not None:
    print(f"LPIPS-VGG weights -> {os.path.join(args.output_dir, LPIPS_FILE)}")
  print(f"wrote {args.output_dir} (fingerprint {fp[:16]})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
