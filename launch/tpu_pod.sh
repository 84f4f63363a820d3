#!/usr/bin/env bash
# CDC training on a Cloud TPU VM pod slice: one process per host, every
# host runs the same command (gcloud ... tpu-vm ssh --worker=all).
#
# Usage: launch/tpu_pod.sh [--dry-run] COMMAND [-- MAIN_FLAGS...]
#   create   the TPU VM; QUEUED=1 asks through a queued resource (waits
#            for capacity; SPOT=1 for Spot capacity)
#   install  copies this checkout's tracked files to every host, makes a
#            venv there (uv; Python 3.11), installs requirements.txt +
#            jax[tpu], and gcsfuse
#   run      mounts the bucket, stages the data and starts training on
#            every host in the background (a log file per host)
#   logs     streams a host's log (WORKER=0 by default; WORKER=all)
#   stop     SIGTERM to the job on every host, SIGKILL after STOP_WAIT
#            seconds [300]
#   delete   deletes the TPU VM (and the queued resource)
# --dry-run (or DRY_RUN=1) prints the commands instead of running them.
#
# Settings (environment, defaults in brackets):
#   TPU_NAME [cdc-pod]  ZONE [us-west4-a]  PROJECT [gcloud's default]
#   ACCELERATOR [v5litepod-16]  RUNTIME [v2-alpha-tpuv5-lite]
#   BUCKET   gs://NAME[/PREFIX]: the bucket NAME is mounted with gcsfuse
#            at /mnt/gcs/NAME on every host and the workdir is
#            PREFIX/RUN in it (Orbax's multi-host saves need one directory
#            every host sees)
#   RUN [runs/eps]  workdir inside the bucket (and PREFIX)
#   CONFIG [configs/eps_linear.py]
#   DATA_NAME [vimeo]  DATA: gs://... (copied to each host's STAGE dir by
#            `run`), a path inside the bucket mount, or empty (embedded)
#   STAGE [/tmp/cdc_data]  JAX_VERSION [0.10.2]  PYTHON_VERSION [3.11]
#
# Example (v5e-16: 4 hosts x 4 chips, global batch 64):
#   export TPU_NAME=cdc-v5e ZONE=us-west4-a BUCKET=gs://my-bucket
#   export DATA=gs://my-bucket/vimeo_septuplet
#   launch/tpu_pod.sh create && launch/tpu_pod.sh install
#   launch/tpu_pod.sh run -- --config.train.batch_size=64
#   launch/tpu_pod.sh logs; launch/tpu_pod.sh delete
set -euo pipefail

dry=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then
  dry=1
  shift
fi
command=${1:-}
shift || true
if [[ ${1:-} == -- ]]; then shift; fi

TPU_NAME=${TPU_NAME:-cdc-pod}
ZONE=${ZONE:-us-west4-a}
ACCELERATOR=${ACCELERATOR:-v5litepod-16}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
RUN=${RUN:-runs/eps}
CONFIG=${CONFIG:-configs/eps_linear.py}
DATA=${DATA:-}
DATA_NAME=${DATA_NAME:-vimeo}
STAGE=${STAGE:-/tmp/cdc_data}
JAX_VERSION=${JAX_VERSION:-0.10.2}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
# Paths on the hosts; their shell expands the ~.
# shellcheck disable=SC2088
REMOTE_DIR='~/cdc_jax' VENV='~/cdc_venv' LOG='~/cdc_train.log'

gflags=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then gflags+=(--project="$PROJECT"); fi

