#!/usr/bin/env bash
# N CPU processes on this machine, joined with jax.distributed over 127.0.0.1 (for testing multi-host code).
#
#   launch/local_multiprocess.sh 2 --config=configs/colbert.py:demo --workdir=/tmp/mp
#
# DEVICES_PER_PROCESS (default 2) CPU devices per process; PORT (default: a free one) for the coordinator.
# Output lines are prefixed with the process index; the script fails if any process fails.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES [pairdistill_jax.main flags...]" >&2
  exit 2
fi
num=$1
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
port=${PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
devices=${DEVICES_PER_PROCESS:-2}

pids=()
for ((i = 0; i < num; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
    "$python" -m pairdistill_jax.main --coordinator_address="127.0.0.1:${port}" --num_processes="$num" \
    --process_id="$i" "$@" 2>&1 | sed -u "s/^/[process $i] /" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
