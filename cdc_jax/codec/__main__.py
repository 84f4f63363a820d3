"""``python -m cdc_jax.codec``: see ``cdc_jax.codec.cli``."""

import sys

from cdc_jax.codec.cli import main

sys.exit(main())
