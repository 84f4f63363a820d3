"""``python -m cdc_jax.convert``: see ``cdc_jax.convert.cli``."""

import sys

from cdc_jax.convert.cli import main

if __name__ == "__main__":
  sys.exit(main())
