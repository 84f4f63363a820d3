"""PyTorch weights -> cdc_jax: CDC checkpoints, LPIPS and FID Inception.

Usage (``cli.py``)::

  python -m cdc_jax.convert checkpoint CHECKPOINT.pt OUTPUT_DIR
      [--family eps|x] [--ema | --no-ema] [--overwrite]
  python -m cdc_jax.convert lpips OUTPUT.npz --backbone PTH
      [--net vgg|alex] [--lins PTH]
  python -m cdc_jax.convert inception SRC.pth OUT.npz

The released files (docs/model.md §10) are ``{"step", "model"}`` (eps
family) or ``{"step", "model", "ema"}`` (x family, EMA weights under
``ema_model.``).
The checkpoint converter

1. loads the file with ``torch.load(weights_only=True)`` (torch is only
   needed here: ``pip install -r requirements-torch.txt``),
2. picks the state dict (EMA weights when present and ``--ema``),
3. detects the family from the keys and infers the model config from the
   tensor shapes, so other widths/depths of the same architecture convert,
4. checks the ``train_*`` schedule buffers against
   ``cdc_jax.diffusion.reference_buffers``,
5. maps every tensor through one table, ``tables.mapping_table``: rows
   (torch key, Flax path, layout transform) generated from the
   architecture, checked against ``jax.eval_shape`` of the model's init
   (every source tensor used once, every Flax leaf filled once, every shape
   as expected),
6. writes a model directory with ``cdc_jax.model_dir.export`` (params and
   entropy tables) plus, for LPIPS-trained (rho > 0) checkpoints,
   ``lpips_vgg.npz`` with the LPIPS-VGG weights in NHWC/HWIO layout (see
   ``tables.lpips_table``).

``lpips`` and ``inception`` write the LPIPS and FID InceptionV3 weights
as plain ``.npz`` files, which ``cdc_jax.models.lpips.load`` and
``cdc_jax.models.inception.load_variables`` read without torch.

Modules (none imports this package's ``__init__`` for anything)::

  errors.py            ConversionError, key listings for its messages
  transforms.py        torch <-> Flax layouts (OIHW -> HWIO, ...), Row
  tables.py            the mapping tables: CDC (mapping_table,
                       checked_table) and LPIPS-VGG (lpips_table)
  infer.py             family, model config and schedule from a state dict
  torch_checkpoint.py  load, select, convert, export; to_torch_state_dict,
                       the inverse (tests, round trips)
  lpips.py             LPIPS trunk and lin .pth files -> params (.npz)
  inception.py         the FID InceptionV3 .pth -> variables (.npz)
  cli.py, __main__.py  ``python -m cdc_jax.convert`` and its commands
"""