# Words as a shell would need them typed (single quotes where needed;
# for --flag=value, around the value).
quote() {
  local out=() w flag
  for w in "$@"; do
    flag=''
    if [[ $w =~ ^--[A-Za-z0-9_.-]+= ]]; then
      flag=${BASH_REMATCH[0]}
      w=${w#"$flag"}
    fi
    if [[ ! $w =~ ^[][A-Za-z0-9_./=:,@%+~-]*$ ]]; then
      w="'${w//\'/\'\\\'\'}'"
    fi
    out+=("$flag$w")
  done
  printf '%s\n' "${out[*]}"
}

# Prints (dry run) or runs a command.
run() {
  if [[ $dry == 1 ]]; then quote "$@"; else "$@"; fi
}

# Runs a shell command line (newlines folded) on hosts (default: all).
on_hosts() {
  local line
  line=$(printf '%s' "$1" | tr '\n' ' ' | tr -s ' ')
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" \
    --worker="${2:-all}" --command="$line"
}

need_bucket() {
  if [[ ${BUCKET:-} != gs://* ]]; then
    echo "error: set BUCKET=gs://NAME (the workdir's bucket)" >&2
    exit 2
  fi
}

cmd_create() {
  local spot=()
  if [[ ${SPOT:-0} == 1 ]]; then spot=(--spot); fi
  if [[ ${QUEUED:-0} == 1 ]]; then
    run gcloud compute tpus queued-resources create "$TPU_NAME" \
      "${gflags[@]}" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
      "${spot[@]}"
    echo "# waits for capacity; ACTIVE when ready:"
    echo "gcloud compute tpus queued-resources describe $TPU_NAME" \
      "${gflags[*]}"
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${gflags[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
  fi
  echo "# when done: launch/tpu_pod.sh delete"
}

cmd_install() {
  local tgz=${TMPDIR:-/tmp}/cdc_jax_src.tgz here
  here=$(cd "$(dirname "$0")/.." && pwd)
  if [[ $dry == 1 ]]; then
    echo "(cd $here && git ls-files -z | tar --null -czf $tgz -T -)"
  else
    (cd "$here" && git ls-files -z | tar --null -czf "$tgz" -T -)
  fi
  run gcloud compute tpus tpu-vm scp "$tgz" "$TPU_NAME:cdc_jax_src.tgz" \
    "${gflags[@]}" --worker=all
  # gcsfuse from Google's apt repository (Cloud Storage FUSE docs).
  # shellcheck disable=SC2016  # expanded on the hosts
  local fuse='if ! command -v gcsfuse >/dev/null; then
    repo=gcsfuse-$(lsb_release -c -s);
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
      sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null;
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc]
      https://packages.cloud.google.com/apt $repo main" |
      sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;
    sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi'
  # Python >= 3.11 (the TPU images' Ubuntu 22.04 has 3.10): uv fetches it.
  on_hosts "set -e; mkdir -p $REMOTE_DIR;
    tar -xzf ~/cdc_jax_src.tgz -C $REMOTE_DIR;
    command -v ~/.local/bin/uv >/dev/null ||
      curl -LsSf https://astral.sh/uv/install.sh | sh;
    ~/.local/bin/uv venv -q --allow-existing --python $PYTHON_VERSION $VENV;
    ~/.local/bin/uv pip install -q --python $VENV/bin/python
      -r $REMOTE_DIR/requirements.txt 'jax[tpu]==$JAX_VERSION'; $fuse"
}

cmd_run() {
  need_bucket
  local path=${BUCKET#gs://} bucket
  bucket=${path%%/*}
  local mnt=/mnt/gcs/$bucket stage=: job
  job=(--config="$CONFIG" --workdir="/mnt/gcs/${path%/}/$RUN")
  if [[ $DATA == gs://* ]]; then
    stage=$(quote mkdir -p "$STAGE")" && "$(
      quote gcloud storage rsync -r "$DATA" "$STAGE")
    job+=(--config.data.name="$DATA_NAME" --config.data.path="$STAGE")
  elif [[ -n $DATA ]]; then
    job+=(--config.data.name="$DATA_NAME" --config.data.path="$DATA")
  fi
  job=("${job[@]}" "$@")
  on_hosts "set -e; sudo mkdir -p $mnt; sudo chown \$(id -un) $mnt;
    mountpoint -q $mnt || gcsfuse --implicit-dirs --rename-dir-limit=200000
      $bucket $mnt; $stage; cd $REMOTE_DIR;
    CDC_DISTRIBUTED=auto nohup $VENV/bin/python -m cdc_jax.main
      $(quote "${job[@]}") > $LOG 2>&1 < /dev/null &
    echo \$! > ~/cdc_train.pid"
  echo "# follow: launch/tpu_pod.sh logs    (process 0 logs the progress)"
}

cmd_logs() {
  on_hosts "tail -n +1 -F $LOG" "${WORKER:-0}"
}

cmd_stop() {
  # SIGTERM first (a preemption notice to JAX: the job saves and exits
  # where the loop honours it), SIGKILL after STOP_WAIT seconds.
  # shellcheck disable=SC2016  # expanded on the hosts
  on_hosts 'pid=$(cat ~/cdc_train.pid) && kill -TERM "$pid" || exit 0;
    for _ in $(seq '"${STOP_WAIT:-300}"'); do
      kill -0 "$pid" 2>/dev/null || exit 0; sleep 1; done;
    kill -KILL "$pid"'
}

cmd_delete() {
  if [[ ${QUEUED:-0} == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" \
      "${gflags[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gflags[@]}" --quiet
  fi
}

case $command in
  create | install | run | logs | stop | delete) "cmd_$command" "$@" ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    [[ -z $command || $command == help || $command == -h ]] || exit 2
    ;;
esac
