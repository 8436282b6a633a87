#!/bin/bash
# Runs dalle3_jax on every worker of a Cloud TPU VM pod slice (one process per worker host; JAX
# finds the other workers through the VM metadata and joins them into one job).
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b [PROJECT=my-project]
#   REPO_URL=https://github.com/<you>/dalle3_jax.git launch/tpu_pod.sh setup   # clone + install, every worker
#   launch/tpu_pod.sh train --config=configs/t2i.py:caption=dsc,blend=0.95,records=/mnt/shared/recaption \
#       --workdir=/mnt/shared/workdirs/t2i_dsc --config.mesh.strategy=fsdp
#   launch/tpu_pod.sh run launch/recaption.py --config=configs/recaption.py --config.output_dir=/mnt/shared/recaption
#   launch/tpu_pod.sh ssh "nvidia-smi || true; ls /mnt/shared"                  # any command, every worker
#
# The workdir (and data it reads) must be a directory every worker sees, e.g. a Filestore (NFS)
# share mounted at the same path on each worker: all processes write their checkpoint shards into
# it. Rerunning the same command after a preemption resumes from the last checkpoint.
#
# Environment: TPU_NAME, ZONE (required), PROJECT (optional), REMOTE_DIR (the checkout on each
# worker, default dalle3_jax in the home directory), REPO_URL and REF (for setup: the git URL of
# this repository and the branch or commit to check out, default main), GCLOUD (default gcloud).

set -euo pipefail

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
action="$1"
shift
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
GCLOUD="${GCLOUD:-gcloud}"
REMOTE_DIR="${REMOTE_DIR:-dalle3_jax}"
project_args=()
[[ -n "${PROJECT:-}" ]] && project_args=(--project "$PROJECT")

on_all_workers() {
  "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project_args[@]}" --worker=all --command "$1"
}

quoted_args() {
  local out="" arg
  for arg in "$@"; do out+=" $(printf '%q' "$arg")"; done
  printf '%s' "$out"
}

case "$action" in
  setup)
    : "${REPO_URL:?set REPO_URL to the git URL of this repository}"
    ref="${REF:-main}"
    on_all_workers "set -e
      if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --quiet origin; else git clone --quiet $(printf '%q' "$REPO_URL") $REMOTE_DIR; fi
      git -C $REMOTE_DIR checkout --quiet $(printf '%q' "$ref") && (git -C $REMOTE_DIR pull --quiet --ff-only 2>/dev/null || true)
      cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install --quiet -e . 'jax[tpu]'
      .venv/bin/python -c 'import dalle3_jax, jax; print(\"dalle3_jax installed; jax\", jax.__version__)'"
    ;;
  train)
    on_all_workers "cd $REMOTE_DIR && DALLE3_JAX_DISTRIBUTED=on .venv/bin/python launch/train.py$(quoted_args "$@")"
    ;;
  run)
    [[ $# -ge 1 ]] || usage
    on_all_workers "cd $REMOTE_DIR && DALLE3_JAX_DISTRIBUTED=on .venv/bin/python$(quoted_args "$@")"
    ;;
  ssh)
    [[ $# -eq 1 ]] || usage
    on_all_workers "$1"
    ;;
  *)
    usage
    ;;
esac
