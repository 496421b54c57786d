#!/usr/bin/env bash
# Several JAX processes on this machine (CPU devices, gloo collectives): the multi-host code path
# without a cluster. Each process logs to WORKDIR/logs/process_<i>.log; process 0 is also echoed.
#
# Usage: launch/local_multiprocess.sh [--dry-run] [-n PROCESSES] [-d DEVICES_PER_PROCESS]
#            [--port PORT] CONFIG WORKDIR [extra regionclip_jax.main flags...]
# Example (the ShapesWorld pretraining smoke run on 2 processes x 2 devices):
#   launch/local_multiprocess.sh -n 2 -d 2 configs/pretrain_shapesworld.py:runlocal /tmp/rcj_mp
# Paper recipe on one big CPU host is not practical; use tpu_pod.sh or slurm_gpu.sbatch.
set -euo pipefail

usage() {  # the comment block at the top of this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-0}"
}

dry_run=0
processes=2
devices=2
port=29500
python=${PYTHON:-python}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -n) processes=$2; shift 2 ;;
    -d) devices=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) echo "unknown option $1" >&2; usage 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || usage 2
config=$1
workdir=$2
shift 2

commands=()
for ((i = 0; i < processes; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "$python" -m regionclip_jax.main "--config=$config"
       "--workdir=$workdir" "--coordinator_address=127.0.0.1:$port"
       "--num_processes=$processes" "--process_id=$i" "--num_cpu_devices=$devices" "$@")
  commands+=("$(printf '%q ' "${cmd[@]}")")
done

if [[ $dry_run -eq 1 ]]; then
  for c in "${commands[@]}"; do echo "$c"; done
  exit 0
fi

mkdir -p "$workdir/logs"
pids=()
for ((i = 0; i < processes; i++)); do
  bash -c "${commands[$i]}" >"$workdir/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$workdir/logs/process_0.log" &
tail_pid=$!
status=0
for ((i = 0; i < processes; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed: see $workdir/logs/process_$i.log" >&2
    status=1
  fi
done
kill "$tail_pid" 2>/dev/null || true
exit "$status"
