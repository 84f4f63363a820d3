"""The mapping tables: torch state_dict keys -> Flax param paths.

``mapping_table(model_config)`` generates one ``Row`` per tensor of a CDC
model from its architecture, in torch module registration order (U-Net,
then context model), so the torch keys come out in the released
state_dict order. ``checked_table`` pairs the rows with the Flax leaf
shapes of ``init_params(from_config(model_config))`` and asserts that the
two agree. ``lpips_table`` is the same for the LPIPS-VGG weights that
rho > 0 checkpoints carry under ``loss_fn_vgg.``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any

import jax

from cdc_jax.convert.errors import listing
from cdc_jax.convert.transforms import (
  CHANNELS,
  CONV,
  CONV_T,
  LINEAR,
  PRIOR_MATRIX,
  PRIOR_VECTOR,
  SAME,
  Row,
)
from cdc_jax.models.cdc import from_config, init_params, to_config

LPIPS_PREFIX = "loss_fn_vgg."

# -- row builders, one per torch module kind ---------------------------------


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


# -- the CDC model -----------------------------------------------------------


def _widths(cfg: Mapping[str, Any]):
  """Channel bookkeeping of the context model (docs/model.md §3.1)."""
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


def _prior_rows(t: str, f: str) -> Iterator[Row]:
  """FlexiblePrior (torch) -> FactorizedPrior: chain 1-3-3-3-1
  (docs/model.md §4.3)."""
  yield Row(f"{t}._medians", f"{f}/medians", CHANNELS)
  for k in range(4):
    p = f"{t}.affine.{k}"
    yield Row(f"{p}.weight", f"{f}/affine_{k}_weight", PRIOR_MATRIX)
    yield Row(f"{p}.bias", f"{f}/affine_{k}_bias", PRIOR_VECTOR)
  for k in range(3):
    yield Row(f"{t}.a.{k}", f"{f}/a_{k}", PRIOR_VECTOR)


def _context_model_rows(cfg: Mapping[str, Any], widths) -> Iterator[Row]:
  dims, rdims, hdims, _ = widths
  t, f = "context_fn", "context_fn"
  yield from _prior_rows(f"{t}.prior", f"{f}/prior")
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


def mapping_table(model_config) -> list[Row]:
  """Every (torch key, Flax path, transform) of a CDC model, in torch order.

  ``model_config`` holds the ``CDC`` kwargs (a dict as in ``model.json``,
  a config section or a ``CDC``; read through ``to_config``).
  """
  cfg = to_config(model_config)
  widths = _widths(cfg)
  rows = [*_unet_rows(cfg, widths[3])]
  rows += _context_model_rows(cfg, widths)
  return rows


def param_shapes(model_config) -> dict[str, tuple[int, ...]]:
  """Flax leaf path ("a/b/c") -> shape, from ``jax.eval_shape`` of the init."""
  cfg = to_config(model_config)
  return dict(_param_shapes(json.dumps(cfg, sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _param_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
  model = from_config(json.loads(config_json))
  tree = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  return {
    "/".join(str(k.key) for k in path): tuple(v.shape)
    for path, v in jax.tree.leaves_with_path(tree)
  }


def checked_table(model_config) -> list[tuple[Row, tuple[int, ...]]]:
  """``mapping_table`` rows paired with their Flax leaf shapes.

  Asserts that the table and the Flax model agree: every leaf of the
  model's param tree is filled by exactly one row and every torch key
  appears once (a mismatch is a bug in cdc_jax, not in the checkpoint).
  """
  rows = mapping_table(model_config)
  shapes = param_shapes(model_config)
  flax_paths = [r.flax_path for r in rows]
  torch_keys = [r.torch_key for r in rows]
  dup = {p for p in flax_paths if flax_paths.count(p) > 1}
  dup |= {k for k in torch_keys if torch_keys.count(k) > 1}
  unfilled = sorted(set(shapes) - set(flax_paths))
  unknown = sorted(set(flax_paths) - set(shapes))
  if dup or unfilled or unknown:
    raise AssertionError(
      "cdc_jax.convert.tables.mapping_table disagrees with the Flax model: "
      f"duplicates {listing(sorted(dup))}, unfilled leaves "
      f"{listing(unfilled)}, unknown paths {listing(unknown)}"
    )
  return [(r, shapes[r.flax_path]) for r in rows]


# -- LPIPS-VGG (rho > 0 checkpoints) -------------------------------------------

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


def lpips_table() -> list[tuple[Row, tuple[int, ...]]]:
  """Rows and Flax shapes of the LPIPS-VGG weights (``lpips_vgg.npz``).

  Names in the npz: ``scaling_layer/{shift,scale}`` (3,),
  ``features_{k}/{kernel,bias}`` (torchvision VGG16 ``features[k]``, HWIO),
  ``lin_{i}/kernel`` (1, 1, C, 1), the bias-free 1x1 convs of LPIPS.
  The checkpoint's ``lins.{i}`` aliases of ``lin{i}`` are not rows (see
  ``lpips_aliases``).
  """
  p = LPIPS_PREFIX
  out = []
  for name in ("shift", "scale"):
    row = Row(f"{p}scaling_layer.{name}", f"scaling_layer/{name}", CHANNELS)
    out.append((row, (3,)))
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


def lpips_aliases() -> dict[str, str]:
  """LPIPS's ``lins.{i}`` keys -> the ``lin{i}`` keys they duplicate."""
  p = LPIPS_PREFIX
  return {
    f"{p}lins.{i}.model.1.weight": f"{p}lin{i}.model.1.weight"
    for i in range(len(_LPIPS_WIDTHS))
  }
