"""cdc_jax: CDC (Yang & Mandt, NeurIPS 2023) in JAX/Flax."""
