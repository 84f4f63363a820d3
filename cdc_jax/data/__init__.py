"""Training data: sources of images (``sources``, ``tfds_source``), a
process's shard of them (``shard``), which files are usable (``screen``:
skip warnings and the summary), the batch loaders (``loader``, threads;
``grain_pipeline``, grain workers) and the choice between them
(``pipeline``)."""
