"""The conditional U-Net ("denoise_fn") of CDC (docs/model.md §5).

Data flow for the released configs (dim 64, mults 1..6, 4 context maps)::

  t [B,1] -> time_mlp (Linear 1->256, exact GELU, Linear 256->64) -> temb
  level l = 0..5:  x = concat(x, context[l]) if l < 4
                   x = Resnet(x, temb); x = Resnet(x, temb); x = x + Attn(LN x)
                   skip h_l = x; x = Downsample(x) (not at l = 5)
  mid:             Resnet, Attn, Resnet at H/32
  up j = 0..4:     x = concat(x, h_{5-j}); Resnet; Resnet; Attn; Upsample
  out:             LayerNorm -> Conv 7x7 -> [B,H,W,3]   (h_0 is never used)

Mixed precision: with ``dtype=bfloat16`` the blocks compute in bf16 (see
``layers``); the time MLP and the LayerNorm statistics stay float32 and the
output is cast back to float32, so the diffusion loss and the DDIM update
never see bf16. ``remat=True`` wraps every ResnetBlock and attention block
in ``nn.remat``: their activations are recomputed in the backward pass
instead of stored (same params, same values, less memory, more FLOPs).

Submodule names mirror torch (``downs.0.2.fn.fn.to_qkv`` ->
``downs_0_2/to_qkv``; ``final_conv.0`` -> ``final_conv_0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdc_jax.models import layers


class Unet(nn.Module):
  """Conditional U-Net; returns eps-hat (eps family) or x0-hat (x family)."""

  dim: int = 64
  dim_mults: Sequence[int] = (1, 2, 3, 4, 5, 6)
  context_dim_mults: Sequence[int] = (1, 2, 3, 4)
  channels: int = 3
  context_channels: int = 3
  out_dim: int | None = None
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, time, context):
    """x [B,H,W,C], time [B,1] float, context: list of NHWC maps."""
    d, dt = self.dim, self.dtype
    resnet, attn = layers.ResnetBlock, layers.LinearAttention
    if self.remat:
      resnet, attn = nn.remat(resnet), nn.remat(attn)
    dims = [self.channels, *(d * m for m in self.dim_mults)]
    in_out = list(zip(dims[:-1], dims[1:], strict=True))
    n_levels = len(in_out)
    n_ctx = len(self.context_dim_mults)
    if len(context) != n_ctx:
      raise ValueError(f"expected {n_ctx} context maps, got {len(context)}")

    t = layers.Dense(4 * d, name="time_mlp_0")(time.astype(jnp.float32))
    t = jax.nn.gelu(t, approximate=False)
    temb = layers.Dense(d, name="time_mlp_2")(t)

    x = x.astype(dt)
    skips = []
    for lvl, (_, dout) in enumerate(in_out):
      if lvl < n_ctx:
        x = jnp.concatenate([x, context[lvl].astype(dt)], axis=-1)
      x = resnet(dout, large=lvl == 0, dtype=dt, name=f"downs_{lvl}_0")(x, temb)
      x = resnet(dout, dtype=dt, name=f"downs_{lvl}_1")(x, temb)
      x = attn(dtype=dt, name=f"downs_{lvl}_2")(x)
      skips.append(x)
      if lvl < n_levels - 1:
        x = layers.Downsample(dout, dtype=dt, name=f"downs_{lvl}_3")(x)

    mid = dims[-1]
    x = resnet(mid, dtype=dt, name="mid_block1")(x, temb)
    x = attn(dtype=dt, name="mid_attn")(x)
    x = resnet(mid, dtype=dt, name="mid_block2")(x, temb)

    for j, (din, _) in enumerate(reversed(in_out[1:])):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = resnet(din, dtype=dt, name=f"ups_{j}_0")(x, temb)
      x = resnet(din, dtype=dt, name=f"ups_{j}_1")(x, temb)
      x = attn(dtype=dt, name=f"ups_{j}_2")(x)
      # The original's is_last test never fires: every up stage upsamples.
      x = layers.Upsample(din, dtype=dt, name=f"ups_{j}_3")(x)

    x = layers.LayerNorm(name="final_conv_0")(x)
    out = self.out_dim or self.channels
    x = layers.Conv(out, 7, padding=3, dtype=dt, name="final_conv_1")(x)
    return x.astype(jnp.float32)
