"""A process's shard of a data source, and the arguments the loaders check.

Both loaders (``loader.Loader``, ``grain_pipeline.GrainLoader``) take the
same arguments and read the same shard: item i goes to process
``i % process_count``; when there are fewer items than processes, a process
whose shard is empty reads every item (with a warning) rather than none.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Sources with at most this many items are decoded once and kept in
# memory by the loaders (their ``cache=None``).
CACHE_MAX_ITEMS = 64


def open_shard(
  source,
  batch_size: int,
  crop_size: int,
  process_index: int,
  count: int,
  cache: bool | None,
):
  """What both loaders set up first: the arguments checked
  (``check_args``), this process's shard (``process_shard``) and whether
  to keep decoded images (``cache``; None: small sources only). Returns
  (indices, label, cache)."""
  check_args(source, batch_size, crop_size, process_index, count)
  indices, label = process_shard(source, process_index, count)
  if cache is None:
    cache = len(source) <= CACHE_MAX_ITEMS
  return indices, label, cache


def check_args(
  source, batch_size: int, crop_size: int, process_index: int, count: int
) -> None:
  """``ValueError`` for arguments no loader can serve."""
  if batch_size < 1 or crop_size < 1:
    raise ValueError(
      f"batch_size and crop_size must be positive, got {batch_size} and "
      f"{crop_size}"
    )
  if not 0 <= process_index < count:
    raise ValueError(f"process_index {process_index} not in [0, {count})")
  if len(source) == 0:
    raise ValueError(f"{source!r} is empty")


def shard_indices(n_items: int, process_index: int, count: int) -> list[int]:
  """Items i with i % count == process_index, or all items if that leaves
  none (fewer items than processes)."""
  indices = list(range(process_index, n_items, count))
  return indices or list(range(n_items))


def process_shard(source, process_index: int, count: int):
  """(indices, label): this process's shard of ``source`` (a warning when
  it falls back to every item) and the name log lines give it."""
  if process_index >= len(source):  # its own shard is empty
    logger.warning(
      "%r has %d items, fewer than the %d processes; process %d reads all "
      "of them.",
      source,
      len(source),
      count,
      process_index,
    )
  label = repr(source)
  if count > 1:
    label += f" (process {process_index} of {count})"
  return shard_indices(len(source), process_index, count), label
