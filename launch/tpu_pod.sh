#!/usr/bin/env bash
# Runs regionclip_jax.main on every worker of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods).
#
# Usage: launch/tpu_pod.sh [--dry-run] [--setup] --tpu NAME --zone ZONE [--project PROJECT]
#            [--repo URL] [--ref REF] CONFIG WORKDIR [extra regionclip_jax.main flags...]
#   --setup   first clone REPO at REF on every worker and install the pinned stack + jax[tpu]
#             (REPO defaults to this checkout's `origin` remote)
#   WORKDIR   must be one directory seen by all workers (a Filestore/NFS mount or a gcsfuse
#             bucket mount): every worker writes its part of each checkpoint there.
# JAX finds the other workers itself (jax.distributed on Cloud TPU needs no flags).
# The paper's RN50 recipe on a v5p-8 (4 chips, see BENCHMARKS.md for the fit):
#   launch/tpu_pod.sh --setup --tpu rclip-v5p-8 --zone us-east5-a \
#     configs/pretrain_rn50_cc3m.py /mnt/shared/runs/rn50 \
#     --config.data.train=/mnt/shared/cc3m/shards --config.model.init=/mnt/shared/clip_rn50
set -euo pipefail

usage() {  # the comment block at the top of this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-0}"
}

dry_run=0
setup=0
tpu=""
zone=""
project=""
repo=""
ref="main"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --setup) setup=1; shift ;;
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) echo "unknown option $1" >&2; usage 2 ;;
    *) break ;;
  esac
done
[[ -n $tpu && -n $zone && $# -ge 2 ]] || usage 2
config=$1
workdir=$2
shift 2

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all)
[[ -n $project ]] && gcloud_ssh+=("--project=$project")

if [[ $setup -eq 1 && -z $repo ]]; then
  repo=$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null) || {
    echo "--setup: this checkout has no origin remote; pass --repo URL" >&2
    exit 2
  }
fi

# Expanded on the workers, not here.
# shellcheck disable=SC2016
remote_dir='$HOME/regionclip_jax'
# shellcheck disable=SC2016
venv='$HOME/regionclip_jax_venv'
setup_cmd="set -e; if [ -d $remote_dir ]; then git -C $remote_dir fetch -q origin $(printf '%q' "$ref") && git -C $remote_dir checkout -q FETCH_HEAD; else git clone -q $(printf '%q' "$repo") $remote_dir && git -C $remote_dir checkout -q $(printf '%q' "$ref"); fi; python3 -m venv $venv; $venv/bin/pip install -q -r $remote_dir/requirements.txt 'jax[tpu]==0.10.2'; $venv/bin/pip install -q --no-deps -e $remote_dir"
main_args=("--config=$config" "--workdir=$workdir" "$@")
run_cmd="cd $remote_dir && $venv/bin/python -m regionclip_jax.main$(printf ' %q' "${main_args[@]}")"

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ $setup -eq 1 ]]; then
  run "${gcloud_ssh[@]}" "--command=$setup_cmd"
fi
run "${gcloud_ssh[@]}" "--command=$run_cmd"
