"""Decoding many files at once: ``decompress_many``.

Files of one padded size, step count and tile layout share a batch, as
many as the memory budget allows. This module imports ``cdc_jax.codec``
(the package does not import it back): call it as
``from cdc_jax.codec.many import decompress_many``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from cdc_jax import codec
from cdc_jax.codec import limits, tiling
from cdc_jax.codec.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_STEPS, Limits
from cdc_jax.sample import initial_noise


def decompress_many(
  cm: codec.CodecModel,
  blobs: Sequence[bytes],
  *,
  max_steps: int = DEFAULT_MAX_STEPS,
  max_pixels: int = DEFAULT_MAX_PIXELS,
  max_memory: float | None = None,
  progress=None,
) -> list:
  """Decodes files; files of one size, step count and tile layout share a
  batch, as many as the memory budget allows (limits and ``progress`` as
  in ``codec.decompress``; every file is checked before any is decoded;
  progress counts the steps of all batches).

  Faster than one by one on accelerators, but not bit-exact with
  ``decompress``: XLA may round a batch differently, so a pixel can differ
  by one level. ``decompress`` of one file is the reference, reproducible
  bit for bit on one platform.
  """
  lim = Limits(max_steps, max_pixels, max_memory)
  parsed = [codec.parse(cm, b, lim) for b in blobs]
  groups: dict = {}
  for i, (hdr, _) in enumerate(parsed):
    key = (codec.noise_shape(cm, hdr), hdr.steps, tiling.Layout.of(hdr))
    groups.setdefault(key, []).append(i)
  batches = []
  for members in groups.values():
    hdr = parsed[members[0]][0]
    n = limits.images_per_batch(
      cm.model, hdr.height, hdr.width, len(members), lim, tiling.tile_of(hdr)
    )
    batches += [members[k : k + n] for k in range(0, len(members), n)]
  total = sum(parsed[m[0]][0].steps for m in batches)
  out: list = [None] * len(blobs)
  done = 0
  for members in batches:
    report = None
    if progress is not None:
      report = functools.partial(_offset, progress, done, total)
    images = _decode_batch(cm, [parsed[i] for i in members], report)
    for i, img in zip(members, images, strict=True):
      out[i] = img
    done += parsed[members[0]][0].steps
  return out


def _offset(progress, before: int, total: int, done: int, _):
  progress(before + done, total)


def _decode_batch(cm: codec.CodecModel, parsed: list, progress) -> list:
  """(header, stream) pairs of one padded size, step count and tile
  layout -> images."""
  first = parsed[0][0]
  shape = codec.noise_shape(cm, first)
  y_hat = jnp.concatenate([codec.decode_latents(cm, *p) for p in parsed])
  x_init = jnp.concatenate(
    [initial_noise(h.seed, shape, h.gamma) for h, _ in parsed]
  )
  layout = tiling.Layout.of(first)
  x = tiling.run(cm, y_hat, x_init, first.steps, layout, progress)
  x = np.asarray(x)
  return [codec.to_image(x[j], h) for j, (h, _) in enumerate(parsed)]
