#!/usr/bin/env bash
# Single host, all local devices (CPU, one or more GPUs, or a TPU VM's chips).
# Usage: launch/local.sh [--dry-run] CONFIG WORKDIR [--config.x=y ...]
#   launch/local.sh configs/eps_linear.py runs/eps \
#     --config.data.name=vimeo --config.data.path=/data/vimeo_septuplet
# GPU: pip install -U "jax[cuda12]==0.10.2" first (see README).
# --dry-run (or DRY_RUN=1) prints the command instead of running it.
set -euo pipefail
dry=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then
  dry=1
  shift
fi
config=${1:?config file, e.g. configs/eps_linear.py}
workdir=${2:?workdir}
shift 2
# Let XLA use most of the accelerator memory; no effect on CPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
cmd=(python -m cdc_jax.main --config="$config" --workdir="$workdir" "$@")
if [[ $dry == 1 ]]; then
  printf 'export XLA_PYTHON_CLIENT_MEM_FRACTION=%q\n' \
    "$XLA_PYTHON_CLIENT_MEM_FRACTION"
  printf '%q ' "${cmd[@]}"
  printf '\n'
else
  exec "${cmd[@]}"
fi
