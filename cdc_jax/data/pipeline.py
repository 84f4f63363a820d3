"""The data path of a training run: the threaded ``Loader`` or grain's.

``make_loader(config, process_index, process_count)`` reads
``config.data.pipeline``:

* ``"threads"`` (default): ``cdc_jax.data.loader.Loader``, one prefetch
  thread in the training process.
* ``"grain"``: ``cdc_jax.data.grain_pipeline.GrainLoader``, batches built
  by ``config.data.workers`` grain worker processes (0: a thread here),
  for data sets whose decoding one thread cannot keep up with.

Both give the same batches (batch k is a function of the seed, the
process and k only) through the same interface, ``BatchIterator``, and
share everything but who builds a batch: the arguments and the shard
(``data.shard.open_shard``), the crop (``loader.random_crop``), the
skipping of unusable files (``data.screen``). Why two: the threaded
loader checks the files it has not drawn yet while its queue is full, so
a data set too large for random draws to cover still gets its "skipped N
of M files" summary after one pass, and it needs no picklable source;
grain's workers build batches in other processes, where such a survey
cannot report back until a draw reaches each file.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

from cdc_jax.data.loader import Loader
from cdc_jax.data.sources import DataError, make_source

logger = logging.getLogger(__name__)

PIPELINES = ("threads", "grain")


class BatchIterator(Protocol):
  """What the trainer needs from a loader (``Loader``, ``GrainLoader``)."""

  step: int  # index of the batch the next ``next()`` returns

  def __next__(self) -> np.ndarray:
    """uint8 [per-process batch, crop, crop, 3]."""
    ...

  def require_usable(self) -> None:
    """Raises ValueError now if no image of the shard is usable."""
    ...

  def close(self) -> None: ...

  def __enter__(self) -> BatchIterator: ...

  def __exit__(self, *exc_info) -> None: ...


def _options(data: Any) -> tuple[str, int]:
  """(pipeline, workers) from the data config, checked."""
  pipeline, workers = data.pipeline, data.workers
  if pipeline not in PIPELINES:
    raise DataError(
      f"--config.data.pipeline={pipeline!r} is not one of {PIPELINES}"
    )
  if not isinstance(workers, int) or workers < 0:
    raise DataError(
      f"--config.data.workers={workers!r} must be an integer >= 0"
    )
  if pipeline == "threads" and workers:
    logger.warning(
      "--config.data.workers=%d is ignored by the threads pipeline; set "
      "--config.data.pipeline=grain to use worker processes",
      workers,
    )
  return pipeline, workers


def make_loader(
  config: Any, process_index: int, process_count: int, start_step: int = 0
) -> BatchIterator:
  """This process's batches, by the pipeline ``config.data`` names.

  Args:
    config: the run config: ``data`` (source fields of ``make_source``,
      ``crop_size``, optional ``pipeline`` and ``workers``) and ``train``
      (``batch_size``, the global batch, and ``seed``).
    process_index: this process (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).
    start_step: the first batch to produce (to resume).

  Returns:
    A ``Loader`` or ``GrainLoader``, not started: no batch is built and
    no worker started before the first ``next()``.

  Raises:
    ValueError: unknown pipeline, bad worker count, or a source that
      cannot be opened (``make_source``).
  """
  pipeline, workers = _options(config.data)
  args = (
    make_source(config.data),
    config.train.batch_size // process_count,
    config.data.crop_size,
  )
  kwargs = dict(
    seed=config.train.seed,
    process_index=process_index,
    process_count=process_count,
    start_step=start_step,
  )
  if pipeline == "threads":
    return Loader(*args, **kwargs)
  try:  # only this path needs grain
    from cdc_jax.data.grain_pipeline import GrainLoader
  except ModuleNotFoundError as e:
    raise DataError(
      f"--config.data.pipeline=grain needs the grain package ({e}); "
      "pip install grain==0.2.18 or use --config.data.pipeline=threads"
    ) from None
  return GrainLoader(*args, **kwargs, worker_count=workers)
