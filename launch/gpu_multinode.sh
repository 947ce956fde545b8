#!/usr/bin/env bash
# distckpt reference training job on GPU nodes without a scheduler: one process per node over SSH.
#
#   HOSTS="gpu-a gpu-b gpu-c gpu-d" CKPT_DIR=/shared/ckpt/run1 \
#     bash launch/gpu_multinode.sh --steps 500 --save-every 50 --mesh data=4,fsdp=8
#
# Arguments go to `distckpt train` (default: --steps 20 --save-every 5). Each process uses all the
# GPUs of its node. The first host in HOSTS is process 0 and runs JAX's coordination service; every
# node must reach it at COORDINATOR (default: <first host>:1234). Optional settings:
#   SETUP     command run on each node first (default: python3 -m pip install 'distckpt[gpu]';
#             set SETUP= to skip, e.g. when the nodes already have it installed)
#   DISTCKPT  the distckpt command on the nodes (default: distckpt; e.g. /opt/venv/bin/distckpt)
#   SSH       ssh command (default: ssh -o BatchMode=yes)
#
# Each node gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (its position in
# HOSTS); distckpt.initialize() reads them. CKPT_DIR must be on a filesystem every node sees.
# If one node fails, the script closes the other SSH sessions and exits non-zero (the remote
# processes also stop on their own once JAX's coordination service reports the failed peer).
# Resume: run it again with the same CKPT_DIR.
set -euo pipefail

: "${HOSTS:?set HOSTS to the space-separated node names; the first is process 0}"
: "${CKPT_DIR:?set CKPT_DIR to a checkpoint directory on a filesystem shared by all nodes}"
read -r -a hosts <<< "$HOSTS"
num=${#hosts[@]}
coordinator=${COORDINATOR:-${hosts[0]}:1234}
setup=${SETUP-python3 -m pip install --quiet 'distckpt[gpu]'}
distckpt=${DISTCKPT:-distckpt}
read -r -a ssh_cmd <<< "${SSH:-ssh -o BatchMode=yes}"
if [[ $# -eq 0 ]]; then
  set -- --steps 20 --save-every 5
fi
train_args=$(printf ' %q' "$@")

echo "gpu_multinode.sh: $num processes, coordinator $coordinator, checkpoints in $CKPT_DIR"
pids=()
for i in "${!hosts[@]}"; do
  remote="set -e; ${setup:+$setup; }\
export JAX_COORDINATOR_ADDRESS=$(printf '%q' "$coordinator") JAX_NUM_PROCESSES=$num JAX_PROCESS_ID=$i; \
exec $distckpt train --dir $(printf '%q' "$CKPT_DIR")$train_args"
  # Output lines are prefixed with the process id; the background job is ssh itself.
  "${ssh_cmd[@]}" "${hosts[$i]}" "$remote" < /dev/null > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
done

status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then
    status=1
    echo "gpu_multinode.sh: a process failed; stopping the others" >&2
    kill "${pids[@]}" 2>/dev/null || true
    break
  fi
done
wait || true
exit "$status"
