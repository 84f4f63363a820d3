"""Evaluation: metrics, the held-out photo report, and (later) datasets,
baselines and rate-distortion reports."""
