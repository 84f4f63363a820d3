"""Flax modules of the CDC model."""
